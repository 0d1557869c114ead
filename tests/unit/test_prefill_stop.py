"""A stopping prefill replica keeps the KV it handed out pullable (issue 9, gap A).

``PrefillServer.__del__`` (awaited by Ray Serve after it drained the replica's prefill calls)
waits until the engine holds nothing awaiting a pull (``kv_transfer.held``), at most the KV lease
within the shutdown budget, then stops the engine. Pure logic: a fake ledger, a fake clock, no
Ray, no engine; the real thing runs in tests/integration/test_prefill_scaling.py.
"""

from __future__ import annotations

import asyncio
import copy
import types

import pytest

from pd_serve.app import GRACEFUL_SHUTDOWN_S, tier_options
from pd_serve.config import AppConfig
from pd_serve.servers import PrefillServer
from tests.unit.conftest import config_args


class Clock:
    """A fake monotonic clock that only moves when the wait sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        assert s >= 0
        self.sleeps.append(s)
        self.now += s


def ledger(*readings: tuple[int, int]):
    """A fake ``held.read``: the given readings in turn, then the last one forever."""
    it = iter(readings)
    last = [readings[-1]]

    def read() -> tuple[int, int]:
        try:
            last[0] = next(it)
        except StopIteration:
            pass
        return last[0]
    return read


def run(coro):
    return asyncio.run(coro)


# --- the wait -------------------------------------------------------------------------------

def test_nothing_held_means_no_wait_at_all() -> None:
    c = Clock()
    w = run(PrefillServer.wait_for_pulls(ledger((0, 0)), 30, clock=c, sleep=c.sleep))
    assert w == PrefillServer.PullWait("none", 0.0, (0, 0), (0, 0)) and c.sleeps == []


def test_waits_until_decode_has_pulled_everything_polling_every_50_ms() -> None:
    c = Clock()
    read = ledger((2, 7), (2, 7), (1, 3), (1, 3), (0, 0))
    w = run(PrefillServer.wait_for_pulls(read, 30, clock=c, sleep=c.sleep))
    assert w.outcome == "released" and w.held == (2, 7) and w.left == (0, 0)
    assert c.sleeps == [0.05] * 4 and w.waited_s == pytest.approx(0.2)


def test_blocks_counted_without_requests_still_count_as_held() -> None:
    c = Clock()
    w = run(PrefillServer.wait_for_pulls(ledger((0, 2), (0, 0)), 30, clock=c, sleep=c.sleep))
    assert w.outcome == "released" and c.sleeps == [0.05]


def test_never_pulled_ends_at_the_limit_exactly_not_a_poll_later() -> None:
    c = Clock()
    w = run(PrefillServer.wait_for_pulls(ledger((1, 4)), 0.12, clock=c, sleep=c.sleep))
    assert w.outcome == "timeout" and w.held == w.left == (1, 4)
    assert c.sleeps == pytest.approx([0.05, 0.05, 0.02]) and w.waited_s == pytest.approx(0.12)


def test_a_zero_limit_does_not_wait() -> None:
    c = Clock()
    w = run(PrefillServer.wait_for_pulls(ledger((1, 4)), 0.0, clock=c, sleep=c.sleep))
    assert w.outcome == "timeout" and c.sleeps == []


def test_an_unreadable_ledger_ends_the_wait() -> None:
    c = Clock()

    def broken() -> tuple[int, int]:
        raise OSError("gone")
    w = run(PrefillServer.wait_for_pulls(broken, 30, clock=c, sleep=c.sleep))
    assert w.outcome == "none" and c.sleeps == []
    # held at first, then unreadable: treated as released (nothing left to wait on)
    reads = iter([(1, 2)])

    def flaky() -> tuple[int, int]:
        try:
            return next(reads)
        except StopIteration:
            raise OSError("gone") from None
    w = run(PrefillServer.wait_for_pulls(flaky, 30, clock=c, sleep=c.sleep))
    assert w.outcome == "released" and w.held == (1, 2)


# --- the bounds: lease and shutdown budget --------------------------------------------------

def _cfg(name: str, **kv_transfer) -> AppConfig:
    args = copy.deepcopy(config_args(name))
    args["kv_transfer"].update(kv_transfer)
    return AppConfig.model_validate(args)


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "llama70b.yaml"])
def test_the_prefill_tiers_timeout_leaves_room_for_the_whole_lease(name: str) -> None:
    cfg = _cfg(name)
    timeout = tier_options(cfg, "prefill")["graceful_shutdown_timeout_s"]
    assert PrefillServer.pull_wait_limit_s(cfg, timeout) == cfg.kv_transfer.lease_s == 30
    # drain + the whole wait + the engine's teardown fit in it
    assert (PrefillServer.DRAIN_ALLOWANCE_S + cfg.kv_transfer.lease_s + PrefillServer.STOP_RESERVE_S[cfg.device]
            <= timeout)
    assert tier_options(cfg, "decode")["graceful_shutdown_timeout_s"] == GRACEFUL_SHUTDOWN_S[cfg.device]


def test_prefill_timeout_is_teardown_plus_drain_plus_lease() -> None:
    assert tier_options(_cfg("tiny-cpu.yaml"), "prefill")["graceful_shutdown_timeout_s"] == 5 + 5 + 30
    assert tier_options(_cfg("tiny-cpu.yaml", lease_s=120), "prefill")["graceful_shutdown_timeout_s"] == 130
    # a 70B engine keeps the whole 60 s teardown after waiting out the lease
    assert tier_options(_cfg("llama70b.yaml"), "prefill")["graceful_shutdown_timeout_s"] == 60 + 5 + 30
    assert tier_options(_cfg("llama70b.yaml", lease_s=1), "prefill")["graceful_shutdown_timeout_s"] == 66


def test_the_wait_never_eats_into_the_engines_teardown() -> None:
    cfg = _cfg("tiny-cpu.yaml")
    assert PrefillServer.pull_wait_limit_s(cfg, None) == 30          # outside Serve: the lease
    assert PrefillServer.pull_wait_limit_s(cfg, 20) == 20 - 5 - 5     # a smaller budget set by hand
    assert PrefillServer.pull_wait_limit_s(cfg, 5) == 0               # no room at all: no wait


# --- __del__: leave decode's view, wait, then stop the engine ---------------------------------

class FakeHost:
    def __init__(self, engine_id: str | None, read) -> None:
        self.plan = types.SimpleNamespace(identity=types.SimpleNamespace(engine_id=engine_id) if engine_id else None)
        self.read = read
        self.stopped_with: tuple[int, int] | None = None

    def shutdown(self) -> None:
        self.stopped_with = self.read()


class FakeControl:
    def __init__(self, fail: bool = False) -> None:
        self.deregistered: list[str] = []
        self.fail = fail
        self.deregister = types.SimpleNamespace(remote=self._deregister)

    async def _deregister(self, replica_id: str) -> None:
        if self.fail:
            raise RuntimeError("control is gone")
        self.deregistered.append(replica_id)


class _Collected(PrefillServer):
    def __del__(self) -> None:  # what the GC calls on a test's replica: nothing to await there
        pass


@pytest.fixture(autouse=True)
def _inert_at_gc():
    """``async def __del__`` is for Ray Serve to await; when the GC finalizes a test's replica it
    would only create a coroutine nobody awaits (a RuntimeWarning in some later test)."""
    made: list[PrefillServer] = []
    yield made
    for r in made:
        r.__class__ = _Collected


def _replica(monkeypatch, made, readings, lease_s: float = 30, engine_id: str | None = "prefill-r1",
             control: FakeControl | None = None):
    from kv_transfer import held

    read = ledger(*readings)
    monkeypatch.setattr(held, "read", lambda eid: read() if eid == engine_id else (0, 0))
    r = PrefillServer.__new__(PrefillServer)
    made.append(r)
    r.cfg = _cfg("tiny-cpu.yaml", lease_s=lease_s)
    r.replica_id = "r1"
    r.host = FakeHost(engine_id, lambda: held.read(engine_id) if engine_id else (0, 0))
    r._control = control if control is not None else FakeControl()
    return r


def test_del_waits_for_the_pull_then_stops_the_engine(monkeypatch, _inert_at_gc) -> None:
    r = _replica(monkeypatch, _inert_at_gc, [(1, 7)] * 4 + [(0, 0)])

    async def go():
        beats = asyncio.get_running_loop().create_task(asyncio.sleep(3600))
        r._heartbeat = beats
        t0 = asyncio.get_running_loop().time()
        await r.__del__()
        return beats, asyncio.get_running_loop().time() - t0

    beats, took = run(go())
    assert beats.cancelled(), "the heartbeat must stop, or control keeps the replica in decode's view"
    assert r._control.deregistered == ["r1"]
    assert r.host.stopped_with == (0, 0), "the engine stopped while KV still awaited a pull"
    assert 0.15 <= took < 2


def test_del_stops_the_engine_at_the_lease_when_nobody_pulls(monkeypatch, _inert_at_gc) -> None:
    r = _replica(monkeypatch, _inert_at_gc, [(1, 7)], lease_s=0.3, control=FakeControl(fail=True))

    async def go():
        t0 = asyncio.get_running_loop().time()
        await r.__del__()
        return asyncio.get_running_loop().time() - t0

    took = run(go())
    assert r.host.stopped_with == (1, 7) and 0.3 <= took < 2  # stopped anyway; vLLM frees them


def test_del_without_kv_transfer_stops_at_once(monkeypatch, _inert_at_gc) -> None:
    r = _replica(monkeypatch, _inert_at_gc, [(0, 0)], engine_id=None)
    run(r.__del__())
    assert r.host.stopped_with == (0, 0)


def test_del_stops_the_engine_even_if_the_wait_fails(monkeypatch, _inert_at_gc) -> None:
    r = _replica(monkeypatch, _inert_at_gc, [(1, 7)])

    async def boom(*a, **k):
        raise RuntimeError("unexpected")
    monkeypatch.setattr(PrefillServer, "wait_for_pulls", staticmethod(boom))
    run(r.__del__())
    assert r.host.stopped_with == (1, 7)
