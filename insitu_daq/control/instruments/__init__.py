"""The instruments the daemon drives (source-meter, holder, microscope), seen through small typed
protocols.
"""
