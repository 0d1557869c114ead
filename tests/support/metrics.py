"""Read Prometheus text (pd_serve's /metrics or a vLLM server's): the benchmarks' harness does it."""

from benchmarks.harness import Scrape

__all__ = ["Scrape"]
