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
