"""The daemon and what it serves: control API, event stream, metrics, station locks, scripted-run
client.
"""
