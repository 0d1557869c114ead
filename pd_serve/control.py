"""The control deployment: which engine replicas are alive, and where their metrics are.

Engine replicas heartbeat their ``ReplicaInfo`` every ``HEARTBEAT_S``; an entry not refreshed
within ``TTL_S`` is dropped, so a replica that died disappears without anyone telling us.
It also builds the app's ``/metrics`` page from every registered replica's registry
(``pd_serve.metrics_page``), which the ingress relays. Decode reads it to know whether the
prefill tier has replicas. One replica, a fraction of a CPU, nothing on the per-token path.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec

from pd_serve import metrics_page
from pd_serve.protocol import ReplicaInfo

HEARTBEAT_S = 1.0
TTL_S = 5.0


class Control:
    def __init__(self) -> None:
        self._replicas: dict[str, ReplicaInfo] = {}
        self._http: Any = None
        self._gather: asyncio.Future[bytes] | None = None

    def register(self, info: ReplicaInfo) -> None:
        """Called by every engine replica every HEARTBEAT_S seconds (idempotent)."""
        self._replicas[info.replica_id] = msgspec.structs.replace(info, updated_at=time.time())

    def deregister(self, replica_id: str) -> None:
        """Called by a replica that shuts down cleanly."""
        self._replicas.pop(replica_id, None)

    def replicas(self, tier: str | None = None) -> list[ReplicaInfo]:
        now = time.time()
        self._replicas = {k: v for k, v in self._replicas.items() if now - v.updated_at < TTL_S}
        return [r for r in self._replicas.values() if tier is None or r.tier == tier]

    async def metrics_page(self) -> bytes:
        """Every live replica's registry (engine tiers and ingress), merged in a thread.
        Scrapes that arrive while a gather runs share its result instead of starting another."""
        if self._gather is None:
            if self._http is None:
                import httpx

                self._http = httpx.AsyncClient(timeout=10.0)
            self._gather = asyncio.ensure_future(metrics_page.gather(self.replicas(), self._http))
            self._gather.add_done_callback(lambda _: setattr(self, "_gather", None))
        return await asyncio.shield(self._gather)
