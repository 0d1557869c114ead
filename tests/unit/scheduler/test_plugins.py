from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from pydantic import ValidationError

from scheduler import CycleContext, RequestContext, WorkerRegistry
from scheduler.plugins import (
    HealthyFilter,
    KvHeadroomScorer,
    MaxScorePicker,
    PrefillCostScorer,
    PrefixScorer,
    QueueScorer,
    SaturatedFilter,
)

from scheduler.plugins.prefill_cost import estimated_wait_s

from .conftest import FakeClock, make_workers


@pytest.fixture
def reg(clock: FakeClock) -> WorkerRegistry:
    r = WorkerRegistry("decode", clock=clock)
    make_workers(r, 4)
    return r


def cycle(reg: WorkerRegistry, clock: FakeClock, matched: list[int] | None = None, n_keys: int = 4) -> CycleContext:
    ctx = RequestContext("r", list(range(n_keys)), n_keys * 4, 4)
    return CycleContext(ctx, clock(), np.array(matched or [0] * len(reg), dtype=np.int64))


ALL = np.ones(4, dtype=bool)


def test_healthy_filter(reg: WorkerRegistry, clock: FakeClock) -> None:
    reg.set_healthy("w1", False)
    assert HealthyFilter().filter(cycle(reg, clock), reg.view(), ALL).tolist() == [True, False, True, True]
    clock.advance(10)
    reg.update("w2")
    f = HealthyFilter(params={"max_staleness_s": 5})
    assert f.filter(cycle(reg, clock), reg.view(), ALL).tolist() == [False, False, True, False]
    # a filter never re-admits rows already removed
    assert not HealthyFilter().filter(cycle(reg, clock), reg.view(), np.zeros(4, bool)).any()
    with pytest.raises(ValidationError):
        HealthyFilter(params={"max_staleness_s": -1})


def test_saturated_filter(reg: WorkerRegistry, clock: FakeClock) -> None:
    reg.update("w0", kv_usage=0.95)
    reg.update("w1", kv_usage=0.94, num_waiting=33)
    reg.update("w2", kv_usage=0.5, num_waiting=32)
    f = SaturatedFilter()
    assert f.filter(cycle(reg, clock), reg.view(), ALL).tolist() == [False, False, True, True]
    f = SaturatedFilter(params={"kv_usage_threshold": 0.4, "max_waiting": 100})
    assert f.filter(cycle(reg, clock), reg.view(), ALL).tolist() == [False, False, False, True]
    with pytest.raises(ValidationError):
        SaturatedFilter(params={"kv_usage_threshold": 1.5})
    with pytest.raises(ValidationError):
        SaturatedFilter(params={"max_wait": 1})  # typo: extra="forbid"


def test_prefix_scorer(reg: WorkerRegistry, clock: FakeClock) -> None:
    s = PrefixScorer().score(cycle(reg, clock, [0, 1, 4, 2], n_keys=4), reg.view(), ALL)
    assert s.tolist() == [0.0, 0.25, 1.0, 0.5]
    assert PrefixScorer().score(cycle(reg, clock, n_keys=0), reg.view(), ALL).tolist() == [0.0] * 4


def test_kv_headroom_scorer(reg: WorkerRegistry, clock: FakeClock) -> None:
    reg.update("w0", kv_usage=0.25)
    reg.update("w3", kv_usage=1.0)
    assert KvHeadroomScorer().score(cycle(reg, clock), reg.view(), ALL).tolist() == [0.75, 1.0, 1.0, 0.0]


def test_queue_scorer(reg: WorkerRegistry, clock: FakeClock) -> None:
    assert QueueScorer().score(cycle(reg, clock), reg.view(), ALL).tolist() == [1.0] * 4
    reg.update("w0", num_running=2, num_waiting=2)
    reg.update("w1", num_running=2)
    reg.on_routed("w2")  # in-flight counts when the engine has not reported it yet
    reg.update("w3", num_running=8)  # the busiest, but filtered out below
    keep = np.array([True, True, True, False])
    assert QueueScorer().score(cycle(reg, clock), reg.view(), keep)[:3].tolist() == [0.0, 0.5, 0.75]


def test_max_score_picker_breaks_ties_uniformly() -> None:
    picker = MaxScorePicker()
    scores = np.array([1.0, 3.0, -np.inf, 3.0, 3.0 - 1e-12, 2.0])
    rng = random.Random(7)
    counts = Counter(picker.pick(scores, rng) for _ in range(3000))
    assert set(counts) == {1, 3, 4}
    assert all(900 <= c <= 1100 for c in counts.values()), counts
    assert picker.pick(np.array([-np.inf, 0.5]), rng) == 1
    # seeded: reproducible
    a = [picker.pick(scores, random.Random(1)) for _ in range(5)]
    b = [picker.pick(scores, random.Random(1)) for _ in range(5)]
    assert a == b
    strict = MaxScorePicker(params={"tie_tolerance": 0.0})
    assert {strict.pick(scores, rng) for _ in range(200)} == {1, 3}


# ---------------------------------------------------------------------- prefill_cost


def cost_cycle(reg: WorkerRegistry, clock: FakeClock, matched: list[int], prompt: int, rate: float = 0.0) -> CycleContext:
    ctx = RequestContext("r", list(range(prompt // 4)), prompt, 4)
    return CycleContext(ctx, clock(), np.array(matched, dtype=np.int64), rate)


def test_prefill_cost_is_queue_plus_own_suffix_at_each_rate(reg: WorkerRegistry, clock: FakeClock) -> None:
    for w, tps in zip(reg.ids(), (100.0, 100.0, 200.0, 100.0)):
        reg.update(w, prefill_tps=tps)
    reg.add_prefill("w1", 30)
    c = cost_cycle(reg, clock, [0, 10, 0, 15], prompt=64)
    # own: 64, 24, 64, 4 tokens (at least 1); queued: 0, 30, 0, 0
    assert estimated_wait_s(c, reg.view()).tolist() == pytest.approx([0.64, 0.54, 0.32, 0.04])
    s = PrefillCostScorer().score(c, reg.view(), ALL)
    assert s.tolist() == pytest.approx([0.04 / 0.64, 0.04 / 0.54, 0.04 / 0.32, 1.0])
    keep = np.array([True, True, True, False])
    assert int(np.argmax(np.where(keep, PrefillCostScorer().score(c, reg.view(), keep), -1))) == 2


def test_prefill_cost_waits_for_kv_blocks_to_free(reg: WorkerRegistry, clock: FakeClock) -> None:
    for w in reg.ids():
        reg.update(w, prefill_tps=100.0, capacity_blocks=100, kv_usage=0.5, num_running=5)
    reg.update("w0", kv_usage=0.9, num_running=9)  # 9 requests of 10 blocks: 10 free
    c = cost_cycle(reg, clock, [0, 0, 0, 0], prompt=64, rate=2.0)  # needs 16 blocks of 4
    wait = estimated_wait_s(c, reg.view())
    # running 24 requests at 2/s: 12 s running each; 6 of w0's 90 held blocks free in 6/90 of that
    assert wait.tolist() == pytest.approx([0.64 + 6 / 90 * 12, 0.64, 0.64, 0.64])
    assert estimated_wait_s(cost_cycle(reg, clock, [0] * 4, 64, rate=0.0), reg.view()).tolist() == [0.64] * 4


def test_prefill_cost_values_saved_work_more_when_the_tier_is_busy(reg: WorkerRegistry, clock: FakeClock) -> None:
    for w in reg.ids():
        reg.update(w, prefill_tps=100.0)
    reg.add_prefill("w0", 56)  # w0 caches 48 of 64 tokens but has 56 queued: 0.72 s; others 0.64 s
    keep = np.array([True, True, False, False])
    idle = PrefillCostScorer().score(cost_cycle(reg, clock, [12, 0, 0, 0], 64, rate=0.0), reg.view(), keep)
    assert idle[1] > idle[0]  # nobody else is coming: this request's own wait decides
    busy = PrefillCostScorer().score(cost_cycle(reg, clock, [12, 0, 0, 0], 64, rate=2.0), reg.view(), keep)
    # 1 request/s per worker: 0.72 * (1 + 0.16) < 0.64 * (1 + 0.64)
    assert busy[0] > busy[1] and busy[0] == 1.0


def test_max_score_picker_gives_a_tie_to_the_worker_sent_fewest_requests_lately() -> None:
    picker = MaxScorePicker()
    scores = np.array([3.0, 3.0, 3.0, 1.0])
    rng = random.Random(3)
    recent = np.array([5.0, 2.0, 4.0, 0.0])  # row 3 has the least, but is not among the ties
    assert {picker.pick(scores, rng, lambda: recent) for _ in range(50)} == {1}
    level = np.array([2.0, 2.0, 4.0, 0.0])  # equal shares: random among them
    assert {picker.pick(scores, rng, lambda: level) for _ in range(200)} == {0, 1}
    called = []
    assert picker.pick(np.array([1.0, 2.0]), rng, lambda: called.append(1) or np.zeros(2)) == 1
    assert not called  # no tie, no tie-break computed
