from __future__ import annotations

import pytest
from pydantic import ValidationError

from scheduler import DeciderParams, DeciderReason, PrefillLocation, decide, decide_for, default_profiles

from .conftest import make_ctx, make_workers, tokens

P = DeciderParams(threshold_tokens=100)


@pytest.mark.parametrize(
    "prompt,cached,workers,eligible,location,reason,uncached",
    [
        (1000, 950, 4, 4, PrefillLocation.LOCAL, DeciderReason.SHORT_UNCACHED, 50),
        (100, 0, 4, 4, PrefillLocation.LOCAL, DeciderReason.SHORT_UNCACHED, 100),  # boundary: <= threshold
        (101, 0, 4, 4, PrefillLocation.REMOTE, DeciderReason.REMOTE, 101),
        (1000, 0, 0, 0, PrefillLocation.LOCAL, DeciderReason.NO_PREFILL_WORKERS, 1000),
        (1000, 0, 3, 0, PrefillLocation.LOCAL, DeciderReason.PREFILL_SATURATED, 1000),
        (1000, 2000, 0, 0, PrefillLocation.LOCAL, DeciderReason.SHORT_UNCACHED, 0),
    ],
)
def test_decide(prompt, cached, workers, eligible, location, reason, uncached) -> None:
    d = decide(prompt, cached, workers, eligible, P)
    assert (d.location, d.reason, d.uncached_tokens) == (location, reason, uncached)
    assert d.remote == (location is PrefillLocation.REMOTE)


def test_params_validate() -> None:
    assert DeciderParams().threshold_tokens == 256
    with pytest.raises(ValidationError):
        DeciderParams(threshold_tokens=-1)


def test_decide_for_uses_decode_match_and_prefill_filters(make_tier) -> None:
    decode, prefill = make_tier(n_workers=2), make_tier(default_profiles()["prefill"])
    toks = tokens(1, 400)
    decode.store("w0", toks[:320])
    ctx = make_ctx(toks)
    d = decode.scheduler.route(ctx)
    assert d.worker == "w0" and d.matched_tokens == 320
    assert decide_for(ctx, d, prefill.scheduler, P).reason is DeciderReason.SHORT_UNCACHED  # 80 uncached
    long_ctx = make_ctx(tokens(2, 400))
    d = decode.scheduler.route(long_ctx)
    assert decide_for(long_ctx, d, None, P).reason is DeciderReason.NO_PREFILL_WORKERS
    assert decide_for(long_ctx, d, prefill.scheduler, P).reason is DeciderReason.NO_PREFILL_WORKERS
    make_workers(prefill.registry, 2, kv_usage=0.99)
    assert decide_for(long_ctx, d, prefill.scheduler, P).reason is DeciderReason.PREFILL_SATURATED
    prefill.registry.update("w1", kv_usage=0.2)
    assert decide_for(long_ctx, d, prefill.scheduler, P).location is PrefillLocation.REMOTE


def test_count_eligible_runs_the_prefill_profiles_own_filters() -> None:
    from types import SimpleNamespace

    from scheduler import count_eligible
    from scheduler.plugins import SaturatedFilter

    def replica(rid: str, kv: float, waiting: int) -> SimpleNamespace:
        return SimpleNamespace(replica_id=rid, kv_usage=kv, num_running=1, num_waiting=waiting)

    filters = default_profiles()["prefill"].filters
    assert count_eligible([], filters) == (0, 0)
    heartbeats = [replica("p0", 0.2, 0), replica("p1", 0.96, 0), replica("p2", 0.2, 33), replica("p3", 0.94, 32)]
    assert count_eligible(heartbeats, filters) == (4, 2)  # the saturated filter's own bounds: 0.95, > 32
    strict = (SaturatedFilter(params={"kv_usage_threshold": 0.5, "max_waiting": 0}),)
    assert count_eligible(heartbeats, strict) == (4, 1)
