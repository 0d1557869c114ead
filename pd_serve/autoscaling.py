"""Ray Serve autoscaling policies: each tier scales on its own signal.

- decode: mean KV-cache usage (VRAM) of its replicas against a target (default 0.75);
- prefill: prompt tokens queued or being prefilled on its replicas, plus requests still queued
  at the callers' handles, against a per-replica target (default 16384); it may go to zero,
  decode then prefills locally.

Replicas report the signals through ``record_autoscaling_stats`` (``pd_serve.servers``); Ray
Serve aggregates them over ``look_back_period_s`` and calls the policy every control-loop tick
in the Serve controller. The arithmetic is ``scheduler.scaling``; these classes only adapt Ray's
``AutoscalingContext`` to it. Ray Serve still applies ``upscale_delay_s``/``downscale_delay_s``
and the min/max bounds.
"""

from __future__ import annotations

import logging
from typing import Any

from scheduler import DecodeScalingParams, PrefillScalingParams, recommend_decode, recommend_prefill

logger = logging.getLogger("ray.serve")
KV_USAGE = "kv_usage"
QUEUED_PREFILL_TOKENS = "queued_prefill_tokens"


def _per_replica(ctx: Any, name: str) -> list[float]:
    metrics = ctx.aggregated_metrics or {}
    values = metrics.get(name, {})
    return [float(values[r]) for r in ctx.running_replicas if r in values]


class DecodeKVUsagePolicy:
    """``autoscaling_config.policy.policy_function`` for the decode tier."""

    def __init__(self, target_kv_usage: float = 0.75, min_replicas: int = 1, max_replicas: int = 1,
                 tolerance: float = 0.05) -> None:
        self.params = DecodeScalingParams(target_kv_usage=target_kv_usage, min_replicas=min_replicas,
                                          max_replicas=max_replicas, tolerance=tolerance)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        usage = _per_replica(ctx, KV_USAGE)
        if not usage:  # no report yet (replicas starting): keep what Serve targets
            return ctx.target_num_replicas, {}
        d = recommend_decode(ctx.current_num_replicas, usage, self.params)
        if d.direction != "hold":
            logger.info("pd_serve decode autoscaling: %d -> %d replicas (mean KV usage %.2f, target %.2f)",
                        d.current, d.desired, sum(usage) / len(usage), self.params.target_kv_usage)
        return d.desired, {"last_kv_usage": usage}


class PrefillQueuePolicy:
    """``autoscaling_config.policy.policy_function`` for the prefill tier."""

    def __init__(self, target_queued_tokens: float = 16384, min_replicas: int = 0, max_replicas: int = 1) -> None:
        self.params = PrefillScalingParams(target_queued_tokens=target_queued_tokens,
                                           min_replicas=min_replicas, max_replicas=max_replicas)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        queued = sum(_per_replica(ctx, QUEUED_PREFILL_TOKENS))
        waiting = int(ctx.total_queued_requests or 0)
        d = recommend_prefill(ctx.current_num_replicas, queued, self.params, waiting_requests=waiting)
        if d.direction != "hold":
            logger.info("pd_serve prefill autoscaling: %d -> %d replicas (%.0f queued tokens, %d queued requests)",
                        d.current, d.desired, queued, waiting)
        return d.desired, {}
