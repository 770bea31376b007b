"""Shared definitions every room uses, with no instrument I/O: station config, run clock, records,
imaging states, the worker-process preamble.
"""
