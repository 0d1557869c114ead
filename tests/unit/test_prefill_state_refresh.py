"""Decode asks Control again for an empty prefill view before it prefills locally for it
(`DecodeServer._refresh_prefill_state`): a prefill replica that registered after decode's last
heartbeat (the app just became ready) is used by the very next request. CI once saw the first
request after start-up prefill locally for this reason."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

from pd_serve import servers
from pd_serve.config import RouterSection
from pd_serve.protocol import ReplicaInfo, RoutingHint
from pd_serve.servers import DecodeServer, prefill_filters
from scheduler import DeciderParams


class _Control:
    """Control's `replicas` method as a handle shows it: `.remote(tier)` to await."""

    def __init__(self, state: list[ReplicaInfo], delay: float = 0.0) -> None:
        self.state, self.delay, self.calls = state, delay, 0
        self.replicas = SimpleNamespace(remote=self._remote)

    async def _remote(self, tier: str) -> list[ReplicaInfo]:
        assert tier == "prefill"
        self.calls += 1
        await asyncio.sleep(self.delay)
        return list(self.state)


def _decode(control: _Control) -> SimpleNamespace:
    router = RouterSection()
    r = SimpleNamespace(_prefill=object(), _prefill_state=[], _state_refresh=None, _state_refreshed_at=-math.inf,
                        _control=control, _prefill_filters=prefill_filters(router), _cached_tokens=lambda h: 0,
                        _decider=DeciderParams(threshold_tokens=router.remote_prefill_min_tokens))
    r._fetch_prefill_state = lambda: DecodeServer._fetch_prefill_state(r)
    r._refresh = lambda: DecodeServer._refresh_prefill_state(r)
    return r


def _prefill(rid: str) -> ReplicaInfo:
    return ReplicaInfo(replica_id=rid, tier="prefill", metrics_url="", engine_id=f"prefill-{rid}", node_ip="")


def test_an_empty_view_is_refreshed_so_a_new_replica_is_used_at_once() -> None:
    control = _Control([_prefill("p1")])
    r = _decode(control)
    long = RoutingHint("r", list(range(RouterSection().remote_prefill_min_tokens + 1)))
    assert DecodeServer._decide(r, long) == ("local", "no_prefill_workers")  # the stale view alone
    asyncio.run(r._refresh())
    assert [p.replica_id for p in r._prefill_state] == ["p1"]
    assert DecodeServer._decide(r, long) == ("remote", "remote")


def test_concurrent_requests_share_one_call_and_a_tier_at_zero_is_not_asked_per_request() -> None:
    control = _Control([], delay=0.05)
    r = _decode(control)

    async def go() -> None:
        await asyncio.gather(*(r._refresh() for _ in range(20)))
        assert control.calls == 1
        for _ in range(20):  # within PREFILL_STATE_REFRESH_S of the last call: none
            await r._refresh()
        assert control.calls == 1
        await asyncio.sleep(servers.PREFILL_STATE_REFRESH_S)
        await r._refresh()
        assert control.calls == 2

    asyncio.run(go())


def test_a_failed_refresh_keeps_the_view_and_the_request_goes_on() -> None:
    control = _Control([])

    async def broken(tier: str) -> list[ReplicaInfo]:
        raise ConnectionError("control restarting")

    control.replicas = SimpleNamespace(remote=broken)
    r = _decode(control)
    asyncio.run(r._refresh())
    assert r._prefill_state == [] and r._state_refresh is None


def test_a_slow_control_holds_a_request_up_for_at_most_the_wait_and_its_answer_still_lands() -> None:
    control = _Control([_prefill("p1")], delay=1.0)  # e.g. a Control replica restarting
    r = _decode(control)

    async def go() -> None:
        t0 = asyncio.get_running_loop().time()
        await r._refresh()
        waited = asyncio.get_running_loop().time() - t0
        assert waited < servers.PREFILL_STATE_WAIT_S + 0.15, waited
        assert r._prefill_state == []  # decided on the old view
        await asyncio.sleep(1.0)
        assert [p.replica_id for p in r._prefill_state] == ["p1"]  # the call went on

    asyncio.run(go())
