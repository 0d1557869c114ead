"""Worker state of one tier: membership, KV usage and queues, as the scheduler sees them.

The registry stores the numbers in columns (numpy arrays, one row per worker) so that filters
and scorers work on all workers at once: a decision over 1,024 workers then costs a few dozen
vector operations instead of thousands of Python-level dictionary updates. `WorkerState` is the
per-worker snapshot for everything else (APIs, logs, tests).

Writers:
* membership: pd_serve's router calls `WorkerRegistry.sync` when the replica set changes;
* engine stats: `WorkerRegistry.update` whenever a replica reports (e.g. Ray Serve's
  ``record_routing_stats``, every ``request_routing_stats_period_s``);
* router-side in-flight counts: `on_routed` / `on_completed` (through the `Scheduler`);
* router-side prefill backlog: `add_prefill` (through `Scheduler.on_routed`).

The prefill backlog is a fluid queue per worker: ``prefill_queued_tokens`` prompt tokens still
to compute, as of ``prefill_anchor_t``, drained at the worker's measured ``prefill_tps`` since
then (`WorkerRegistry.queued_prefill`). An engine report of its queued prefill tokens re-anchors
it; the router adds each request's uncached tokens the moment it routes one, so the estimate is
fresher than any report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from scheduler.index import PrefixIndex

__all__ = ["DEFAULT_ASSUMED_PREFILL_TPS", "WorkerRegistry", "WorkerState", "WorkerView"]


@dataclass(frozen=True, slots=True)
class WorkerState:
    """Snapshot of one worker, as last reported.

    ``kv_usage`` is vLLM's ``kv_cache_usage_perc`` (0..1: blocks held by running requests),
    ``num_running`` / ``num_waiting`` its request queues, ``num_inflight`` the requests this
    router sent and has not seen complete (fresher than the engine's report). ``capacity_blocks``
    and ``block_size`` describe the KV cache (0 = unknown). ``updated_at`` is the clock value of
    the last stats report (or of registration). ``prefill_tps`` is the engine's measured prefill
    rate (tokens/s, 0 = not measured yet) and ``queued_prefill_tokens`` the prefill work the
    router estimates is queued there now (see the module docstring).
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
    prefill_tps: float = 0.0
    queued_prefill_tokens: float = 0.0


class WorkerView:
    """Column view of a registry's workers: row ``i`` of every array is worker ``ids[i]``.

    Owned by the registry: arrays are updated in place by stats reports, and a new view (with a
    new ``version``) replaces this one when membership changes. Plugins read it, never write it.
    """

    __slots__ = (
        "capacity_blocks",
        "healthy",
        "ids",
        "inv_prefill_tps",
        "kv_base",
        "kv_scale",
        "kv_unknown",
        "prefill_drain_base",
        "kv_usage",
        "num_inflight",
        "num_running",
        "num_waiting",
        "prefill_anchor_t",
        "prefill_queued_tokens",
        "prefill_tps",
        "prefill_tps_measured",
        "routed_level",
        "routed_t",
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
        self.prefill_tps = np.zeros(n, dtype=np.float64)
        self.prefill_tps_measured = np.zeros(n, dtype=np.bool_)
        self.prefill_queued_tokens = np.zeros(n, dtype=np.float64)
        self.prefill_anchor_t = np.zeros(n, dtype=np.float64)
        # requests this router sent each row, decayed with ARRIVAL_RATE_WINDOW_S, as of routed_t
        self.routed_level = np.zeros(n, dtype=np.float64)
        self.routed_t = np.zeros(n, dtype=np.float64)
        # Derived per row by the registry whenever the columns above change, so that a decision
        # needs fewer vector operations (see `WorkerRegistry._derive`):
        self.inv_prefill_tps = np.zeros(n, dtype=np.float64)  # 1 / prefill_tps
        self.prefill_drain_base = np.zeros(n, dtype=np.float64)  # queued + tps * anchor_t
        self.kv_base = np.zeros(n, dtype=np.float64)  # blocks the known requests hold - capacity
        self.kv_unknown = np.ones(n, dtype=np.float64)  # 1 + requests of unknown size
        self.kv_scale = np.zeros(n, dtype=np.float64)  # 1 / blocks held (0: capacity unknown)

    def queued_prefill(self, now: float) -> np.ndarray:
        """Prefill tokens queued per row at ``now``: the backlog, drained at each row's rate.
        A drained row is exactly 0 (``drain_base - tps * now`` is then <= 0), so idle workers tie."""
        q = self.prefill_drain_base - self.prefill_tps * now
        return np.maximum(q, 0.0, out=q)

    def recent_routed(self, now: float) -> np.ndarray:
        """Per row: the requests this router sent there lately, each weighted
        ``exp(-age / ARRIVAL_RATE_WINDOW_S)``. The picker's tie-break: a new prefix goes to the
        worker with the smaller recent share, since the prefix's later requests follow it."""
        return self.routed_level * np.exp((self.routed_t - now) / ARRIVAL_RATE_WINDOW_S)

    def kv_over_blocks(self, need_blocks: int) -> np.ndarray:
        """Per row: blocks missing for a new request of ``need_blocks`` next to the requests the
        worker has (each holding what its running ones hold on average; a request on a worker
        that runs none counts ``need_blocks``). 0 where they fit; meaningless where the
        capacity is unknown (``kv_scale`` is 0 there, which zeroes the wait)."""
        over = self.kv_base + self.kv_unknown * need_blocks
        return np.maximum(over, 0.0, out=over)

    def __len__(self) -> int:
        return len(self.ids)


ARRIVAL_RATE_WINDOW_S = 30.0
"""Time constant of the router-measured request rate (`WorkerRegistry.arrival_rate`)."""

DEFAULT_ASSUMED_PREFILL_TPS = 10_000.0
"""Prefill tokens/s assumed for a worker that has not reported a measured rate yet."""

_COLUMNS = (
    "kv_usage",
    "num_running",
    "num_waiting",
    "num_inflight",
    "capacity_blocks",
    "healthy",
    "updated_at",
    "prefill_tps",
    "prefill_tps_measured",
    "prefill_queued_tokens",
    "prefill_anchor_t",
    "routed_level",
    "routed_t",
)


class WorkerRegistry:
    """Workers of one tier, keyed by worker id (e.g. the Ray Serve replica id).

    Args:
        tier: ``"decode"`` or ``"prefill"`` (free text; used in snapshots and metrics).
        index: the tier's prefix index; `sync` registers arrivals there and forgets departures.
        clock: seconds (``time.monotonic``); injectable for tests.
        assumed_prefill_tps: the prefill rate a worker is assumed to have until it reports a
            measured one. When every worker has the same rate it cancels out of the choice;
            it only sets how fast the router-side backlog estimate drains between reports.
    """

    def __init__(
        self,
        tier: str,
        index: PrefixIndex | None = None,
        clock: Callable[[], float] = time.monotonic,
        assumed_prefill_tps: float = DEFAULT_ASSUMED_PREFILL_TPS,
    ) -> None:
        if not assumed_prefill_tps > 0:
            raise ValueError(f"assumed_prefill_tps must be > 0, got {assumed_prefill_tps!r}")
        self.tier = tier
        self.assumed_prefill_tps = float(assumed_prefill_tps)
        self._rate = 0.0  # routed requests per second (exponentially decayed), as of _rate_t
        self._rate_t = clock()
        # Mean running time (Little's law over one window): the running count the engines report,
        # summed over workers and averaged over time, and this router's completions per second,
        # both decayed with the same time constant so that they lag together.
        self._run_sum = 0.0  # sum of num_running over the rows, now
        self._run_avg = 0.0  # _run_sum averaged over about ARRIVAL_RATE_WINDOW_S, as of _run_t
        self._run_t = self._rate_t
        self._done = 0.0  # completions per second (exponentially decayed), as of _done_t
        self._done_t = self._rate_t
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
        new.prefill_anchor_t[n_keep:] = now
        self._view = new
        self._advance_running(now)
        self._run_sum = float(new.num_running.sum())
        self._assume_rates(now)
        for i in range(len(ids)):
            self._derive(new, i)

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
        prefill_tps: float | None = None,
        queued_prefill_tokens: float | None = None,
    ) -> bool:
        """Record a stats report of ``worker_id``; return ``False`` if the worker is unknown.

        Called whenever a replica reports (per worker, every few seconds at most). Fields left
        ``None`` keep their value; ``updated_at`` becomes now. Reports for workers not (or no
        longer) in the membership are ignored, so a late report cannot resurrect a departed one.
        ``prefill_tps``: the engine's measured prefill rate (tokens/s; ignored unless > 0).
        ``queued_prefill_tokens``: prompt tokens queued or in prefill on the engine now; it
        replaces the router's estimate (requests routed in the last few milliseconds, not yet
        arrived at the engine, are lost from it until the next report).
        """
        v = self._view
        i = v.row.get(worker_id)
        if i is None:
            return False
        if kv_usage is not None:
            v.kv_usage[i] = min(1.0, max(0.0, kv_usage))
        if num_running is not None:
            self._advance_running(self._clock())
            self._run_sum += num_running - float(v.num_running[i])
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
        now = self._clock()
        if prefill_tps is not None and prefill_tps > 0:
            v.prefill_queued_tokens[i] = self._drained(v, i, now)  # re-anchor at the old rate first
            v.prefill_anchor_t[i] = now
            first = not v.prefill_tps_measured[i]
            v.prefill_tps[i] = prefill_tps
            v.prefill_tps_measured[i] = True
            if first or not v.prefill_tps_measured.all():
                self._assume_rates(now)
        if queued_prefill_tokens is not None:
            v.prefill_queued_tokens[i] = max(0.0, queued_prefill_tokens)
            v.prefill_anchor_t[i] = now
        v.updated_at[i] = now
        self._derive(v, i)
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
        now = self._clock()
        self._rate = self.arrival_rate(now) + 1.0 / ARRIVAL_RATE_WINDOW_S
        self._rate_t = now
        v = self._view
        i = v.row.get(worker_id)
        if i is not None:
            v.num_inflight[i] += 1
            v.routed_level[i] = v.routed_level[i] * math.exp((v.routed_t[i] - now) / ARRIVAL_RATE_WINDOW_S) + 1.0
            v.routed_t[i] = now
            self._derive(v, i)

    def arrival_rate(self, now: float | None = None) -> float:
        """Requests per second this router sent to the tier, averaged over about
        ``ARRIVAL_RATE_WINDOW_S`` (exponentially decayed). Called once per decision."""
        t = self._clock() if now is None else now
        return self._rate * math.exp(-max(0.0, t - self._rate_t) / ARRIVAL_RATE_WINDOW_S)

    def completion_rate(self, now: float | None = None) -> float:
        """Completions per second this router saw (`on_completed`), decayed like `arrival_rate`."""
        t = self._clock() if now is None else now
        return self._done * math.exp(-max(0.0, t - self._done_t) / ARRIVAL_RATE_WINDOW_S)

    def mean_running_s(self, now: float | None = None) -> float:
        """Seconds a request runs on an engine (holds KV blocks) on average; 0 when unknown.

        Little's law, ``running / completion rate``, with both averaged over the same window
        (about ``ARRIVAL_RATE_WINDOW_S``, exponentially): the reported running count of every
        worker, integrated over time, over this router's completions per second. Dividing the
        running count now by the request rate of the last half minute instead overestimates it
        several times at the start of a burst, when requests run but the rate has not caught up.
        Assumes this router sees the tier's completions (one router per tier). Called once per
        decision: O(1).
        """
        t = self._clock() if now is None else now
        done = self.completion_rate(t)
        if done <= 0:
            return 0.0
        self._advance_running(t)
        return self._run_avg / done

    def _advance_running(self, now: float) -> None:
        dt = now - self._run_t
        if dt > 0:
            a = math.exp(-dt / ARRIVAL_RATE_WINDOW_S)
            self._run_avg = self._run_avg * a + self._run_sum * (1.0 - a)
            self._run_t = now

    def add_prefill(self, worker_id: str, tokens: float) -> None:
        """The router sent ``worker_id`` a request with ``tokens`` prompt tokens to compute there.

        Called once per routed request (`Scheduler.on_routed`); drains the backlog to now first.
        """
        v = self._view
        i = v.row.get(worker_id)
        if i is None:
            return
        now = self._clock()
        v.prefill_queued_tokens[i] = self._drained(v, i, now) + max(0.0, tokens)
        v.prefill_anchor_t[i] = now
        self._derive(v, i)

    def queued_prefill(self, now: float | None = None) -> np.ndarray:
        """Estimated prefill tokens queued per row at ``now`` (default: the clock), all rows.

        Workers without a measured rate drain at their peers' mean measured rate (or
        ``assumed_prefill_tps`` before any worker has measured one). For metrics and
        debugging; the ``prefill_cost`` scorer computes the same from the view's columns.
        """
        return self._view.queued_prefill(self._clock() if now is None else now)

    def _assume_rates(self, now: float) -> None:
        """Give workers without a measured rate the mean measured rate of their peers (or
        ``assumed_prefill_tps`` when none has measured one). An assumption lower than the
        peers' would make a new worker look slow, so it would never get the work that measures it."""
        v = self._view
        unmeasured = ~v.prefill_tps_measured
        if not unmeasured.any():
            return
        measured = v.prefill_tps[v.prefill_tps_measured]
        rate = float(measured.mean()) if len(measured) else self.assumed_prefill_tps
        for i in np.flatnonzero(unmeasured & (v.prefill_tps != rate)):
            v.prefill_queued_tokens[i] = self._drained(v, i, now)
            v.prefill_anchor_t[i] = now
            v.prefill_tps[i] = rate
            self._derive(v, i)

    @staticmethod
    def _derive(v: WorkerView, i: int) -> None:
        """Recompute row ``i``'s derived columns (after any of its columns changed)."""
        rate = float(v.prefill_tps[i])
        v.inv_prefill_tps[i] = 1.0 / rate if rate > 0 else 0.0
        v.prefill_drain_base[i] = v.prefill_queued_tokens[i] + rate * v.prefill_anchor_t[i]
        cap = float(v.capacity_blocks[i])
        held = float(v.kv_usage[i]) * cap
        running = float(v.num_running[i])
        requests = max(float(v.num_inflight[i]), running + float(v.num_waiting[i]))
        if running > 0:
            v.kv_base[i] = held * requests / running - cap
            v.kv_unknown[i] = 1.0
        else:
            v.kv_base[i] = -cap
            v.kv_unknown[i] = requests + 1.0
        v.kv_scale[i] = 1.0 / max(held, 1.0) if cap > 0 else 0.0

    @staticmethod
    def _drained(v: WorkerView, i: int, now: float) -> float:
        return max(0.0, float(v.prefill_queued_tokens[i] - v.prefill_tps[i] * max(0.0, now - v.prefill_anchor_t[i])))

    def on_completed(self, worker_id: str) -> None:
        """A request sent to ``worker_id`` finished, failed or was aborted (once per request)."""
        now = self._clock()
        self._done = self.completion_rate(now) + 1.0 / ARRIVAL_RATE_WINDOW_S
        self._done_t = now
        v = self._view
        i = v.row.get(worker_id)
        if i is not None and v.num_inflight[i] > 0:
            v.num_inflight[i] -= 1
            self._derive(v, i)

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
            prefill_tps=float(v.prefill_tps[i]),
            queued_prefill_tokens=float(self._drained(v, i, self._clock())),
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
