from __future__ import annotations

import pytest
from pydantic import ValidationError

from scheduler import DecodeScalingParams, PrefillScalingParams, recommend_decode, recommend_prefill

D = DecodeScalingParams(target_kv_usage=0.75, min_replicas=1, max_replicas=10)


@pytest.mark.parametrize(
    "current,usage,desired",
    [
        (4, 0.75, 4),  # at target
        (4, 0.9, 5),  # ceil(4 * 1.2) = 5
        (4, 1.0, 6),  # ceil(5.33)
        (4, 0.375, 2),  # half the target -> half the replicas
        (4, 0.0, 1),  # bounded by min
        (8, 1.0, 10),  # ceil(10.67) bounded by max
        (0, 0.0, 1),  # cold start
    ],
)
def test_decode_follows_kv_usage(current: int, usage: float, desired: int) -> None:
    assert recommend_decode(current, usage, D).desired == desired


def test_decode_averages_and_reports_direction() -> None:
    r = recommend_decode(2, [1.0, 0.5], D)  # mean 0.75
    assert (r.desired, r.raw, r.direction) == (2, 2, "hold")
    assert recommend_decode(2, [1.0, 1.0], D).direction == "up"
    assert recommend_decode(3, [], D).direction == "down"


def test_decode_tolerance_and_smoothing() -> None:
    p = DecodeScalingParams(target_kv_usage=0.75, max_replicas=100, tolerance=0.1)
    assert recommend_decode(10, 0.8, p).desired == 10  # within 10 % of the target
    assert recommend_decode(10, 0.9, p).desired == 12
    s = DecodeScalingParams(target_kv_usage=0.5, max_replicas=100, upscale_smoothing=0.5, downscale_smoothing=0.25)
    assert recommend_decode(10, 1.0, s).desired == 15  # raw 20, half way
    assert recommend_decode(10, 0.25, s).desired == 8  # raw 5, a quarter of the way (rounded away from 0)
    assert recommend_decode(2, 0.2, s).desired == 1  # always at least one step


def test_prefill_follows_queued_tokens_and_reaches_zero() -> None:
    p = PrefillScalingParams(target_queued_tokens=1000, max_replicas=8)
    assert recommend_prefill(2, 4500, p).desired == 5
    assert recommend_prefill(2, 0, p).desired == 0
    assert recommend_prefill(0, 0, p, waiting_requests=2).desired == 1
    assert recommend_prefill(0, 100_000, p).desired == 8
    floor = PrefillScalingParams(target_queued_tokens=1000, min_replicas=1, max_replicas=8)
    assert recommend_prefill(2, 0, floor).desired == 1
    slow = PrefillScalingParams(target_queued_tokens=1000, max_replicas=8, downscale_smoothing=0.5)
    steps = [3]
    while steps[-1] > 0:
        steps.append(recommend_prefill(steps[-1], 0, slow).desired)
    assert steps == [3, 1, 0]


def test_params_validate() -> None:
    with pytest.raises(ValidationError, match="max_replicas"):
        DecodeScalingParams(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError):
        DecodeScalingParams(target_kv_usage=0)
    with pytest.raises(ValidationError):
        PrefillScalingParams(upscale_smoothing=0)
    with pytest.raises(ValidationError):
        PrefillScalingParams(target_queued_tokens=1, typo=1)
    with pytest.raises(ValueError):
        recommend_prefill(-1, 0, PrefillScalingParams())
