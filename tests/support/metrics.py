"""Read Prometheus text (pd_serve's /metrics or a vLLM server's) into something testable."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    def __init__(self, text: str) -> None:
        self.samples = [(s.name, s.labels, s.value)
                        for fam in text_string_to_metric_families(text) for s in fam.samples]

    @classmethod
    def get(cls, base_url: str) -> "Scrape":
        return cls(httpx.get(base_url + "/metrics", timeout=10).text)

    def sum(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels``."""
        return sum(v for n, lab, v in self.samples
                   if n == name and all(lab.get(k) == want for k, want in labels.items()))

    def values(self, name: str, **labels: str) -> list[float]:
        return [v for n, lab, v in self.samples
                if n == name and all(lab.get(k) == want for k, want in labels.items())]
