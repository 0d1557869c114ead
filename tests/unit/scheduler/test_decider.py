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
