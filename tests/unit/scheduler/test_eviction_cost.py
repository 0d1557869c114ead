"""Eviction awareness and the measured running time in the ``prefill_cost`` model (issue 10)."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler import CycleContext, PrefixIndex, RequestContext, WorkerRegistry, make_scheduler
from scheduler.plugins import PrefillCostScorer
from scheduler.plugins.prefill_cost import cost_s, evicted_work_s

from .conftest import BLOCK, FakeClock, make_workers, store_prefix, tokens


# ---------------------------------------------------------------------- index: held blocks, reuse


def test_held_blocks_follow_stores_and_removals(clock: FakeClock) -> None:
    index = PrefixIndex(BLOCK, clock=clock)
    ha = store_prefix(index, "a", tokens(1, 16))  # 4 blocks
    store_prefix(index, "b", tokens(1, 8))  # 2 of the same blocks
    bits = np.array([index.bit_of("a"), index.bit_of("b"), -1], dtype=np.intp)
    assert index.held_blocks(bits).tolist() == [4, 2, 0]  # -1: a row the index does not know
    index.apply_removed("a", ha[2:])
    assert index.held_blocks(bits).tolist() == [2, 2, 0]
    index.apply_removed("a", ha[1:2])  # one at a time, as vLLM publishes them
    assert index.held_blocks(bits).tolist() == [1, 2, 0]
    index.apply_cleared("b")
    assert index.held_blocks(bits).tolist() == [1, 0, 0]
    for i in range(40):  # many workers: the per-bit array grows, unknown rows still read 0
        store_prefix(index, f"w{i}", tokens(100 + i, 4))
    assert index.held_blocks(np.array([index.bit_of("w39"), -1], dtype=np.intp)).tolist() == [1, 0]


def test_reuse_probability_counts_blocks_computed_again_after_the_last_copy_went(clock: FakeClock) -> None:
    index = PrefixIndex(BLOCK, clock=clock)
    assert index.reuse_probability() == 0.0  # nothing evicted yet: unknown
    hot, cold = tokens(1, 8), tokens(2, 8)
    h_hot = store_prefix(index, "a", hot)
    h_cold = store_prefix(index, "a", cold)
    store_prefix(index, "b", tokens(3, 64))  # the tier holds more keys than it evicts below
    index.apply_removed("a", h_hot)
    index.apply_removed("a", h_cold)
    assert index.stats.evicted_blocks == 4 and index.reuse_probability() == 0.0
    store_prefix(index, "b", hot)  # the hot blocks are computed again, on another worker
    assert index.stats.refetched_blocks == 2
    assert index.reuse_probability() == pytest.approx(0.5, rel=0.1)
    # a block evicted from one worker while another still holds it is not lost to the tier
    h_b = store_prefix(index, "c", tokens(3, 8))
    index.apply_removed("c", h_b)
    store_prefix(index, "c", tokens(3, 8))
    assert index.stats.refetched_blocks == 2


def test_routing_a_lost_prefix_counts_as_computing_it_again(clock: FakeClock) -> None:
    index = PrefixIndex(BLOCK, clock=clock)
    toks = tokens(1, 8)
    store_prefix(index, "b", tokens(2, 64))
    index.apply_removed("a", store_prefix(index, "a", toks))
    index.record_routed("b", RequestContext.from_tokens("r", toks, BLOCK).block_keys, ttl_s=30.0)
    assert index.stats.refetched_blocks == 2


# ---------------------------------------------------------------------- registry: running time


def test_mean_running_s_is_littles_law_over_one_window(clock: FakeClock) -> None:
    reg = WorkerRegistry("decode", clock=clock)
    make_workers(reg, 2)
    assert reg.mean_running_s() == 0.0  # no completion seen: unknown
    # steady state: 8 running in all, 2 completions a second -> 4 s each
    for _ in range(600):
        clock.advance(0.5)
        reg.update("w0", num_running=5)
        reg.update("w1", num_running=3)
        reg.on_completed("w0")
    assert reg.mean_running_s() == pytest.approx(4.0, rel=0.02)


def test_mean_running_s_recovers_when_a_burst_starts(clock: FakeClock) -> None:
    reg = WorkerRegistry("decode", clock=clock)
    make_workers(reg, 1)
    for _ in range(120):  # a burst: 10 running, 2.5 completions a second -> 4 s
        clock.advance(0.4)
        reg.update("w0", num_running=10)
        reg.on_completed("w0")
        reg.on_routed("w0")
    reg.update("w0", num_running=0)
    clock.advance(90.0)  # a quiet minute and a half
    reg.update("w0", num_running=30)  # the next burst starts: many running, none finished yet
    clock.advance(2.0)
    measured = reg.mean_running_s()
    naive = 30 / reg.arrival_rate()  # the running count now over the decayed request rate
    # both halves of the ratio lag together: still high while the burst's completions lag, but
    # an order of magnitude closer to the 4 s than the running count over the request rate
    assert measured * 10 < naive
    for _ in range(100):  # the burst goes on: back to about 4 s
        clock.advance(0.4)
        reg.update("w0", num_running=10)
        reg.on_completed("w0")
    assert reg.mean_running_s() == pytest.approx(4.0, rel=0.2)


# ---------------------------------------------------------------------- prefill_cost: evictions


def _cycle(reg: WorkerRegistry, clock: FakeClock, matched: list[int], held: list[float], p: float, prompt: int = 64) -> CycleContext:
    ctx = RequestContext("r", list(range(prompt // BLOCK)), prompt, BLOCK)
    return CycleContext(
        ctx, clock(), np.array(matched, dtype=np.int64), cached_blocks=np.array(held, dtype=np.float64), reuse_p=p
    )


def test_evicted_work_counts_the_blocks_pushed_out_of_a_full_cache(clock: FakeClock) -> None:
    reg = WorkerRegistry("decode", clock=clock)
    make_workers(reg, 4, prefill_tps=100.0, capacity_blocks=100)
    reg.update("w3", capacity_blocks=0)  # unknown capacity: no estimate
    # 16 blocks each; w0 caches 12 of them. Held: full, full, room for 10, full (unknown cap)
    c = _cycle(reg, clock, [12, 0, 0, 0], [100, 100, 90, 100], p=0.5)
    ev = evicted_work_s(c, reg.view())
    assert ev is not None
    # evicted blocks x p / (1 - p) recomputations x 4 tokens / 100 tokens/s
    assert ev.tolist() == pytest.approx([4 * 1 * 0.04, 16 * 1 * 0.04, 6 * 1 * 0.04, 0.0])
    assert evicted_work_s(_cycle(reg, clock, [0] * 4, [100] * 4, p=0.0), reg.view()) is None
    no_index = CycleContext(c.request, clock(), c.matched_blocks)
    assert evicted_work_s(no_index, reg.view()) is None


def test_eviction_cost_keeps_a_prefix_where_it_is_when_evicted_blocks_come_back(clock: FakeClock) -> None:
    reg = WorkerRegistry("decode", clock=clock)
    make_workers(reg, 2, prefill_tps=100.0, capacity_blocks=100)
    reg.add_prefill("w0", 80)  # w0 caches 15 of 16 blocks but is busy: 0.8 s queued + 0.04 s
    keep = np.ones(2, dtype=bool)
    # w1 is idle but must compute (and insert) all 16 blocks: 0.64 s, plus 16 evictions
    cold = _cycle(reg, clock, [15, 0], [100, 100], p=0.05)  # evicted blocks rarely come back
    assert np.argmax(PrefillCostScorer().score(cold, reg.view(), keep)) == 1
    hot = _cycle(reg, clock, [15, 0], [100, 100], p=0.6)  # 1.5 recomputations per eviction
    assert np.argmax(PrefillCostScorer().score(hot, reg.view(), keep)) == 0
    assert cost_s(hot, reg.view(), keep)[1] > cost_s(cold, reg.view(), keep)[1]


def test_scheduler_fills_the_eviction_inputs(clock: FakeClock) -> None:
    s = make_scheduler("decode", BLOCK, clock=clock, rng=0)
    s.registry.sync(["a", "b"])
    seen: list[CycleContext] = []

    class Spy(PrefillCostScorer):
        def score(self, ctx: CycleContext, view, keep):  # type: ignore[no-untyped-def]
            seen.append(ctx)
            return super().score(ctx, view, keep)

    from dataclasses import replace

    s.profile = replace(s.profile, scorers=((Spy(), 1.0),))
    store_prefix(s.index, "a", tokens(1, 16))
    s.index.apply_removed("a", store_prefix(s.index, "a", tokens(2, 8)))
    s.route(RequestContext.from_tokens("r", tokens(2, 8), BLOCK))
    (ctx,) = seen
    assert ctx.cached_blocks is not None and ctx.cached_blocks.tolist() == [4, 0]
    assert ctx.reuse_p == 0.0  # evicted, not computed again yet


def test_held_blocks_count_routed_blocks_until_confirmed_or_expired(clock: FakeClock) -> None:
    index = PrefixIndex(BLOCK, clock=clock)
    toks = tokens(1, 16)
    index.record_routed("a", RequestContext.from_tokens("r", toks, BLOCK).block_keys, ttl_s=10.0)
    bit = np.array([index.bit_of("a")], dtype=np.intp)
    assert index.held_blocks(bit).tolist() == [4]  # routed there: about to be cached
    store_prefix(index, "a", toks)  # confirmed: counted once
    assert index.held_blocks(bit).tolist() == [4]
    index.record_routed("a", RequestContext.from_tokens("r2", tokens(2, 8), BLOCK).block_keys, ttl_s=10.0)
    assert index.held_blocks(bit).tolist() == [6]
    clock.advance(11.0)
    index.record_routed("a", [], ttl_s=10.0)
    index.match_groups([1])  # collects the expired entries
    assert index.held_blocks(bit).tolist() == [4]
