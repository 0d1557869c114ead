"""Worker state of one tier: membership, KV usage and queues, as the scheduler sees them.

The registry stores the numbers in columns (numpy arrays, one row per worker) so that filters
and scorers work on all workers at once: a decision over 1,024 workers then costs a few dozen
vector operations instead of thousands of Python-level dictionary updates. `WorkerState` is the
per-worker snapshot for everything else (APIs, logs, tests).

Writers:
* membership: pd_serve's router calls `WorkerRegistry.sync` when the replica set changes;
* engine stats: `WorkerRegistry.update` whenever a replica reports (e.g. Ray Serve's
  ``record_routing_stats``, every ``request_routing_stats_period_s``);
* router-side in-flight counts: `on_routed` / `on_completed` (through the `Scheduler`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from scheduler.index import PrefixIndex

__all__ = ["WorkerRegistry", "WorkerState", "WorkerView"]


@dataclass(frozen=True, slots=True)
class WorkerState:
    """Snapshot of one worker, as last reported.

    ``kv_usage`` is vLLM's ``kv_cache_usage_perc`` (0..1: blocks held by running requests),
    ``num_running`` / ``num_waiting`` its request queues, ``num_inflight`` the requests this
    router sent and has not seen complete (fresher than the engine's report). ``capacity_blocks``
    and ``block_size`` describe the KV cache (0 = unknown). ``updated_at`` is the clock value of
    the last stats report (or of registration).
    """

    worker_id: str
    tier: str
    kv_usage: float = 0.0
    num_running: int = 0
    num_waiting: int = 0
    capacity_blocks: int = 0
    block_size: int = 0
    healthy: bool = True
    updated_at: float = 0.0
    num_inflight: int = 0


class WorkerView:
    """Column view of a registry's workers: row ``i`` of every array is worker ``ids[i]``.

    Owned by the registry: arrays are updated in place by stats reports, and a new view (with a
    new ``version``) replaces this one when membership changes. Plugins read it, never write it.
    """

    __slots__ = (
        "capacity_blocks",
        "healthy",
        "ids",
        "kv_usage",
        "num_inflight",
        "num_running",
        "num_waiting",
        "row",
        "updated_at",
        "version",
    )

    def __init__(self, ids: tuple[str, ...], version: int) -> None:
        n = len(ids)
        self.ids = ids
        self.row: dict[str, int] = {w: i for i, w in enumerate(ids)}
        self.version = version
        self.kv_usage = np.zeros(n, dtype=np.float64)
        self.num_running = np.zeros(n, dtype=np.float64)
        self.num_waiting = np.zeros(n, dtype=np.float64)
        self.num_inflight = np.zeros(n, dtype=np.float64)
        self.capacity_blocks = np.zeros(n, dtype=np.int64)
        self.healthy = np.ones(n, dtype=np.bool_)
        self.updated_at = np.zeros(n, dtype=np.float64)

    def __len__(self) -> int:
        return len(self.ids)


_COLUMNS = ("kv_usage", "num_running", "num_waiting", "num_inflight", "capacity_blocks", "healthy", "updated_at")


class WorkerRegistry:
    """Workers of one tier, keyed by worker id (e.g. the Ray Serve replica id).

    Args:
        tier: ``"decode"`` or ``"prefill"`` (free text; used in snapshots and metrics).
        index: the tier's prefix index; `sync` registers arrivals there and forgets departures.
        clock: seconds (``time.monotonic``); injectable for tests.
    """

    def __init__(
        self,
        tier: str,
        index: PrefixIndex | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tier = tier
        self.index = index
        self._clock = clock
        self._block_size: dict[str, int] = {}
        self._version = 0
        self._view = WorkerView((), 0)

    # ------------------------------------------------------------------ membership

    def sync(self, worker_ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """Make the membership exactly ``worker_ids``; return ``(added, removed)``.

        Called by the router whenever the replica set changes (cheap when nothing changed).
        New workers start healthy with zero load; departed workers are also removed from the
        index, so their bits and keys are freed.
        """
        wanted = list(dict.fromkeys(worker_ids))
        old = self._view
        if tuple(wanted) == old.ids:
            return [], []
        wanted_set = set(wanted)
        added = [w for w in wanted if w not in old.row]
        removed = [w for w in old.ids if w not in wanted_set]
        self._rebuild(tuple(w for w in old.ids if w in wanted_set) + tuple(added))
        for w in removed:
            self._block_size.pop(w, None)
            if self.index is not None:
                self.index.remove_worker(w)
        if self.index is not None:
            for w in added:
                self.index.add_worker(w)
        return added, removed

    def add(self, worker_id: str) -> None:
        """Add one worker (no-op if known)."""
        if worker_id not in self._view.row:
            self.sync((*self._view.ids, worker_id))

    def remove(self, worker_id: str) -> None:
        """Remove one worker (no-op if unknown)."""
        if worker_id in self._view.row:
            self.sync(w for w in self._view.ids if w != worker_id)

    def _rebuild(self, ids: tuple[str, ...]) -> None:
        old = self._view
        self._version += 1
        new = WorkerView(ids, self._version)
        keep = [old.row[w] for w in ids if w in old.row]
        n_keep = len(keep)
        now = self._clock()
        for col in _COLUMNS:
            getattr(new, col)[:n_keep] = getattr(old, col)[keep]
        new.updated_at[n_keep:] = now
        self._view = new

    # ------------------------------------------------------------------ stats

    def update(
        self,
        worker_id: str,
        *,
        kv_usage: float | None = None,
        num_running: int | None = None,
        num_waiting: int | None = None,
        capacity_blocks: int | None = None,
        block_size: int | None = None,
        healthy: bool | None = None,
    ) -> bool:
        """Record a stats report of ``worker_id``; return ``False`` if the worker is unknown.

        Called whenever a replica reports (per worker, every few seconds at most). Fields left
        ``None`` keep their value; ``updated_at`` becomes now. Reports for workers not (or no
        longer) in the membership are ignored, so a late report cannot resurrect a departed one.
        """
        v = self._view
        i = v.row.get(worker_id)
        if i is None:
            return False
        if kv_usage is not None:
            v.kv_usage[i] = min(1.0, max(0.0, kv_usage))
        if num_running is not None:
            v.num_running[i] = num_running
        if num_waiting is not None:
            v.num_waiting[i] = num_waiting
        if capacity_blocks is not None:
            v.capacity_blocks[i] = capacity_blocks
            if self.index is not None:
                self.index.set_capacity(worker_id, capacity_blocks or None)
        if block_size is not None:
            self._block_size[worker_id] = block_size
        if healthy is not None:
            v.healthy[i] = healthy
        v.updated_at[i] = self._clock()
        return True

    def set_healthy(self, worker_id: str, healthy: bool) -> bool:
        """Mark a worker (un)healthy without touching ``updated_at`` (e.g. after a failed call)."""
        i = self._view.row.get(worker_id)
        if i is None:
            return False
        self._view.healthy[i] = healthy
        return True

    def on_routed(self, worker_id: str) -> None:
        """A request was sent to ``worker_id`` by this router (once per routed request)."""
        i = self._view.row.get(worker_id)
        if i is not None:
            self._view.num_inflight[i] += 1

    def on_completed(self, worker_id: str) -> None:
        """A request sent to ``worker_id`` finished, failed or was aborted (once per request)."""
        i = self._view.row.get(worker_id)
        if i is not None and self._view.num_inflight[i] > 0:
            self._view.num_inflight[i] -= 1

    # ------------------------------------------------------------------ reading

    def view(self) -> WorkerView:
        """The current column view (valid until the next membership change)."""
        return self._view

    def get(self, worker_id: str) -> WorkerState | None:
        """Snapshot of one worker, or ``None`` if unknown."""
        v = self._view
        i = v.row.get(worker_id)
        if i is None:
            return None
        return WorkerState(
            worker_id=worker_id,
            tier=self.tier,
            kv_usage=float(v.kv_usage[i]),
            num_running=int(v.num_running[i]),
            num_waiting=int(v.num_waiting[i]),
            capacity_blocks=int(v.capacity_blocks[i]),
            block_size=self._block_size.get(worker_id, 0),
            healthy=bool(v.healthy[i]),
            updated_at=float(v.updated_at[i]),
            num_inflight=int(v.num_inflight[i]),
        )

    def ids(self) -> tuple[str, ...]:
        """Worker ids in row order."""
        return self._view.ids

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._view.row

    def __len__(self) -> int:
        return len(self._view.ids)

    def __iter__(self) -> Iterator[WorkerState]:
        for w in self._view.ids:
            state = self.get(w)
            assert state is not None
            yield state
