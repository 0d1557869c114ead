"""ReplicaStats: one typed view of an engine replica's load, from the engine to the routers."""

from __future__ import annotations

from pd_serve.protocol import ReplicaStats


def test_round_trip_through_serves_dict() -> None:
    s = ReplicaStats(kv_usage=0.5, num_running=3, num_waiting=1, capacity_blocks=2048, queued_prefill_tokens=700.0,
                     block_size=32, kv_events_endpoint="tcp://10.0.0.1:26100",
                     kv_events_replay_endpoint="tcp://10.0.0.1:26700", kv_events_topic="kv-events")
    assert ReplicaStats.from_dict(s.to_dict()) == s


def test_missing_fields_take_defaults_and_nothing_reported_is_none() -> None:
    assert ReplicaStats.from_dict(None) is None and ReplicaStats.from_dict({}) is None
    s = ReplicaStats.from_dict({"kv_usage": 0.25, "num_running": 2})
    assert (s.kv_usage, s.num_running, s.queued_prefill_tokens, s.prefill_tps, s.kv_events_replay_endpoint) == (
        0.25, 2, None, None, None)
