"""The live-analysis worker process and the daemon's handle on it."""
