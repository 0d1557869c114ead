"""Scale-from-zero of the prefill tier (issue 9, item 5): when a prompt would have gone remote but
the tier has no replica, decode prefills locally and sends one fire-and-forget wake call, so that
a request queues at the prefill handle and Ray Serve scales the tier up. The decision is pure
logic (`scheduler.wakes_prefill`); the sending is `PrefillWaker`. No Ray, no engine."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

from pd_serve import metrics as m
from pd_serve.config import RouterSection
from pd_serve.protocol import ReplicaInfo, RoutingHint
from pd_serve.servers import DecodeServer, PrefillWaker, prefill_filters
from scheduler import DeciderParams, DeciderReason, decide, wakes_prefill

P = DeciderParams(threshold_tokens=100)


@pytest.mark.parametrize(
    "prompt,cached,workers,eligible,configured,wake",
    [
        (1000, 0, 0, 0, True, True),      # would go remote, tier at zero: wake it
        (1000, 0, 0, 0, False, False),    # no prefill tier at all: nothing to wake
        (100, 0, 0, 0, True, False),      # short: local anyway, even with replicas
        (1000, 950, 0, 0, True, False),   # mostly cached here: local anyway
        (1000, 0, 2, 0, True, False),     # replicas, all saturated: their own queue is the signal
        (1000, 0, 2, 2, True, False),     # replicas: remote
    ],
)
def test_wake_only_when_a_remote_prompt_meets_a_configured_tier_at_zero(
        prompt, cached, workers, eligible, configured, wake) -> None:
    d = decide(prompt, cached, workers, eligible, P)
    assert wakes_prefill(d.reason, configured) is wake
    assert wakes_prefill(str(d.reason), configured) is wake  # servers.py carries the reason as a label string


def test_every_other_reason_wakes_nothing() -> None:
    for reason in DeciderReason:
        assert wakes_prefill(reason, True) is (reason is DeciderReason.NO_PREFILL_WORKERS)
    for reason in ("no_prefill_tier", "prefill_unavailable", "remote_failed", "preset", "remote"):
        assert not wakes_prefill(reason, True)


def _decode(state: list[ReplicaInfo], prefill: object | None = object()) -> SimpleNamespace:
    router = RouterSection(remote_prefill_min_tokens=100)
    return SimpleNamespace(_prefill=prefill, _prefill_state=state, _prefill_filters=prefill_filters(router),
                           _decider=DeciderParams(threshold_tokens=100), _cached_tokens=lambda hint: 0)


def test_decode_decision_on_heartbeat_state_wakes_a_tier_at_zero() -> None:
    long, short = RoutingHint("r", list(range(101))), RoutingHint("s", list(range(100)))
    replica = ReplicaInfo(replica_id="a", tier="prefill", metrics_url="", engine_id="prefill-a", node_ip="")

    def wakes(state, hint, prefill=object()) -> tuple[str, str, bool]:
        where, reason = DecodeServer._decide(_decode(state, prefill), hint)
        return where, reason, wakes_prefill(reason, prefill is not None)

    assert wakes([], long) == ("local", "no_prefill_workers", True)
    assert wakes([], None) == ("local", "no_prefill_workers", True)  # no token ids: only the tier decides
    assert wakes([], short) == ("local", "short_uncached", False)
    assert wakes([replica], long) == ("remote", "remote", False)
    assert wakes([], long, prefill=None) == ("local", "no_prefill_tier", False)


def _count(outcome: str) -> float:
    return m.PREFILL_WAKES.labels(outcome)._value.get()


class _Handle:
    """A prefill handle whose ``wake.remote()`` answers when the test says so."""

    def __init__(self) -> None:
        self.calls: list[asyncio.Future] = []
        self.wake = SimpleNamespace(remote=self._remote)

    def _remote(self) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.calls.append(fut)
        return fut


async def test_one_wake_outstanding_never_awaited_by_the_caller() -> None:
    m.init_wake_series()
    handle, before = _Handle(), {o: _count(o) for o in m.WAKE_OUTCOMES}
    waker = PrefillWaker(handle)
    assert waker.wake() is True  # returns at once: the call has not even been sent yet
    await asyncio.sleep(0)
    assert len(handle.calls) == 1 and waker.outstanding
    for _ in range(5):  # more long prompts while the tier is still at zero: no second call
        assert waker.wake() is False
    await asyncio.sleep(0)
    assert len(handle.calls) == 1
    handle.calls[0].set_result("replica-1")  # a prefill replica came up and ran it
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not waker.outstanding
    assert waker.wake() is True  # the tier went back to zero later: wake again
    await asyncio.sleep(0)
    assert len(handle.calls) == 2
    handle.calls[1].set_result("replica-2")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    delta = {o: _count(o) - before[o] for o in m.WAKE_OUTCOMES}
    assert delta == {"sent": 2, "answered": 2, "failed": 0}


async def test_a_failed_wake_is_logged_and_counted_not_raised(caplog) -> None:
    handle, failed = _Handle(), _count("failed")
    waker = PrefillWaker(handle)
    with caplog.at_level(logging.WARNING, logger="pd_serve.servers"):
        assert waker.wake()
        await asyncio.sleep(0)
        handle.calls[0].set_exception(RuntimeError("controller unreachable"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    assert not waker.outstanding and _count("failed") - failed == 1
    assert "waking the prefill tier failed" in caplog.text
    assert waker.wake()  # the next long prompt tries again
    await asyncio.sleep(0)
    handle.calls[1].set_result("r")
    await asyncio.sleep(0)


async def test_a_wake_that_cannot_even_be_sent_does_not_reach_the_request() -> None:
    def boom():
        raise RuntimeError("handle broken")

    waker = PrefillWaker(SimpleNamespace(wake=SimpleNamespace(remote=boom)))
    failed = _count("failed")
    assert waker.wake()  # no exception here, on the request path
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert _count("failed") - failed == 1 and not waker.outstanding
