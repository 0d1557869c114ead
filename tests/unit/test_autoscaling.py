"""The tier autoscaling policies read Ray's AutoscalingContext and apply scheduler.scaling."""

from __future__ import annotations

from types import SimpleNamespace

from pd_serve.autoscaling import KV_USAGE, QUEUED_PREFILL_TOKENS, DecodeKVUsagePolicy, PrefillQueuePolicy


def make_ctx(current: int, metric: str, values: list[float], queued: float = 0, target: int | None = None):
    replicas = [f"r{i}" for i in range(current)]
    return SimpleNamespace(current_num_replicas=current, target_num_replicas=target or current,
                           running_replicas=replicas, total_queued_requests=queued,
                           aggregated_metrics={metric: dict(zip(replicas, values))})


def test_decode_scales_on_mean_kv_usage_within_bounds() -> None:
    p = DecodeKVUsagePolicy(target_kv_usage=0.5, min_replicas=1, max_replicas=4)
    assert p(make_ctx(1, KV_USAGE, [0.9]))[0] == 2           # ceil(1 * 0.9 / 0.5)
    assert p(make_ctx(2, KV_USAGE, [0.95, 0.95]))[0] == 4    # ceil(2 * 0.95 / 0.5)
    assert p(make_ctx(3, KV_USAGE, [1.0, 1.0, 1.0]))[0] == 4  # clamped to max
    assert p(make_ctx(2, KV_USAGE, [0.0, 0.0]))[0] == 1      # idle: down to min, never 0
    assert p(make_ctx(2, KV_USAGE, [0.5, 0.5]))[0] == 2      # on target: hold


def test_decode_without_reports_keeps_serves_target() -> None:
    p = DecodeKVUsagePolicy(max_replicas=4)
    ctx = make_ctx(2, KV_USAGE, [], target=3)
    ctx.aggregated_metrics = {}
    assert p(ctx)[0] == 3


def test_prefill_scales_on_queued_tokens_and_to_zero() -> None:
    p = PrefillQueuePolicy(target_queued_tokens=1000, min_replicas=0, max_replicas=3)
    assert p(make_ctx(1, QUEUED_PREFILL_TOKENS, [2500]))[0] == 3
    assert p(make_ctx(2, QUEUED_PREFILL_TOKENS, [0, 0]))[0] == 0
    # nothing on the replicas yet, but requests queued at the callers' handles: wake up
    assert p(make_ctx(0, QUEUED_PREFILL_TOKENS, [], queued=2))[0] >= 1
