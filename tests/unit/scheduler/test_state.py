from __future__ import annotations

from scheduler import PrefixIndex, WorkerRegistry, WorkerState, block_keys

from .conftest import BLOCK, FakeClock, make_workers, store_prefix, tokens


def test_sync_follows_membership_and_cleans_the_index(clock: FakeClock) -> None:
    index = PrefixIndex(BLOCK, clock=clock)
    reg = WorkerRegistry("decode", index=index, clock=clock)
    assert reg.sync(["a", "b", "c"]) == (["a", "b", "c"], [])
    toks = tokens(1, 8)
    store_prefix(index, "b", toks)
    store_prefix(index, "c", toks)
    reg.update("c", kv_usage=0.5, num_running=3)
    clock.advance(1)
    added, removed = reg.sync(["c", "d"])
    assert (added, removed) == (["d"], ["a", "b"])
    assert reg.ids() == ("c", "d")
    assert index.match(block_keys(toks, BLOCK)) == {"c": 2}
    assert "b" not in index.workers() and "d" in index.workers()
    c = reg.get("c")
    assert c is not None and (c.kv_usage, c.num_running) == (0.5, 3)  # survives the rebuild
    d = reg.get("d")
    assert d is not None and d.updated_at == clock.t and d.healthy
    assert reg.sync(["c", "d"]) == ([], [])


def test_update_snapshot_and_unknown_workers(clock: FakeClock) -> None:
    reg = WorkerRegistry("prefill", clock=clock)
    make_workers(reg, ["a"])
    clock.advance(3)
    assert reg.update("a", kv_usage=1.7, num_waiting=2, capacity_blocks=100, block_size=32, healthy=False)
    assert reg.get("a") == WorkerState(
        worker_id="a",
        tier="prefill",
        kv_usage=1.0,
        num_waiting=2,
        capacity_blocks=100,
        block_size=32,
        healthy=False,
        updated_at=clock.t,
        prefill_tps=reg.assumed_prefill_tps,  # no measured rate reported yet
    )
    assert not reg.update("gone", kv_usage=0.1)  # a late report cannot resurrect a worker
    assert "gone" not in reg and reg.get("gone") is None
    reg.set_healthy("a", True)
    assert [w.healthy for w in reg] == [True]


def test_inflight_counts(clock: FakeClock) -> None:
    reg = WorkerRegistry("decode", clock=clock)
    make_workers(reg, ["a"])
    reg.on_routed("a")
    reg.on_routed("a")
    reg.on_completed("a")
    reg.on_completed("a")
    reg.on_completed("a")  # never negative
    reg.on_routed("unknown")
    state = reg.get("a")
    assert state is not None and state.num_inflight == 0
    reg.on_routed("a")
    assert reg.view().num_inflight.tolist() == [1.0]


def test_capacity_report_bounds_speculation(clock: FakeClock) -> None:
    index = PrefixIndex(BLOCK, clock=clock)
    reg = WorkerRegistry("decode", index=index, clock=clock)
    make_workers(reg, ["a"])
    reg.update("a", capacity_blocks=2)
    index.record_routed("a", block_keys(tokens(1, 16), BLOCK), ttl_s=60)
    assert len(index.keys_of("a")) == 2


def test_add_remove_single(clock: FakeClock) -> None:
    reg = WorkerRegistry("decode", clock=clock)
    reg.add("a")
    reg.add("a")
    reg.add("b")
    reg.remove("a")
    reg.remove("zzz")
    assert reg.ids() == ("b",) and len(reg) == 1


def test_prefill_backlog_drains_at_the_measured_rate_and_reports_reanchor(clock: FakeClock) -> None:
    reg = WorkerRegistry("decode", clock=clock, assumed_prefill_tps=100.0)
    make_workers(reg, ["a", "b"])
    reg.add_prefill("a", 500)
    clock.advance(2)  # drained at the assumed 100 tokens/s
    assert reg.get("a").queued_prefill_tokens == 300  # type: ignore[union-attr]
    reg.update("a", prefill_tps=50.0)  # measured: slower; what drained so far stays drained
    reg.add_prefill("a", 100)
    clock.advance(4)
    assert list(reg.queued_prefill()) == [200.0, 0.0]
    reg.update("a", queued_prefill_tokens=1000)  # the engine's own count replaces the estimate
    assert reg.get("a").queued_prefill_tokens == 1000  # type: ignore[union-attr]
    clock.advance(100)
    assert list(reg.queued_prefill()) == [0.0, 0.0]  # never negative
    reg.update("b", prefill_tps=0.0)  # not a measurement
    assert reg.get("b").prefill_tps == 50.0  # type: ignore[union-attr]  # unmeasured: its peers' mean


def test_an_unmeasured_worker_is_assumed_as_fast_as_its_peers(clock: FakeClock) -> None:
    # Assuming a new worker slower than its measured peers would starve it of the work that measures it.
    reg = WorkerRegistry("decode", clock=clock, assumed_prefill_tps=1000.0)
    make_workers(reg, ["a", "b", "c"])
    reg.update("a", prefill_tps=20000.0)
    reg.update("b", prefill_tps=10000.0)
    assert [w.prefill_tps for w in reg] == [20000.0, 10000.0, 15000.0]
    reg.sync(["a", "b", "c", "d"])
    assert reg.get("d").prefill_tps == 15000.0  # type: ignore[union-attr]
