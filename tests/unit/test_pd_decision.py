"""Decode's remote-or-local prefill choice goes through the scheduler's own filters (issue 10,
item 2): `DecodeServer._decide` on heartbeat state, without Ray or an engine."""

from __future__ import annotations

from types import SimpleNamespace

from pd_serve.config import RouterSection
from pd_serve.protocol import ReplicaInfo, RoutingHint
from pd_serve.servers import DecodeServer, prefill_filters
from scheduler import DeciderParams


def _replica(rid: str, kv: float, waiting: int) -> ReplicaInfo:
    return ReplicaInfo(replica_id=rid, tier="prefill", metrics_url="", engine_id=f"prefill-{rid}", node_ip="",
                       kv_usage=kv, num_waiting=waiting)


def _decode(router: RouterSection, state: list[ReplicaInfo]) -> SimpleNamespace:
    return SimpleNamespace(_prefill=object(), _prefill_state=state, _prefill_filters=prefill_filters(router),
                           _decider=DeciderParams(threshold_tokens=router.remote_prefill_min_tokens),
                           _cached_tokens=lambda hint: 0, cfg=SimpleNamespace(router=router))


def test_saturation_is_the_configured_thresholds_through_the_scheduler_filter() -> None:
    router = RouterSection(prefill_saturation_kv_usage=0.9, prefill_max_waiting=4)
    long = RoutingHint("r", list(range(router.remote_prefill_min_tokens + 1)))
    decide = DecodeServer._decide
    assert decide(_decode(router, [_replica("a", 0.89, 3)]), long) == ("remote", "remote")
    assert decide(_decode(router, [_replica("a", 0.90, 0)]), long) == ("local", "prefill_saturated")
    assert decide(_decode(router, [_replica("a", 0.1, 4)]), long) == ("local", "prefill_saturated")  # 4 waiting
    assert decide(_decode(router, [_replica("a", 0.9, 0), _replica("b", 0.1, 0)]), long) == ("remote", "remote")
    assert decide(_decode(router, []), long) == ("local", "no_prefill_workers")


def test_a_configured_prefill_profile_decides_saturation() -> None:
    profiles = {
        "plugins": [{"type": "saturated", "params": {"kv_usage_threshold": 0.5, "max_waiting": 0}},
                    {"type": "prefill_cost"}],
        "profiles": {"decode": {"plugins": [{"ref": "prefill_cost"}]},
                     "prefill": {"plugins": [{"ref": "saturated"}, {"ref": "prefill_cost"}]}},
    }
    router = RouterSection(profiles=profiles)
    long = RoutingHint("r", list(range(router.remote_prefill_min_tokens + 1)))
    state = [_replica("a", 0.6, 0), _replica("b", 0.1, 1)]  # both fine by the default thresholds
    assert DecodeServer._decide(_decode(router, state), long) == ("local", "prefill_saturated")
