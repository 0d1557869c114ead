"""The routers' scheduler state as Prometheus metrics (``pd_serve_scheduler_*``, ``pd_serve_kv_event_*``).

The prefix index, the KV-event subscribers and the worker registry keep plain counters and
columns (`scheduler.IndexStats`, `scheduler.SubscriberStats`, `scheduler.WorkerRegistry`);
`scheduler/` never imports prometheus_client. This module reads them at scrape time through a
custom collector, so nothing is added to the routing path. One collector per process, over every
live `pd_serve.routing.PrefixAwareRouter` in it (decode routing runs in the ingress, prefill
routing in each decode replica), summed per ``tier``.

Families (documented in docs/metrics.md):

* ``pd_serve_scheduler_index_blocks{tier}``: gauge, block keys in the prefix index;
* ``pd_serve_scheduler_index_blocks_dropped_total{tier,reason}``: events' blocks the index did not
  apply (``orphan``, ``block_size_mismatch``, ``misaligned``, ``unknown_removal``);
* ``pd_serve_kv_event_batches_total{tier}`` / ``pd_serve_kv_events_total{tier}``: received and applied;
* ``pd_serve_kv_event_gaps_total{tier}``, ``pd_serve_kv_event_missed_batches_total{tier}``,
  ``pd_serve_kv_event_replayed_batches_total{tier}``, ``pd_serve_kv_event_restarts_total{tier}``,
  ``pd_serve_kv_event_decode_errors_total{tier}``;
* ``pd_serve_scheduler_queued_prefill_tokens{tier,worker}`` and
  ``pd_serve_scheduler_prefill_tokens_per_second{tier,worker}``: the router's estimate of the
  prefill backlog on each replica, and the rate it assumes for it (measured or its peers' mean).
  ``worker`` is a replica id: bounded by the replica count.

Counters never go back: a subscriber stopped because its replica left adds its counts to the
router's ``retired_event_stats`` first.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from scheduler import SubscriberStats

if TYPE_CHECKING:
    from pd_serve.routing import PrefixAwareRouter

_routers: weakref.WeakSet[PrefixAwareRouter] = weakref.WeakSet()
_lock = threading.Lock()
_registered = False

DROP_REASONS = {
    "orphan": "orphan_blocks",
    "block_size_mismatch": "block_size_mismatch",
    "misaligned": "misaligned_events",
    "unknown_removal": "unknown_removals",
}
EVENT_COUNTERS = {  # family (without _total) -> SubscriberStats field
    "pd_serve_kv_event_batches": ("batches", "KV-event batches the routers received from engines"),
    "pd_serve_kv_events": ("events", "KV events (BlockStored, BlockRemoved, AllBlocksCleared) the routers applied"),
    "pd_serve_kv_event_gaps": ("gaps", "Sequence jumps forward in an engine's KV-event stream (batches lost)"),
    "pd_serve_kv_event_missed_batches": ("missed_batches", "KV-event batches lost in those gaps, before replay"),
    "pd_serve_kv_event_replayed_batches": ("replayed_batches", "KV-event batches fetched again from an engine's replay socket"),
    "pd_serve_kv_event_restarts": ("restarts", "Engines whose KV-event sequence went back (restarted): their entries were cleared"),
    "pd_serve_kv_event_decode_errors": ("decode_errors", "KV-event messages the routers could not decode"),
}


def add_stats(into: SubscriberStats, other: SubscriberStats) -> None:
    """``into += other``, field by field (to retire a stopped subscriber's counts)."""
    for f in fields(SubscriberStats):
        setattr(into, f.name, getattr(into, f.name) + getattr(other, f.name))


def track(router: PrefixAwareRouter) -> None:
    """Export ``router``'s scheduler state from now on (called once, from its initialize_state)."""
    global _registered
    with _lock:
        _routers.add(router)
        if not _registered:
            REGISTRY.register(SchedulerCollector())
            _registered = True


class SchedulerCollector:
    """prometheus_client collector over the live routers of this process (see module docstring)."""

    def collect(self) -> Iterator[Metric]:
        routers = list(_routers)
        tiers = sorted({r.tier for r in routers})
        blocks = GaugeMetricFamily(
            "pd_serve_scheduler_index_blocks", "Block keys in the routers' prefix index, by tier.", labels=["tier"]
        )
        dropped = CounterMetricFamily(
            "pd_serve_scheduler_index_blocks_dropped",
            "Blocks of KV events the prefix index did not apply, by tier and reason.",
            labels=["tier", "reason"],
        )
        events = {
            name: CounterMetricFamily(name, doc + ", by tier.", labels=["tier"])
            for name, (_, doc) in EVENT_COUNTERS.items()
        }
        queued = GaugeMetricFamily(
            "pd_serve_scheduler_queued_prefill_tokens",
            "Prefill tokens the router estimates are queued on each replica (routed minus drained at its rate, "
            "re-anchored by the replica's reports).",
            labels=["tier", "worker"],
        )
        rate = GaugeMetricFamily(
            "pd_serve_scheduler_prefill_tokens_per_second",
            "Prefill rate the router uses for each replica: measured by the engine, else its peers' mean.",
            labels=["tier", "worker"],
        )
        for tier in tiers:
            mine = [r for r in routers if r.tier == tier]
            blocks.add_metric([tier], float(sum(len(r.sched.index) for r in mine if r.sched.index is not None)))
            idx: dict[str, int] = dict.fromkeys(DROP_REASONS.values(), 0)
            ev = SubscriberStats()
            for r in mine:
                if r.sched.index is not None:
                    for k in idx:
                        idx[k] += getattr(r.sched.index.stats, k)
                add_stats(ev, r.retired_event_stats)
                for sub in list(r._subs.values()):
                    add_stats(ev, sub.stats)
                reg = r.sched.registry
                view = reg.view()
                backlog = reg.queued_prefill()
                for i, w in enumerate(view.ids):
                    queued.add_metric([tier, w], float(backlog[i]))
                    rate.add_metric([tier, w], float(view.prefill_tps[i]))
            for reason, field in DROP_REASONS.items():
                dropped.add_metric([tier, reason], float(idx[field]))
            for name, (field, _) in EVENT_COUNTERS.items():
                events[name].add_metric([tier], float(getattr(ev, field)))
        yield blocks
        yield dropped
        yield from events.values()
        yield queued
        yield rate

    def describe(self) -> list[Any]:
        return []  # families vary with the routers present: collect at scrape time only
