"""Autoscaling arithmetic: how many replicas each tier should have. No I/O, no Ray.

pd_serve's Ray Serve autoscaling policy calls these once per decision period per tier with the
aggregated replica metrics, and applies (or not) the result; delays, look-back windows and
metric aggregation stay in Ray Serve's ``autoscaling_config``.

* Decode follows KV-cache usage (VRAM): ``raw = ceil(current * mean_usage / target)``, like Ray
  Serve's default policy with ``target_ongoing_requests`` replaced by a usage target.
* Prefill follows queued prefill tokens: ``raw = ceil(queued_tokens / target_per_replica)``,
  and 0 when nothing is queued (decode then prefills locally, see `scheduler.decider`).
* Optional hysteresis: ``tolerance`` (decode) ignores usage within ``target * (1 ± tolerance)``;
  ``upscale_smoothing`` / ``downscale_smoothing`` in (0, 1] move only that fraction of the way
  to ``raw`` per decision (at least one replica, so it always converges).
* The result is clamped to ``[min_replicas, max_replicas]``.

```yaml
autoscaling:
  decode:  {target_kv_usage: 0.75, min_replicas: 1, max_replicas: 8, tolerance: 0.05}
  prefill: {target_queued_tokens: 16384, min_replicas: 0, max_replicas: 8, downscale_smoothing: 0.5}
```
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "DecodeScalingParams",
    "PrefillScalingParams",
    "ScaleDecision",
    "recommend_decode",
    "recommend_prefill",
]


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_replicas: int = Field(1, ge=0, description="Upper bound on replicas.")
    upscale_smoothing: float = Field(1.0, gt=0, le=1, description="Fraction of the way to the raw target per upscale.")
    downscale_smoothing: float = Field(
        1.0, gt=0, le=1, description="Fraction of the way to the raw target per downscale."
    )

    @model_validator(mode="after")
    def _bounds(self) -> _Common:
        if self.max_replicas < self.min_replicas:  # type: ignore[attr-defined]
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas}): "  # type: ignore[attr-defined]
                "raise max_replicas or lower min_replicas"
            )
        return self


class DecodeScalingParams(_Common):
    """Decode tier: scale on mean KV-cache usage."""

    target_kv_usage: float = Field(0.75, gt=0, le=1, description="Mean kv_cache_usage_perc to hold replicas at.")
    min_replicas: int = Field(1, ge=0, description="Lower bound on replicas (decode serves every request: keep >= 1).")
    tolerance: float = Field(0.0, ge=0, lt=1, description="Ignore usage within target*(1 +- tolerance).")


class PrefillScalingParams(_Common):
    """Prefill tier: scale on queued prefill tokens; may go to zero."""

    target_queued_tokens: float = Field(16384, gt=0, description="Queued prefill tokens per replica to aim for.")
    min_replicas: int = Field(0, ge=0, description="Lower bound on replicas (0 allows scale to zero).")


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    """A recommendation: ``desired`` replicas (bounded, smoothed) and the ``raw`` target."""

    desired: int
    raw: int
    current: int

    @property
    def direction(self) -> str:
        """``"up"``, ``"down"`` or ``"hold"`` (a bounded label for the scaling metric)."""
        if self.desired > self.current:
            return "up"
        if self.desired < self.current:
            return "down"
        return "hold"


def _smooth(current: int, raw: int, up: float, down: float) -> int:
    step = raw - current
    if step > 0:
        return current + math.ceil(step * up - 1e-9)
    if step < 0:
        return current + math.floor(step * down + 1e-9)
    return current


def recommend_decode(current: int, kv_usage: float | Sequence[float], params: DecodeScalingParams) -> ScaleDecision:
    """Decode replicas for a mean KV usage (or the per-replica usages to average).

    ``current`` = running replicas. With none running (cold start) the raw target is 1.
    """
    if current < 0:
        raise ValueError(f"current replicas must be >= 0, got {current}")
    if isinstance(kv_usage, int | float):
        usage = float(kv_usage)
    else:
        usage = sum(kv_usage) / len(kv_usage) if len(kv_usage) else 0.0
    usage = min(1.0, max(0.0, usage))
    if current == 0:
        raw = 1
    else:
        ratio = usage / params.target_kv_usage
        raw = current if abs(ratio - 1.0) <= params.tolerance else math.ceil(current * ratio - 1e-9)
    desired = _smooth(current, raw, params.upscale_smoothing, params.downscale_smoothing)
    desired = min(params.max_replicas, max(params.min_replicas, desired))
    return ScaleDecision(desired=desired, raw=raw, current=current)


def recommend_prefill(
    current: int,
    queued_tokens: float,
    params: PrefillScalingParams,
    waiting_requests: int = 0,
) -> ScaleDecision:
    """Prefill replicas for the tier's total queued prefill tokens (waiting + running prompts).

    No queued tokens and no waiting requests → raw target 0 (scale to zero if allowed). Waiting
    requests with an unknown token count still ask for at least one replica.
    """
    if current < 0:
        raise ValueError(f"current replicas must be >= 0, got {current}")
    queued = max(0.0, float(queued_tokens))
    raw = math.ceil(queued / params.target_queued_tokens - 1e-9)
    if waiting_requests > 0:
        raw = max(raw, 1)
    desired = _smooth(current, raw, params.upscale_smoothing, params.downscale_smoothing)
    desired = min(params.max_replicas, max(params.min_replicas, desired))
    return ScaleDecision(desired=desired, raw=raw, current=current)
