"""The control deployment: which engine replicas are alive, and where their metrics are.

Engine replicas heartbeat their ``ReplicaInfo`` every ``HEARTBEAT_S``; an entry not refreshed
within ``TTL_S`` is dropped, so a replica that died disappears without anyone telling us.
The ingress reads it to gather ``/metrics``; decode reads it to know whether the prefill tier
has replicas. One replica, a fraction of a CPU, nothing on the per-token path.
"""

from __future__ import annotations

import time

import msgspec

from pd_serve.protocol import ReplicaInfo

HEARTBEAT_S = 1.0
TTL_S = 5.0


class Control:
    def __init__(self) -> None:
        self._replicas: dict[str, ReplicaInfo] = {}

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
