"""Driving the station: instruments behind typed protocols, the bias controller and its guardian,
safety limits, protocols, conditions and the runner.
"""
