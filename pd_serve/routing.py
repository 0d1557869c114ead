"""Ray Serve request routers that run pd_serve's scheduler, one per tier.

``PrefixAwareRouter`` is set on both engine deployments (``request_router_config``). Ray
Serve instantiates it inside each caller's process: for decode in the ingress, for prefill
in every decode replica. It keeps the tier's prefix index up to date from the engines' own KV
events (ZMQ, one subscriber per replica, endpoint published in the replica's routing stats),
follows replica membership, reads KV usage and queues from the routing stats, and ranks the
candidates with ``scheduler.Scheduler.route``.

The request being routed carries a ``RoutingHint`` (its prompt token ids, rendered once by the
ingress) as its third positional argument; requests without one fall back to load only.
Replicas the hint excludes (they already failed the request) are chosen only when no other is.

``RoundRobinRouter`` is the baseline the routing benchmark compares against.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from pd_serve import metrics as m
from pd_serve import routing_metrics
from pd_serve.protocol import ReplicaStats, RoutingHint
from scheduler import (
    KVEventSubscriber,
    NoEligibleWorker,
    RequestContext,
    SubscriberStats,
    load_profiles,
    make_scheduler,
)

logger = logging.getLogger(__name__)


def _hint(pending: PendingRequest | None) -> RoutingHint | None:
    if pending is None:
        return None
    for a in pending.args:
        if isinstance(a, RoutingHint):
            return a
    return None


def _without_excluded(replicas: list[RunningReplica], hint: RoutingHint | None) -> list[RunningReplica]:
    """Drop the replicas that already failed this request, unless no other is left.

    Never returns an empty list for a non-empty input: Serve calls ``choose_replicas`` again at
    once, without yielding, when it gets no candidate (``should_backoff`` is False without
    locality routing), so "none" would spin the router's event loop and stall every handle
    in the process. Retrying a replica that failed is the lesser evil: a dead one fails its
    reservation and Serve drops it; a live one may well succeed."""
    if hint is None:
        return replicas
    if hint.pin:  # a channel call: its replica, or (gone) anyone, who will refuse it
        return [r for r in replicas if r.replica_id.unique_id == hint.pin] or replicas
    if not hint.exclude:
        return replicas
    kept = [r for r in replicas if r.replica_id.unique_id not in hint.exclude]
    return kept or replicas


def _plugin_timer(tier: str, plugin: str, seconds: float) -> None:
    m.SCHEDULER_PLUGIN_SECONDS.labels(tier, plugin).observe(seconds)


class PrefixAwareRouter(FIFOMixin, RequestRouter):
    """Ranks a tier's replicas by the scheduler's profile: by default the estimated cost of
    prefill there, queue and cached prefix included (see docs/scheduler.md)."""

    def initialize_state(self, tier: str = "decode", block_size: int = 16,
                         profiles: dict[str, Any] | None = None, **_: Any) -> None:
        profile = load_profiles(profiles)[tier] if profiles else None
        self.tier = tier
        self.block_size = block_size
        self.sched = make_scheduler(tier, block_size, profile=profile, metrics_hook=_plugin_timer)
        self._subs: dict[str, KVEventSubscriber] = {}
        self.retired_event_stats = SubscriberStats()  # counts of subscribers stopped so far
        routing_metrics.track(self)
        self._pending: dict[str, tuple[RequestContext, Any]] = {}  # chosen, not yet routed
        self._inflight: dict[str, str] = {}  # routed, not yet completed -> worker
        self._reports: dict[str, dict] = {}  # the routing-stats report last applied, per replica

    # -- membership and stats -------------------------------------------------------------
    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        ids = {r.replica_id.unique_id for r in replicas}
        self.sched.registry.sync(ids)
        for rid in set(self._reports) - ids:
            del self._reports[rid]
        for rid in set(self._subs) - ids:
            sub = self._subs.pop(rid)
            sub.stop()
            routing_metrics.add_stats(self.retired_event_stats, sub.stats)

    def _refresh(self, replicas: list[RunningReplica]) -> None:
        for r in replicas:
            rid = r.replica_id.unique_id
            if rid not in self.sched.registry:
                self.sched.registry.add(rid)
            raw = r.routing_stats
            if not raw or self._reports.get(rid) is raw:
                continue  # nothing new since the last decision: keep the router's own estimate
            self._reports[rid] = raw  # Serve replaces the dict on every poll: apply each report once
            stats = ReplicaStats.from_dict(raw)
            # prefill_tps / queued_prefill_tokens: optional; without them the router's own
            # backlog estimate and the peers' (or assumed) rate stand in (docs/scheduler.md)
            self.sched.registry.update(
                rid, kv_usage=stats.kv_usage, num_running=stats.num_running, num_waiting=stats.num_waiting,
                capacity_blocks=stats.capacity_blocks, prefill_tps=stats.prefill_tps,
                queued_prefill_tokens=stats.queued_prefill_tokens)
            if stats.kv_events_endpoint and rid not in self._subs:
                # with the engine's replay socket, a new or restarted router rebuilds the
                # engine's blocks from vLLM's replay buffer at once (warm start)
                replay = stats.kv_events_replay_endpoint
                sub = KVEventSubscriber(self.sched.index, stats.kv_events_endpoint, rid, topic=stats.kv_events_topic,
                                        replay_endpoint=replay)
                sub.start(warm=replay is not None)
                self._subs[rid] = sub

    # -- routing ----------------------------------------------------------------------------
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        self._refresh(candidate_replicas)
        hint = _hint(pending_request)
        candidate_replicas = _without_excluded(candidate_replicas, hint)
        if hint is None or not hint.token_ids or not candidate_replicas or hint.pin:
            return [candidate_replicas]
        t0 = time.perf_counter()
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ctx = RequestContext(hint.request_id, hint.keys_for(self.block_size), len(hint.token_ids),
                             self.block_size, by_id.keys())
        try:
            d = self.sched.route(ctx, alternates=len(by_id) - 1)
        except NoEligibleWorker:
            m.ROUTING_DECISIONS.labels(self.tier, "no_eligible").inc()
            return [candidate_replicas]  # all saturated: let Serve's queueing and backoff decide
        m.SCHEDULING_SECONDS.labels(self.tier).observe(time.perf_counter() - t0)
        if pending_request is not None:  # Serve may ask again for the same request: count once, when routed
            self._pending[pending_request.metadata.internal_request_id] = (ctx, d)
        ranked = [[by_id[d.worker]]] + [[by_id[w]] for w in d.alternates if w in by_id]
        rest = [r for rid, r in by_id.items() if rid != d.worker and rid not in d.alternates]
        return ranked + ([rest] if rest else [])

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        rid = pending_request.metadata.internal_request_id
        routed = self._pending.pop(rid, None)
        if routed is None:
            return
        ctx, d = routed
        worker = replica_id.unique_id
        self.sched.on_routed(ctx, worker, d)
        self._inflight[rid] = worker
        first_choice = worker == d.worker
        m.ROUTING_DECISIONS.labels(self.tier, str(d.reason) if first_choice else "fallback").inc()
        m.PREFIX_HIT_TOKENS.labels(self.tier).inc(min(d.matched_tokens, ctx.prompt_tokens) if first_choice else 0)
        m.PROMPT_TOKENS_ROUTED.labels(self.tier).inc(ctx.prompt_tokens)

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        self._pending.pop(internal_request_id, None)
        worker = self._inflight.pop(internal_request_id, None)
        if worker is not None:
            self.sched.on_completed(worker)


class RoundRobinRouter(FIFOMixin, RequestRouter):
    """Baseline: replicas in turn, ignoring prefixes and load (benchmarks only)."""

    def initialize_state(self, **_: Any) -> None:
        self._counter = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        candidate_replicas = _without_excluded(candidate_replicas, _hint(pending_request))
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        i = next(self._counter) % len(ordered)
        return [[ordered[i]]] + [[r] for r in ordered[i + 1:] + ordered[:i]]


class PowerOfTwoRouter(PowerOfTwoChoicesRequestRouter):
    """Ray Serve's default router (``router.policy: ray_default``), which also sends a pinned
    call (an ingress's stream channel) to its replica."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        hint = _hint(pending_request)
        if hint is not None and hint.pin:
            return [_without_excluded(candidate_replicas, hint)]
        return await super().choose_replicas(candidate_replicas, pending_request)
