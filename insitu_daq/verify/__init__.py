"""Checks of measured results against the simulator's ground truth (demo and accuracy tests)."""
