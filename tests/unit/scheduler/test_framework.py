from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest

from scheduler import (
    DEFAULT_CONFIG,
    WEIGHTED_CONFIG,
    ConfigError,
    CycleContext,
    NoEligibleWorker,
    Profile,
    RouteReason,
    Scorer,
    WorkerView,
    load_profiles,
    make_scheduler,
)
from scheduler.plugins import (
    HealthyFilter,
    KvHeadroomScorer,
    PrefillCostScorer,
    PrefixScorer,
    QueueScorer,
    SaturatedFilter,
)

from .conftest import FakeClock, make_ctx, make_workers, tokens


def profile(*scorers: tuple[object, float], filters: tuple[object, ...] = ()) -> Profile:
    return Profile("p", filters=filters, scorers=scorers)  # type: ignore[arg-type]


WEIGHTED = load_profiles(WEIGHTED_CONFIG)["decode"]


def test_prefix_hit_wins_with_the_weighted_profile(make_tier) -> None:
    tier = make_tier(WEIGHTED, n_workers=4)
    toks = tokens(1, 32)
    tier.store("w2", toks)
    tier.registry.update("w2", kv_usage=0.6, num_running=5)  # busier, but holds the prompt
    d = tier.scheduler.route(make_ctx(toks))
    assert d.worker == "w2"
    assert (d.matched_blocks, d.matched_tokens, d.reason, d.num_eligible) == (8, 32, RouteReason.PREFIX_HIT, 4)
    assert d.scores["prefix"] == 1.0 and d.scores["queue"] == 0.0
    assert d.scores["total"] == pytest.approx(2 * 1.0 + 0.4 + 0.0)


def test_weights_decide_between_signals(make_tier) -> None:
    toks = tokens(1, 32)
    for weights, winner in (((1.0, 0.1), "w0"), ((0.1, 1.0), "w1")):
        tier = make_tier(profile((PrefixScorer(), weights[0]), (KvHeadroomScorer(), weights[1])), n_workers=2)
        tier.store("w0", toks)
        tier.registry.update("w0", kv_usage=0.9)
        assert tier.scheduler.route(make_ctx(toks)).worker == winner


def test_no_prefix_means_load_reason_and_headroom_wins(make_tier) -> None:
    tier = make_tier(WEIGHTED, n_workers=3)
    tier.registry.update("w0", kv_usage=0.5)
    tier.registry.update("w1", kv_usage=0.1)
    tier.registry.update("w2", kv_usage=0.3)
    d = tier.scheduler.route(make_ctx(tokens(1, 32)))
    assert (d.worker, d.reason, d.matched_blocks) == ("w1", RouteReason.LOAD, 0)


class Wild(Scorer):
    type_name = "wild_test"

    def score(self, ctx: CycleContext, view: WorkerView, keep: np.ndarray) -> np.ndarray:
        return np.array([5.0, -3.0, 0.5])


def test_scores_are_clamped(make_tier) -> None:
    tier = make_tier(profile((Wild(), 1.0)), n_workers=3)
    d = tier.scheduler.route(make_ctx(tokens(1, 8)))
    assert d.worker == "w0" and d.scores == {"wild_test": 1.0, "total": 1.0}


def test_ties_are_random_and_seedable(make_tier) -> None:
    tier = make_tier(n_workers=3)
    ctx = make_ctx(tokens(1, 8))
    counts = Counter(tier.scheduler.route(ctx).worker for _ in range(600))
    assert set(counts) == {"w0", "w1", "w2"} and min(counts.values()) > 150
    runs = []
    for _ in range(2):
        sched = make_tier(n_workers=3, rng=5).scheduler
        runs.append([sched.route(ctx).worker for _ in range(20)])
    assert runs[0] == runs[1] and len(set(runs[0])) > 1


def test_no_eligible_worker(make_tier) -> None:
    tier = make_tier(load_profiles(None)["prefill"])
    ctx = make_ctx(tokens(1, 8))
    with pytest.raises(NoEligibleWorker) as e:
        tier.scheduler.route(ctx)
    assert e.value.stage == "membership"
    make_workers(tier.registry, 2)
    tier.registry.update("w0", kv_usage=0.99)
    tier.registry.set_healthy("w1", False)
    with pytest.raises(NoEligibleWorker) as e:
        tier.scheduler.route(ctx)
    assert e.value.stage == "filter 'saturated'" and e.value.num_workers == 2 and e.value.tier == "decode"
    with pytest.raises(NoEligibleWorker) as e:
        tier.scheduler.route(make_ctx(tokens(1, 8), candidates=["nobody"]))
    assert e.value.stage == "candidates"


def test_candidates_restrict_and_single_candidate_reason(make_tier) -> None:
    tier = make_tier(n_workers=4)
    toks = tokens(1, 16)
    tier.store("w0", toks)
    d = tier.scheduler.route(make_ctx(toks, candidates=["w3", "unknown"]))
    assert (d.worker, d.reason, d.num_eligible) == ("w3", RouteReason.SINGLE_CANDIDATE, 1)
    d = tier.scheduler.route(make_ctx(toks, candidates=["w2", "w0"]))
    assert d.worker == "w0"


def test_metrics_hook_times_every_plugin(make_tier) -> None:
    calls: list[tuple[str, str, float]] = []
    tier = make_tier(WEIGHTED, n_workers=2, metrics_hook=lambda *a: calls.append(a))
    tier.store("w0", tokens(1, 8))
    tier.scheduler.route(make_ctx(tokens(1, 8)))
    names = [c[1] for c in calls]
    assert names == ["prefix_index", "healthy", "saturated", "prefix", "kv_headroom", "queue", "max_score"]
    assert all(c[0] == "decode" and c[2] >= 0 for c in calls)


def test_on_routed_makes_the_next_request_sticky(make_tier, clock: FakeClock) -> None:
    tier = make_tier(n_workers=8, speculative_ttl_s=2.0)
    ctx = make_ctx(tokens(1, 64))
    first = tier.scheduler.route(ctx)
    tier.scheduler.on_routed(ctx, first.worker)
    follow_up = make_ctx(tokens(1, 64) + tokens(2, 16), request_id="r2")
    assert tier.scheduler.route(follow_up).worker == first.worker
    assert tier.registry.get(first.worker).num_inflight == 1  # type: ignore[union-attr]
    tier.scheduler.on_completed(first.worker)
    assert tier.registry.get(first.worker).num_inflight == 0  # type: ignore[union-attr]
    clock.advance(3)  # no event confirmed it: the speculation expires
    assert tier.scheduler.match(follow_up) == {}


def test_alternates_are_ranked(make_tier) -> None:
    tier = make_tier(profile((KvHeadroomScorer(), 1.0)), n_workers=5)
    for i, usage in enumerate([0.5, 0.1, 0.9, 0.3, 0.2]):
        tier.registry.update(f"w{i}", kv_usage=usage)
    d = tier.scheduler.route(make_ctx(tokens(1, 8)), alternates=3)
    assert d.worker == "w1" and d.alternates == ("w4", "w3", "w0")
    d = tier.scheduler.route(make_ctx(tokens(1, 8), candidates=["w2", "w0"]), alternates=3)
    assert d.worker == "w0" and d.alternates == ("w2",)


def test_block_size_mismatch_is_a_broken_invariant(make_tier) -> None:
    from scheduler import RequestContext

    tier = make_tier(n_workers=1)
    with pytest.raises(ValueError, match="block_size"):
        tier.scheduler.route(RequestContext.from_tokens("r", tokens(1, 64), 16))


def test_eligible_counts(make_tier) -> None:
    tier = make_tier(load_profiles(None)["prefill"], n_workers=3)
    tier.registry.update("w0", kv_usage=0.99)
    assert tier.scheduler.eligible_counts() == (3, 2)


def test_make_scheduler_modes() -> None:
    clock = FakeClock()
    s = make_scheduler("prefill", 4, approximate=True, speculative_capacity=3, rng=1, clock=clock)
    assert s.speculative_ttl_s == 600 and s.profile.name == "prefill"
    s.registry.sync(["a", "b"])
    ctx = make_ctx(tokens(1, 32))
    s.on_routed(ctx, "b")
    assert s.match(ctx) == {}  # capacity 3 kept only the last 3 of 8 blocks: no prefix
    assert make_scheduler("decode", 4).speculative_ttl_s == 30.0


# ---------------------------------------------------------------------- config loader


def test_default_profiles() -> None:
    profiles = load_profiles(None)
    assert set(profiles) == {"decode", "prefill"}
    p = profiles["decode"]
    assert [type(f) for f in p.filters] == [HealthyFilter]
    assert [(type(s), w) for s, w in p.scorers] == [(PrefillCostScorer, 1.0)]
    assert p.picker.name == "max_score"
    assert [type(f) for f in profiles["prefill"].filters] == [HealthyFilter, SaturatedFilter]
    w = load_profiles(WEIGHTED_CONFIG)["prefill"]
    assert [type(f) for f in w.filters] == [HealthyFilter, SaturatedFilter]
    assert [(type(s), x) for s, x in w.scorers] == [(PrefixScorer, 2.0), (KvHeadroomScorer, 1.0), (QueueScorer, 1.0)]


def test_named_plugins_params_and_implicit_picker() -> None:
    cfg = {
        "plugins": [
            {"type": "saturated", "name": "strict", "params": {"kv_usage_threshold": 0.5}},
            {"type": "prefix"},
        ],
        "profiles": {"decode": {"plugins": [{"ref": "strict"}, {"ref": "prefix"}]}},
    }
    p = load_profiles(cfg)["decode"]
    assert p.filters[0].name == "strict" and p.filters[0].params.kv_usage_threshold == 0.5  # type: ignore[attr-defined]
    assert p.scorers[0][1] == 1.0 and p.picker.type_name == "max_score"


def _with(mutate) -> dict:
    cfg = copy.deepcopy(WEIGHTED_CONFIG)  # the longer config: more entries to break
    mutate(cfg)
    return cfg


def _add_second_picker(c: dict) -> None:
    c["plugins"].append({"type": "max_score", "name": "p2"})
    c["profiles"]["decode"]["plugins"].append({"ref": "p2"})


def _ref(c: dict, tier: str = "decode") -> list:
    return c["profiles"][tier]["plugins"]


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda c: c["plugins"].append({"type": "prefix"}), r"plugins\[6\]: duplicate plugin name 'prefix'"),
        (lambda c: c["plugins"].append({"type": "nope"}), r"plugins\[6\]: unknown plugin type 'nope'"),
        (
            lambda c: c["plugins"][1].update(params={"kv_usage_threshold": 2}),
            r"plugins\[1\] \(saturated\): invalid params",
        ),
        (lambda c: c["plugins"][0].update(parms={}), r"plugins\[0\]: unknown key"),
        (lambda c: _ref(c).append({"ref": "prefx"}), r"profiles.decode.plugins\[6\]: unknown plugin 'prefx'"),
        (lambda c: _ref(c).append({"ref": "queue"}), r"plugin 'queue' is referenced twice"),
        (lambda c: _ref(c, "prefill")[0].update(weight=1), r"'healthy' is a filter; only scorers take a weight"),
        (lambda c: _ref(c)[2].update(weight=-1), r"weight must be a finite number >= 0"),
        (lambda c: _ref(c)[2].update(weight="2"), r"weight must be a finite number"),
        (_add_second_picker, r"profiles.decode: more than one picker"),
        (lambda c: c.update(profiles={}), r"at least one profile"),
        (lambda c: c.update(extra=1), r"config: unknown key"),
    ],
)
def test_config_errors(mutate, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_profiles(_with(mutate))


# ---------------------------------------------------------------------- the cost-based default


def test_default_follows_the_prefix_while_its_queue_is_cheaper_than_recomputing(make_tier) -> None:
    tier = make_tier(n_workers=3)
    for w in ("w0", "w1", "w2"):
        tier.registry.update(w, prefill_tps=100.0)  # tokens/s, measured
    toks = tokens(1, 64)
    tier.store("w1", toks[:48])  # w1 caches 48 of 64 tokens
    ctx = make_ctx(toks)
    d = tier.scheduler.route(ctx)
    assert (d.worker, d.reason) == ("w1", RouteReason.PREFIX_HIT)  # 16 tokens there vs 64 elsewhere
    tier.scheduler.on_routed(make_ctx(tokens(2, 40), request_id="other"), "w1")  # 40 more queued on w1
    assert tier.scheduler.route(ctx).worker == "w1"  # 40 + 16 < 64
    tier.scheduler.on_routed(make_ctx(tokens(3, 40), request_id="more"), "w1")  # 80 + 16 > 64
    d = tier.scheduler.route(ctx)
    assert d.worker in ("w0", "w2") and d.reason == RouteReason.LOAD_OVER_PREFIX


def test_default_weighs_cache_and_queue_at_each_workers_measured_rate(make_tier) -> None:
    tier = make_tier(n_workers=2)
    toks = tokens(1, 64)
    tier.store("w0", toks[:32])
    tier.registry.update("w0", prefill_tps=100.0)  # 32 uncached tokens: 0.32 s
    tier.registry.update("w1", prefill_tps=400.0)  # nothing cached, 4x faster: 64 tokens, 0.16 s
    assert tier.scheduler.route(make_ctx(toks)).worker == "w1"
    tier.registry.update("w1", prefill_tps=150.0)  # 0.43 s
    assert tier.scheduler.route(make_ctx(toks)).worker == "w0"


def test_on_routed_charges_the_uncached_part_to_the_worker_it_went_to(make_tier, clock: FakeClock) -> None:
    tier = make_tier(n_workers=2)
    for w in ("w0", "w1"):
        tier.registry.update(w, prefill_tps=10.0)
    toks = tokens(1, 32)
    tier.store("w0", toks[:24])
    ctx = make_ctx(toks)
    d = tier.scheduler.route(ctx)
    tier.scheduler.on_routed(ctx, d.worker, d)
    tier.scheduler.on_routed(make_ctx(toks, request_id="r2"), "w1")  # a fallback: no decision for w1
    assert [round(w.queued_prefill_tokens) for w in tier.registry] == [8, 32]
    clock.advance(0.5)  # 5 tokens drained on each
    assert [round(w.queued_prefill_tokens) for w in tier.registry] == [3, 27]


def test_new_prefixes_split_evenly_between_idle_workers(make_tier, clock: FakeClock) -> None:
    """Every idle worker that does not cache a prompt costs the same; the tie goes to the one
    sent fewer requests lately, so 12 new prefixes split 6/6 (at random, 4/8 or worse about two
    times in five), and a prefix's later requests still follow it."""
    for seed in range(5):
        tier = make_tier(n_workers=2, rng=seed)
        owner: dict[int, str] = {}
        for p in range(12):
            ctx = make_ctx(tokens(100 + p, 64), request_id=f"new-{p}")
            d = tier.scheduler.route(ctx)
            tier.scheduler.on_routed(ctx, d.worker)
            tier.store(d.worker, tokens(100 + p, 64))
            tier.scheduler.on_completed(d.worker)
            owner[p] = d.worker
            clock.advance(1.0)  # its prefill long done: both workers idle again
        assert Counter(owner.values()) == {"w0": 6, "w1": 6}, (seed, owner)
        for p in range(12):  # follow-ups stay with their prefix
            ctx = make_ctx(tokens(100 + p, 64) + tokens(500 + p, 8), request_id=f"again-{p}")
            assert tier.scheduler.route(ctx).worker == owner[p]


def test_a_new_prefix_goes_to_the_worker_with_the_smaller_recent_share(make_tier, clock: FakeClock) -> None:
    tier = make_tier(n_workers=2, rng=0)
    hot = tokens(1, 64)
    tier.store("w0", hot)
    for i in range(6):  # w0 serves a hot prefix: six requests lately, w1 none
        ctx = make_ctx(hot + tokens(10 + i, 8), request_id=f"hot-{i}")
        d = tier.scheduler.route(ctx)
        assert d.worker == "w0"
        tier.scheduler.on_routed(ctx, d.worker)
        tier.scheduler.on_completed(d.worker)
        clock.advance(1.0)
    picks = set()
    for p in range(3):  # new prefixes: w1 has the smaller share until it has caught up
        ctx = make_ctx(tokens(200 + p, 64), request_id=f"new-{p}")
        d = tier.scheduler.route(ctx)
        tier.scheduler.on_routed(ctx, d.worker)
        tier.scheduler.on_completed(d.worker)
        picks.add(d.worker)
        clock.advance(1.0)
    assert picks == {"w1"}
