"""Reproducible speed and memory measurements; each prints one JSON object per line (`python -m benchmarks.<name>`)."""
