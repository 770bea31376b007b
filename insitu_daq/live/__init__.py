"""The live analysis: its worker process (process.py), the frame-tap messages it reads
(frames.py) and the daemon's handle on it (client.py)."""
