"""Live analysis of detector frames: pure functions, arrays in, numbers out."""
