"""The command line: argument parsing, the demo, progress lines and child-process helpers."""
