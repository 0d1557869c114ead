"""The app's one ``/metrics`` page: every replica's registry, merged and labelled.

``Control.metrics_page`` builds it (``gather``) and the ingress only relays the bytes. Parsing
and merging every replica's page (vLLM's histograms included) costs a few hundred ms of CPU
under load; done in the ingress, in a thread, it held the ingress's GIL against the event loop
that streams every client's tokens. The control replica has nothing else to do.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from kv_transfer.metrics import derive


class _Families:
    """A prometheus collector that exposes already-built metric families."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


def merge(pages: list[tuple[str, str, str]]) -> bytes:
    """``(tier, replica_id, text)`` pages merged into one family per name (a name twice would
    break Prometheus' parser). Every sample gets the process it came from: `replica` and
    `replica_tier` (`prefill`, `decode`, `ingress`). A sample keeps its own `tier` label (e.g.
    prefill routing done inside a decode replica says tier="prefill"); an engine replica's
    sample without one gets its replica's tier. Then the derived transfer metrics."""
    merged: dict[str, Metric] = {}
    for tier, replica, text in pages:
        proc = {"replica": replica, "replica_tier": tier}
        if tier != "ingress":
            proc = {"tier": tier, **proc}
        for fam in text_string_to_metric_families(text):
            out = merged.get(fam.name)
            if out is None:
                out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                labels = {**proc, **s.labels}
                labels["replica"], labels["replica_tier"] = replica, tier
                out.samples.append(type(s)(s.name, labels, s.value, s.timestamp, s.exemplar))
    families = list(merged.values())
    families += derive(families)  # pd_serve_kv_transfer_* from the connector's own metrics
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Families(families))
    return generate_latest(reg)


async def gather(replicas: list[Any], http: Any) -> bytes:
    """Fetch each replica's ``metrics_url`` (``ReplicaInfo``) with ``http`` (an
    ``httpx.AsyncClient``) and merge the pages in a thread. A replica that does not answer 200
    is left out (it may be stopping)."""
    texts = await asyncio.gather(*(http.get(r.metrics_url) for r in replicas), return_exceptions=True)
    pages = [(r.tier, r.replica_id, resp.text) for r, resp in zip(replicas, texts)
             if not isinstance(resp, BaseException) and resp.status_code == 200]
    return await asyncio.to_thread(merge, pages)
