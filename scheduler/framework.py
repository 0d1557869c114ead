"""The scheduling framework: profiles of plugins, the decision loop, and the config loader.

Errors (all raised by this package on purpose derive from `SchedulerError`)::

    SchedulerError
    ├── NoEligibleWorker   route(): no worker is registered, or filters left none
    └── ConfigError        load_profiles(): bad plugin / profile configuration (also a ValueError)

One `Scheduler` serves one tier (decode or prefill): it owns nothing but references to that
tier's `WorkerRegistry` and `PrefixIndex`, one `Profile`, a seedable RNG and a metrics hook.
A decision (`Scheduler.route`):

1. restricts to ``ctx.candidates`` when given;
2. matches the request's block keys against the prefix index once (``ctx.matched_blocks``);
3. runs the filters in order, raising `NoEligibleWorker` if one leaves nothing;
4. runs the scorers, clamps each into [0, 1], and sums them with the profile's weights;
5. lets the picker choose among the eligible rows.

`route` has no side effects besides the RNG; the caller reports the actual placement with
`Scheduler.on_routed` (Ray Serve may fall back to another replica of the ranking) and its end
with `Scheduler.on_completed`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
from pydantic import ValidationError

from scheduler.context import CycleContext, RequestContext
from scheduler.index import PrefixIndex
from scheduler.plugins import PLUGIN_TYPES, Filter, MaxScorePicker, Picker, Plugin, Scorer
from scheduler.state import DEFAULT_ASSUMED_PREFILL_TPS, WorkerRegistry, WorkerView

__all__ = [
    "DEFAULT_CONFIG",
    "ConfigError",
    "Decision",
    "MetricsHook",
    "NoEligibleWorker",
    "Profile",
    "RouteReason",
    "WEIGHTED_CONFIG",
    "Scheduler",
    "SchedulerError",
    "default_profiles",
    "load_profiles",
    "make_scheduler",
]

MetricsHook = Callable[[str, str, float], None]
"""``hook(tier, plugin_name, seconds)``, called once per plugin per decision (bind to a histogram).
The prefix-index lookup is reported as plugin ``"prefix_index"``."""


class SchedulerError(Exception):
    """Base of the errors this package raises on purpose."""


class NoEligibleWorker(SchedulerError):
    """No worker can take the request: none registered, none of the candidates known, or the
    filters removed every worker. ``stage`` names what emptied the set (bounded: for metrics)."""

    def __init__(self, tier: str, request_id: str, stage: str, num_workers: int) -> None:
        self.tier = tier
        self.request_id = request_id
        self.stage = stage
        self.num_workers = num_workers
        super().__init__(f"no eligible {tier} worker for request {request_id}: {stage} left none of {num_workers}")


class ConfigError(SchedulerError, ValueError):
    """The plugin/profile configuration is invalid; the message says where and what to change."""


class RouteReason(StrEnum):
    """Why the chosen worker won (a bounded label for the routing-decisions metric)."""

    PREFIX_HIT = "prefix_hit"
    """The chosen worker caches the longest prefix of the prompt among the eligible (>= 1 block)."""
    LOAD_OVER_PREFIX = "load_over_prefix"
    """Another eligible worker caches more of the prompt, but its load made it the worse choice."""
    LOAD = "load"
    """No eligible worker caches any block of the prompt: load/headroom decided."""
    SINGLE_CANDIDATE = "single_candidate"
    """Only one worker was eligible."""


@dataclass(frozen=True, slots=True)
class Decision:
    """Result of `Scheduler.route`.

    Attributes:
        worker: the chosen worker id.
        scores: the chosen worker's clamped, unweighted score per scorer name, and ``"total"``
            (weighted sum).
        matched_blocks: leading prompt blocks the chosen worker caches (per the index).
        matched_tokens: ``matched_blocks * block_size`` (what the P/D decider needs).
        reason: see `RouteReason`.
        num_eligible: workers left after the filters.
        alternates: next best workers, best first (only if requested).
    """

    worker: str
    scores: Mapping[str, float]
    matched_blocks: int
    matched_tokens: int
    reason: RouteReason
    num_eligible: int
    alternates: tuple[str, ...] = ()


@dataclass(frozen=True)
class Profile:
    """An ordered list of filters, weighted scorers and one picker (built by `load_profiles`)."""

    name: str
    filters: tuple[Filter, ...] = ()
    scorers: tuple[tuple[Scorer, float], ...] = ()
    picker: Picker = field(default_factory=MaxScorePicker)


class Scheduler:
    """Routes requests of one tier.

    Args:
        profile: the plugins to run.
        registry: the tier's workers (membership and stats).
        index: the tier's prefix index (``None``: no prefix awareness, every match is 0).
        metrics_hook: see `MetricsHook`; ``None`` skips timing entirely.
        rng: a ``random.Random``, or a seed, for the picker's tie-break.
        speculative_ttl_s: how long `on_routed` keeps "this worker will cache these blocks"
            entries in the index (0 = never) unless a KV event confirms them first. With events:
            longer than queueing + prefill (default 30 s); in approximate mode without events:
            minutes, LRU-bounded by the worker's capacity.
        clock: seconds; the same clock as the registry's.
    """

    def __init__(
        self,
        profile: Profile,
        registry: WorkerRegistry,
        index: PrefixIndex | None = None,
        *,
        metrics_hook: MetricsHook | None = None,
        rng: random.Random | int | None = None,
        speculative_ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.profile = profile
        self.registry = registry
        self.index = index
        self.metrics_hook = metrics_hook
        self.rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        self.speculative_ttl_s = speculative_ttl_s
        self._clock = clock
        self._bits_key: tuple[int, int] = (-1, -1)
        self._bits_of_rows = np.zeros(0, dtype=np.intp)

    @property
    def tier(self) -> str:
        return self.registry.tier

    # ------------------------------------------------------------------ decisions

    def route(self, ctx: RequestContext, *, alternates: int = 0) -> Decision:
        """Choose a worker for ``ctx``. Called once per request per tier (the hot path).

        Raises `NoEligibleWorker` when no worker can take it; the caller decides the fallback
        (queue, reject, or for prefill: prefill locally on decode). ``alternates`` > 0 also
        returns that many runner-up workers (for a ranked fallback list).
        """
        hook = self.metrics_hook
        view = self.registry.view()
        n = len(view)
        if n == 0:
            raise NoEligibleWorker(self.tier, ctx.request_id, "membership", 0)
        keep = self._candidates(ctx, view)
        now = self._clock()
        reg = self.registry
        cycle = CycleContext(ctx, now, self._match(ctx, view), reg.arrival_rate(now), reg.mean_running_s(now))
        if self.index is not None:
            cycle.cached_blocks = self.index.held_blocks(self._row_bits(view, self.index))
            cycle.reuse_p = self.index.reuse_probability()
        for f in self.profile.filters:
            t0 = time.perf_counter() if hook else 0.0
            keep = f.filter(cycle, view, keep)
            if hook:
                hook(self.tier, f.name, time.perf_counter() - t0)
            if not keep.any():
                raise NoEligibleWorker(self.tier, ctx.request_id, f"filter {f.name!r}", n)
        total = np.zeros(n)
        raw: list[tuple[str, np.ndarray]] = []
        for scorer, weight in self.profile.scorers:
            t0 = time.perf_counter() if hook else 0.0
            s = np.clip(scorer.score(cycle, view, keep), 0.0, 1.0)
            if hook:
                hook(self.tier, scorer.name, time.perf_counter() - t0)
            raw.append((scorer.name, s))
            total += weight * s
        total[~keep] = -math.inf
        picker = self.profile.picker
        t0 = time.perf_counter() if hook else 0.0
        row = picker.pick(total, self.rng, lambda: view.recent_routed(now))
        if hook:
            hook(self.tier, picker.name, time.perf_counter() - t0)
        if not keep[row]:
            raise SchedulerError(f"picker {picker.name!r} chose ineligible row {row}")

        scores = {name: float(s[row]) for name, s in raw}
        scores["total"] = float(total[row])
        matched = int(cycle.matched_blocks[row])
        num_eligible = int(np.count_nonzero(keep))
        if num_eligible == 1:
            reason = RouteReason.SINGLE_CANDIDATE
        elif matched < cycle.matched_blocks.max(where=keep, initial=0):
            reason = RouteReason.LOAD_OVER_PREFIX
        elif matched > 0:
            reason = RouteReason.PREFIX_HIT
        else:
            reason = RouteReason.LOAD
        alt: tuple[str, ...] = ()
        if alternates > 0 and num_eligible > 1:
            total[row] = -math.inf
            k = min(alternates, num_eligible - 1)
            top = np.argpartition(-total, k - 1)[:k] if k < n else np.arange(n)
            top = top[np.argsort(-total[top], kind="stable")]
            alt = tuple(view.ids[i] for i in top if keep[i])[:k]
        return Decision(
            worker=view.ids[row],
            scores=scores,
            matched_blocks=matched,
            matched_tokens=matched * ctx.block_size,
            reason=reason,
            num_eligible=num_eligible,
            alternates=alt,
        )

    def eligible_counts(self, ctx: RequestContext | None = None) -> tuple[int, int]:
        """``(registered, eligible after filters)`` for this tier, e.g. for the P/D decider.

        Called at most once per request. Filters see ``ctx`` (or an empty request) and no
        prefix match.
        """
        view = self.registry.view()
        n = len(view)
        if n == 0:
            return 0, 0
        ctx = ctx or RequestContext("", (), 0, self.index.block_size if self.index else 1)
        keep = self._candidates(ctx, view)
        cycle = CycleContext(ctx, self._clock(), np.zeros(n, dtype=np.int64))
        for f in self.profile.filters:
            keep = f.filter(cycle, view, keep)
        return n, int(np.count_nonzero(keep))

    def match(self, ctx: RequestContext) -> dict[str, int]:
        """Matched prefix blocks per worker (non-zero only); for debugging and tests."""
        view = self.registry.view()
        m = self._match(ctx, view)
        return {view.ids[i]: int(m[i]) for i in np.flatnonzero(m)}

    # ------------------------------------------------------------------ feedback

    def on_routed(self, ctx: RequestContext, worker: str, decision: Decision | None = None) -> None:
        """The request ``ctx`` was actually sent to ``worker`` (once per request and tier).

        Records the in-flight count, the prompt tokens ``worker`` has to compute (its prefill
        backlog, read by the ``prefill_cost`` scorer) and speculative index entries (see
        ``speculative_ttl_s``). Pass the `Decision` that `route` returned for ``ctx``: when it
        chose ``worker``, its match is reused; otherwise (a fallback) the index is asked again.
        """
        if decision is not None and decision.worker == worker:
            matched = decision.matched_blocks
        else:
            view = self.registry.view()
            row = view.row.get(worker)
            matched = 0 if row is None else int(self._match(ctx, view)[row])
        if ctx.prompt_tokens > 0:
            self.registry.add_prefill(worker, max(1, ctx.prompt_tokens - matched * ctx.block_size))
        if self.index is not None and self.speculative_ttl_s > 0:
            self.index.record_routed(worker, ctx.block_keys, self.speculative_ttl_s)
        self.registry.on_routed(worker)

    def on_completed(self, worker: str) -> None:
        """A request previously passed to `on_routed` ended (finished, failed or aborted)."""
        self.registry.on_completed(worker)

    # ------------------------------------------------------------------ internals

    def _candidates(self, ctx: RequestContext, view: WorkerView) -> np.ndarray:
        n = len(view)
        if ctx.candidates is None:
            return np.ones(n, dtype=np.bool_)
        keep = np.zeros(n, dtype=np.bool_)
        rows = [i for i in map(view.row.get, ctx.candidates) if i is not None]
        if not rows:
            raise NoEligibleWorker(self.tier, ctx.request_id, "candidates", n)
        keep[rows] = True
        return keep

    def _row_bits(self, view: WorkerView, index: PrefixIndex) -> np.ndarray:
        """Each view row's bit in ``index`` (-1 when the index does not know the worker); cached
        until the membership of either changes."""
        key = (view.version, index.membership_version)
        if key != self._bits_key:
            self._bits_of_rows = np.array([-1 if (b := index.bit_of(w)) is None else b for w in view.ids], dtype=np.intp)
            self._bits_key = key
        return self._bits_of_rows

    def _match(self, ctx: RequestContext, view: WorkerView) -> np.ndarray:
        index = self.index
        n = len(view)
        if index is None or not ctx.block_keys:
            return np.zeros(n, dtype=np.int64)
        if ctx.block_size != index.block_size:
            raise ValueError(
                f"request {ctx.request_id}: block keys computed with block_size {ctx.block_size}, "
                f"but the {self.tier} index uses {index.block_size}"
            )
        hook = self.metrics_hook
        t0 = time.perf_counter() if hook else 0.0
        groups = index.match_groups(ctx.block_keys)
        if groups:
            self._row_bits(view, index)
            nbytes = (index.num_bits + 7) // 8
            by_bit = np.zeros(nbytes * 8 + 1, dtype=np.int64)  # last entry: rows unknown to the index
            for mask, blocks in groups:
                bits = np.unpackbits(np.frombuffer(mask.to_bytes(nbytes, "little"), dtype=np.uint8), bitorder="little")
                by_bit[:-1][bits.view(np.bool_)] = blocks
            out = by_bit[self._bits_of_rows]
        else:
            out = np.zeros(n, dtype=np.int64)
        if hook:
            hook(self.tier, "prefix_index", time.perf_counter() - t0)
        return out


# ---------------------------------------------------------------------- configuration

DEFAULT_CONFIG: dict[str, Any] = {
    "plugins": [
        {"type": "healthy"},
        {"type": "saturated"},
        {"type": "prefill_cost"},
        {"type": "max_score"},
    ],
    "profiles": {
        "decode": {
            "plugins": [
                {"ref": "healthy"},
                {"ref": "prefill_cost", "weight": 1.0},
                {"ref": "max_score"},
            ]
        },
        "prefill": {
            "plugins": [
                {"ref": "healthy"},
                {"ref": "saturated"},  # the P/D decider prefills locally when it leaves none
                {"ref": "prefill_cost", "weight": 1.0},
                {"ref": "max_score"},
            ]
        },
    },
}
"""Defaults with nothing to tune: the smallest estimated cost (queued prefill plus the request's
own uncached suffix at each worker's measured prefill rate, the wait for KV blocks, and the delay
imposed on later requests) wins; see `scheduler.plugins.prefill_cost`. No ``saturated`` filter:
a full engine is expensive in the cost itself, and a hard 0.95 cut-off lost TTFT and hit rate
in the replay (docs/scheduler.md). The prefill profile keeps it: when it leaves no prefill
worker, the P/D decider prefills on the decode engine instead (`scheduler.decider`)."""

WEIGHTED_CONFIG: dict[str, Any] = {
    "plugins": [
        {"type": "healthy"},
        {"type": "saturated"},
        {"type": "prefix"},
        {"type": "kv_headroom"},
        {"type": "queue"},
        {"type": "max_score"},
    ],
    "profiles": {
        tier: {
            "plugins": [
                {"ref": "healthy"},
                {"ref": "saturated"},
                {"ref": "prefix", "weight": 2.0},
                {"ref": "kv_headroom", "weight": 1.0},
                {"ref": "queue", "weight": 1.0},
                {"ref": "max_score"},
            ]
        }
        for tier in ("decode", "prefill")
    },
}
"""The earlier default (prefix 2, kv_headroom 1, queue 1), kept for comparison in the benchmark:
on traces with hot prefixes it piles them onto a few engines (issue 10)."""


def default_profiles() -> dict[str, Profile]:
    """`load_profiles` of `DEFAULT_CONFIG`: profiles ``decode`` and ``prefill``."""
    return load_profiles(DEFAULT_CONFIG)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _check_keys(value: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = [k for k in value if k not in allowed]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} (allowed: {list(allowed)})")


def load_profiles(config: Mapping[str, Any] | None = None) -> dict[str, Profile]:
    """Build profiles from a two-tier config; ``None`` means `DEFAULT_CONFIG`.

    ``plugins:`` is a list of ``{type, name?, params?}`` (``name`` defaults to ``type``);
    ``profiles:`` maps a profile name to ``{plugins: [{ref, weight?}]}``. Called once at start-up.
    Raises `ConfigError` naming the offending entry for: unknown keys or types, invalid params,
    duplicate plugin names, dangling or duplicate references, a weight on a non-scorer, a
    negative or non-finite weight, more than one picker. A profile without a picker gets
    ``max_score``; a scorer without a weight gets 1.
    """
    cfg = _mapping(DEFAULT_CONFIG if config is None else config, "config")
    _check_keys(cfg, ("plugins", "profiles"), "config")
    plugin_list = cfg.get("plugins") or []
    if not isinstance(plugin_list, Sequence) or isinstance(plugin_list, str):
        raise ConfigError("config.plugins: expected a list of {type, name, params}")
    plugins: dict[str, Plugin] = {}
    defined_at: dict[str, str] = {}
    for i, entry in enumerate(plugin_list):
        where = f"plugins[{i}]"
        entry = _mapping(entry, where)
        _check_keys(entry, ("type", "name", "params"), where)
        type_name = entry.get("type")
        cls = PLUGIN_TYPES.get(type_name) if isinstance(type_name, str) else None
        if cls is None:
            raise ConfigError(f"{where}: unknown plugin type {type_name!r} (known: {sorted(PLUGIN_TYPES)})")
        name = entry.get("name") or type_name
        if not isinstance(name, str):
            raise ConfigError(f"{where}: name must be a string")
        if name in plugins:
            raise ConfigError(
                f"{where}: duplicate plugin name {name!r} (first defined at {defined_at[name]}); "
                "give one of them a distinct `name:`"
            )
        params = entry.get("params") or {}
        try:
            plugins[name] = cls(name, dict(_mapping(params, f"{where}.params")))
        except ValidationError as e:
            raise ConfigError(f"{where} ({name}): invalid params: {e}") from None
        defined_at[name] = where

    profiles_cfg = _mapping(cfg.get("profiles") or {}, "config.profiles")
    if not profiles_cfg:
        raise ConfigError("config.profiles: at least one profile is required")
    profiles: dict[str, Profile] = {}
    for pname, pcfg in profiles_cfg.items():
        pwhere = f"profiles.{pname}"
        pcfg = _mapping(pcfg, pwhere)
        _check_keys(pcfg, ("plugins",), pwhere)
        refs = pcfg.get("plugins") or []
        filters: list[Filter] = []
        scorers: list[tuple[Scorer, float]] = []
        pickers: list[Picker] = []
        seen: set[str] = set()
        for j, ref_cfg in enumerate(refs):
            where = f"{pwhere}.plugins[{j}]"
            ref_cfg = _mapping(ref_cfg, where)
            _check_keys(ref_cfg, ("ref", "weight"), where)
            ref = ref_cfg.get("ref")
            if ref not in plugins:
                raise ConfigError(f"{where}: unknown plugin {ref!r} (defined: {sorted(plugins)})")
            if ref in seen:
                raise ConfigError(f"{where}: plugin {ref!r} is referenced twice in profile {pname!r}")
            seen.add(ref)
            plugin = plugins[ref]
            if "weight" in ref_cfg and not isinstance(plugin, Scorer):
                raise ConfigError(f"{where}: {ref!r} is a {plugin.kind}; only scorers take a weight")
            if isinstance(plugin, Filter):
                filters.append(plugin)
            elif isinstance(plugin, Scorer):
                weight = ref_cfg.get("weight", 1.0)
                if (
                    isinstance(weight, bool)
                    or not isinstance(weight, int | float)
                    or not math.isfinite(weight)
                    or weight < 0
                ):
                    raise ConfigError(f"{where}: weight must be a finite number >= 0, got {weight!r}")
                scorers.append((plugin, float(weight)))
            else:
                assert isinstance(plugin, Picker)
                pickers.append(plugin)
        if len(pickers) > 1:
            raise ConfigError(f"{pwhere}: more than one picker ({[p.name for p in pickers]}); keep one")
        profiles[pname] = Profile(
            name=pname,
            filters=tuple(filters),
            scorers=tuple(scorers),
            picker=pickers[0] if pickers else MaxScorePicker(),
        )
    return profiles


def make_scheduler(
    tier: str,
    block_size: int,
    *,
    profile: Profile | None = None,
    approximate: bool = False,
    speculative_ttl_s: float | None = None,
    speculative_capacity: int | None = None,
    metrics_hook: MetricsHook | None = None,
    rng: random.Random | int | None = None,
    clock: Callable[[], float] = time.monotonic,
    assumed_prefill_tps: float = DEFAULT_ASSUMED_PREFILL_TPS,
) -> Scheduler:
    """Wire a tier: a `PrefixIndex`, a `WorkerRegistry` that follows it, and a `Scheduler`.

    ``approximate=True`` is for engines that publish no KV events: routing history is the only
    source, kept 600 s by default and LRU-bounded per worker by ``speculative_capacity`` (or by
    the ``capacity_blocks`` a worker reports). Otherwise entries live up to 30 s, until the
    engine's ``BlockStored`` confirms them: long enough to cover queueing plus prefill under load
    (a 2 s TTL lost ~7 % of the hit rate in the loaded trace replay, docs/scheduler.md).
    ``profile`` defaults to ``default_profiles()[tier]`` (or the ``decode`` one).
    ``assumed_prefill_tps``: see `WorkerRegistry` (until workers report a measured rate).
    """
    if profile is None:
        defaults = default_profiles()
        profile = defaults.get(tier, defaults["decode"])
    if speculative_ttl_s is None:
        speculative_ttl_s = 600.0 if approximate else 30.0
    index = PrefixIndex(block_size, clock=clock, speculative_capacity=speculative_capacity)
    registry = WorkerRegistry(tier, index=index, clock=clock, assumed_prefill_tps=assumed_prefill_tps)
    return Scheduler(
        profile,
        registry,
        index,
        metrics_hook=metrics_hook,
        rng=rng,
        speculative_ttl_s=speculative_ttl_s,
        clock=clock,
    )
