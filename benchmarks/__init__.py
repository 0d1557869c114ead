"""Benchmarks: serving latency side by side (``python -m benchmarks.serving_bench``)."""
