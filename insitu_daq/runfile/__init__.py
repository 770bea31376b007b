"""The NeXus run file: its layout, the writer, frame stacks, the analysis log and the close-time
finish.
"""
