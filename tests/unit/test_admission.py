"""Admission control (pd_serve/admission.py): keys and 401s, token reservations that cannot be
overshot, settlement, the rate-limit headers, concurrency caps, priority queues, shedding and
early rejection, the config section, and the key tool. No Ray, no engine; a fake clock where
numbers depend on time."""

from __future__ import annotations

import asyncio
import copy
import logging
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from pydantic import ValidationError

from pd_serve import errors
from pd_serve.admission import Admission, KeyConfigError, TokenBucket, duration, hash_key
from pd_serve.budget import BudgetLedger, LeaseClient
from pd_serve.config import AdmissionSection, AppConfig
from tests.unit.conftest import ROOT, config_args

KEY_A, KEY_B, KEY_OLD = "sk-alpha-0123456789", "sk-bravo-0123456789", "sk-old-0123456789"


class Clock:
    def __init__(self) -> None:
        self.t = 500.0

    def __call__(self) -> float:
        return self.t


def section(**kw) -> AdmissionSection:
    doc = {"tenants": [
        {"name": "alpha", "api_keys": [hash_key(KEY_A)], "revoked_keys": [hash_key(KEY_OLD)],
         "priority": "interactive", "tokens_per_minute": 1000, "max_concurrent_requests": 100},
        {"name": "bravo", "api_keys": [hash_key(KEY_B)], "priority": "batch"},
    ]}
    doc.update(kw)
    return AdmissionSection.model_validate(doc)


def admission(clock=None, **kw) -> Admission:
    return Admission(section(**kw), clock=clock or Clock())


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def run(coro):
    return asyncio.run(coro)


# ------------------------------------------------------------------------------------------------
# Keys


def test_missing_wrong_malformed_and_revoked_keys_get_openai_shaped_401s() -> None:
    adm = admission()
    before = value("pd_serve_admission_total", tenant="none", outcome="rejected", reason="unauthorized")
    revoked_before = value("pd_serve_admission_total", tenant="alpha", outcome="rejected", reason="revoked")
    cases = {None: "missing API key", "": "missing API key", "Basic abc": "malformed", "Bearer ": "malformed",
             "Bearer sk-wrong": "invalid API key", f"Bearer {KEY_OLD}": "revoked"}
    for header, words in cases.items():
        with pytest.raises(errors.Unauthorized) as e:
            run(adm.admit(header, 10, 10))
        assert words in e.value.message
        assert e.value.body() == {"error": {"message": e.value.message, "type": "AuthenticationError",
                                            "param": None, "code": 401}}
        assert KEY_OLD not in e.value.message
    assert value("pd_serve_admission_total", tenant="none", outcome="rejected", reason="unauthorized") == before + 5
    assert value("pd_serve_admission_total", tenant="alpha", outcome="rejected", reason="revoked") == revoked_before + 1


def test_the_right_key_finds_its_tenant_and_revoking_it_at_run_time_gives_401() -> None:
    adm = admission()
    assert adm.authenticate(f"Bearer {KEY_A}").name == "alpha"
    assert adm.authenticate(f"bearer  {KEY_B} ").name == "bravo"   # scheme case, whitespace
    assert adm.revoke(hash_key(KEY_A)) is True
    with pytest.raises(errors.Unauthorized, match="revoked"):
        adm.authenticate(f"Bearer {KEY_A}")
    assert adm.revoke(hash_key("never-a-key")) is False


def test_keys_from_env_and_file_are_hashed_at_start_up(tmp_path, monkeypatch) -> None:
    (tmp_path / "key").write_text(KEY_B + "\n")
    monkeypatch.setenv("PD_SERVE_TEST_KEY", KEY_A)
    sec = AdmissionSection.model_validate({"tenants": [
        {"name": "a", "api_keys": ["env:PD_SERVE_TEST_KEY", f"file:{tmp_path / 'key'}"]}]})
    adm = Admission(sec, metrics=False)
    assert adm.authenticate(f"Bearer {KEY_A}").name == "a" and adm.authenticate(f"Bearer {KEY_B}").name == "a"
    monkeypatch.delenv("PD_SERVE_TEST_KEY")
    with pytest.raises(KeyConfigError, match="PD_SERVE_TEST_KEY is not set"):
        Admission(sec, metrics=False)
    bad = AdmissionSection.model_validate({"tenants": [{"name": "a", "api_keys": [f"file:{tmp_path / 'nope'}"]}]})
    with pytest.raises(KeyConfigError, match="cannot read the key file"):
        Admission(bad, metrics=False)


def test_keys_never_reach_the_log(caplog, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PD_SERVE_TEST_KEY", KEY_B)
    sec = section()
    sec = sec.model_copy(update={"tenants": [*sec.tenants, sec.tenants[1].model_copy(
        update={"name": "charlie", "api_keys": ["env:PD_SERVE_TEST_KEY"]})]})
    with caplog.at_level(logging.DEBUG, logger="pd_serve.admission"):
        adm = Admission(sec, ["sk-legacy-key-123"], metrics=False)
        for h in (f"Bearer {KEY_A}", "Bearer sk-wrong-key-456", f"Bearer {KEY_OLD}"):
            try:
                adm.authenticate(h)
            except errors.Unauthorized:
                pass
    text = caplog.text
    assert "alpha" in text and hash_key(KEY_A)[7:15] in text          # a short prefix of the hash only
    for secret in (KEY_A, KEY_B, KEY_OLD, "sk-legacy-key-123", "sk-wrong-key-456", hash_key(KEY_A)[7:]):
        assert secret not in text


def test_legacy_ingress_api_keys_are_one_default_tenant_without_limits() -> None:
    args = config_args("tiny-cpu.yaml")
    args["ingress"]["api_keys"] = ["sk-team-a-example"]
    adm = Admission.from_config(AppConfig.model_validate(args), metrics=False)
    t = adm.authenticate("Bearer sk-team-a-example")
    assert (t.name, t.cls.name, t.budget, t.cap) == ("default", "standard", None, None)
    with pytest.raises(errors.Unauthorized):
        adm.authenticate("Bearer sk-team-b-example")
    # no keys at all: auth is off, as before
    args["ingress"]["api_keys"] = []
    adm = Admission.from_config(AppConfig.model_validate(args), metrics=False)
    assert adm.authenticate(None).name == "anonymous" and not adm.auth_required


# ------------------------------------------------------------------------------------------------
# Token budgets


def test_twenty_concurrent_requests_never_overshoot_the_budget() -> None:
    """Budget 1000; 20 concurrent requests of 10 prompt + 90 max_tokens: exactly 10 admitted."""
    clock = Clock()
    adm = admission(clock)
    rejected_before = value("pd_serve_admission_total", tenant="alpha", outcome="rejected", reason="tokens")

    async def burst():
        return await asyncio.gather(*(adm.admit(f"Bearer {KEY_A}", 10, 90) for _ in range(20)),
                                    return_exceptions=True)

    out = run(burst())
    admitted = [t for t in out if not isinstance(t, BaseException)]
    refused = [e for e in out if isinstance(e, BaseException)]
    assert len(admitted) == 10 and sum(t.reserved for t in admitted) == 1000
    assert len(refused) == 10 and all(isinstance(e, errors.RateLimited) and e.status == 429 for e in refused)
    e = refused[0]
    assert e.headers["x-ratelimit-remaining-tokens"] == "0"
    assert e.headers["Retry-After"] == "6" and e.headers["retry-after-ms"] == "6000"   # 100 tokens at 1000/min
    assert "needs 100 tokens" in e.message and "0 of 1000 per minute are left" in e.message
    assert value("pd_serve_admission_total", tenant="alpha", outcome="rejected", reason="tokens") == rejected_before + 10


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=40),
       budget=st.integers(50, 3000))
def test_reservations_never_exceed_the_bucket(sizes, budget) -> None:
    """Any burst: what is admitted fits in the budget, and each refusal did not fit when it came."""
    sec = AdmissionSection.model_validate({"tenants": [{"name": "t", "api_keys": [hash_key("k")],
                                                        "tokens_per_minute": budget}]})
    adm = Admission(sec, clock=Clock(), metrics=False)

    async def burst():
        return await asyncio.gather(*(adm.admit("Bearer k", p, m) for p, m in sizes), return_exceptions=True)

    left = budget
    for (p, m), r in zip(sizes, run(burst())):
        if isinstance(r, errors.BadRequest):
            assert p + m > budget
        elif isinstance(r, errors.RateLimited):
            assert p + m > left
        else:
            assert p + m <= left
            left -= p + m
    assert left >= 0


def test_a_request_larger_than_the_whole_budget_is_a_400_that_says_so() -> None:
    adm = admission()
    with pytest.raises(errors.BadRequest) as e:
        run(adm.admit(f"Bearer {KEY_A}", 200, 900))
    assert e.value.status == 400 and e.value.param == "max_tokens"
    assert "needs 1100 tokens" in e.value.message and "whole budget of 1000 tokens per minute" in e.value.message


def test_settlement_refunds_an_aborted_stream_in_headers_and_metrics() -> None:
    clock = Clock()
    adm = admission(clock)
    used0, ref0, res0 = (value(f"pd_serve_admission_tokens_{k}_total", tenant="alpha")
                         for k in ("used", "refunded", "reserved"))
    t = run(adm.admit(f"Bearer {KEY_A}", 10, 100))
    assert t.headers()["x-ratelimit-remaining-tokens"] == "890"
    t.settle(10, 5, "aborted")                     # the client went away after 5 tokens
    assert adm.headers("alpha")["x-ratelimit-remaining-tokens"] == "985"
    assert value("pd_serve_admission_tokens_reserved_total", tenant="alpha") == res0 + 110
    assert value("pd_serve_admission_tokens_used_total", tenant="alpha") == used0 + 15
    assert value("pd_serve_admission_tokens_refunded_total", tenant="alpha") == ref0 + 95
    t.settle(10, 100)                              # idempotent: nothing changes
    t.release()
    assert adm.headers("alpha")["x-ratelimit-remaining-tokens"] == "985"
    assert value("pd_serve_admission_tokens_used_total", tenant="alpha") == used0 + 15


def test_release_without_settle_charges_the_whole_reservation_once() -> None:
    adm = admission()
    t = run(adm.admit(f"Bearer {KEY_A}", 10, 100))
    t.release()
    t.release()
    t.settle(10, 1)
    assert adm.headers("alpha")["x-ratelimit-remaining-tokens"] == "890"
    assert adm.tenants["alpha"].active == 0 and adm.in_flight == 0


def test_using_more_than_reserved_is_charged() -> None:
    adm = admission()
    t = run(adm.admit(f"Bearer {KEY_A}", 10, 100))
    t.settle(30, 100)          # the prompt was longer than announced
    assert adm.headers("alpha")["x-ratelimit-remaining-tokens"] == "870"


def test_headers_report_limit_remaining_and_reset_exactly() -> None:
    clock = Clock()
    sec = AdmissionSection.model_validate({"tenants": [
        {"name": "t", "api_keys": [hash_key("k")], "tokens_per_minute": 600, "max_concurrent_requests": 4}]})
    adm = Admission(sec, clock=clock, metrics=False)               # 600/min: 10 tokens/s
    assert adm.headers("t") == {"x-ratelimit-limit-tokens": "600", "x-ratelimit-remaining-tokens": "600",
                                "x-ratelimit-reset-tokens": "0s", "x-ratelimit-limit-requests": "4",
                                "x-ratelimit-remaining-requests": "4"}
    t = run(adm.admit("Bearer k", 100, 200))
    assert t.headers() == {"x-ratelimit-limit-tokens": "600", "x-ratelimit-remaining-tokens": "300",
                           "x-ratelimit-reset-tokens": "30s", "x-ratelimit-limit-requests": "4",
                           "x-ratelimit-remaining-requests": "3"}
    clock.t += 1.5
    h = adm.headers("t")
    assert (h["x-ratelimit-remaining-tokens"], h["x-ratelimit-reset-tokens"]) == ("315", "28.5s")
    with pytest.raises(errors.RateLimited) as e:
        run(adm.admit("Bearer k", 200, 200))                      # 400 > 315: 8.5 s to refill
    assert e.value.headers["Retry-After"] == "9" and e.value.headers["retry-after-ms"] == "8500"
    t.settle(100, 0)                                               # 200 back
    assert adm.headers("t")["x-ratelimit-remaining-tokens"] == "515"
    # a tenant without limits has no rate-limit headers
    assert admission().headers("bravo") == {}


def test_duration_format_matches_openai() -> None:
    assert [duration(s) for s in (0, 0.0004, 0.02, 1, 1.5, 59.9, 60, 360, 61.25)] == \
        ["0s", "1ms", "20ms", "1s", "1.5s", "59.9s", "1m0s", "6m0s", "1m1.25s"]


def test_token_bucket_refills_continuously_up_to_capacity() -> None:
    b = TokenBucket(600, now=0.0)
    assert b.try_reserve(600, 0.0) and not b.try_reserve(1, 0.0)
    assert b.available(3.0) == pytest.approx(30)
    assert b.available(1000.0) == 600
    b.refund(50, 1000.0)
    assert b.available(1000.0) == 600


# ------------------------------------------------------------------------------------------------
# Concurrency caps


def test_concurrency_cap_is_a_429_at_once_and_split_over_replicas() -> None:
    sec = AdmissionSection.model_validate({"tenants": [
        {"name": "t", "api_keys": [hash_key("k")], "max_concurrent_requests": 5}]})
    adm = Admission(sec, replicas=2, metrics=False)                # ceil(5 / 2) = 3 per replica

    async def go():
        tickets = [await adm.admit("Bearer k", 1, 1) for _ in range(3)]
        with pytest.raises(errors.RateLimited) as e:
            await adm.admit("Bearer k", 1, 1)
        tickets[0].settle(1, 1)
        await adm.admit("Bearer k", 1, 1)
        return e.value

    e = run(go())
    assert e.status == 429 and "3 requests in flight" in e.message
    assert e.headers["x-ratelimit-limit-requests"] == "3" and e.headers["x-ratelimit-remaining-requests"] == "0"
    assert e.headers["Retry-After"] == "1"


# ------------------------------------------------------------------------------------------------
# Slots, priorities, shedding, early rejection


def slots(**kw) -> Admission:
    base = {"max_in_flight": 1, "tenants": [
        {"name": "i", "api_keys": [hash_key("ki")], "priority": "interactive"},
        {"name": "s", "api_keys": [hash_key("ks")], "priority": "standard"},
        {"name": "b", "api_keys": [hash_key("kb")], "priority": "batch", "tokens_per_minute": 100000}]}
    base.update(kw)
    return Admission(AdmissionSection.model_validate(base))


def test_free_slots_go_to_the_highest_class_waiting() -> None:
    adm = slots()

    async def go():
        first = await adm.admit("Bearer ks", 1, 1)           # holds the only slot
        order = []

        async def one(key):
            t = await adm.admit(f"Bearer {key}", 1, 1)
            order.append(key)
            await asyncio.sleep(0)
            t.settle(1, 1)

        tasks = [asyncio.create_task(one(k)) for k in ("kb", "ks", "kb", "ki", "ks")]
        await asyncio.sleep(0.01)
        assert adm.snapshot()["queues"] == {"interactive": 1, "standard": 2, "batch": 2}
        assert value("pd_serve_admission_queue_depth", priority="batch") == 2
        first.settle(1, 1)
        await asyncio.gather(*tasks)
        return order

    assert run(go()) == ["ki", "ks", "ks", "kb", "kb"]
    assert adm.in_flight == 0 and adm.queued == 0
    assert value("pd_serve_admission_queue_depth", priority="batch") == 0


def test_a_full_queue_sheds_the_lowest_class_first_and_rejects_at_once() -> None:
    adm = slots(max_queued=2)
    shed_before = value("pd_serve_admission_total", tenant="b", outcome="rejected", reason="shed")

    async def go():
        await adm.admit("Bearer ks", 1, 1)
        b1 = asyncio.create_task(adm.admit("Bearer kb", 1, 1))
        b2 = asyncio.create_task(adm.admit("Bearer kb", 1, 1))
        await asyncio.sleep(0.01)
        i1 = asyncio.create_task(adm.admit("Bearer ki", 1, 1))   # queues full: the newest batch goes
        await asyncio.sleep(0.01)
        assert b2.done() and not b1.done() and not i1.done()
        with pytest.raises(errors.Unavailable) as shed:
            await b2
        t0 = time.perf_counter()
        with pytest.raises(errors.Unavailable) as full:           # a batch one: nothing lower to shed
            await adm.admit("Bearer kb", 1, 1)
        took = time.perf_counter() - t0
        for t in (b1, i1):
            t.cancel()
        await asyncio.gather(b1, i1, return_exceptions=True)
        return shed.value, full.value, took

    shed, full, took = run(go())
    assert shed.status == 503 and "shed" in shed.message and shed.headers["Retry-After"] == "1"
    assert "x-ratelimit-limit-tokens" in shed.headers        # the batch tenant's budget headers
    assert full.status == 503 and "queues are full (2 waiting)" in full.message and "Retry-After" in full.headers
    assert took < 0.05                                        # at once, never a silent wait
    assert value("pd_serve_admission_total", tenant="b", outcome="rejected", reason="shed") == shed_before + 1
    # the shed request's reservation went back
    assert adm.headers("b")["x-ratelimit-remaining-tokens"] == "100000"
    assert adm.queued == 0 and adm.snapshot()["tenants"]["b"]["active"] == 0


def test_a_class_queue_bound_rejects_immediately() -> None:
    adm = slots(classes=[{"name": "interactive", "max_queue": 1}, {"name": "standard", "max_queue": 1},
                         {"name": "batch", "max_queue": 0}])

    async def go():
        await adm.admit("Bearer ks", 1, 1)
        waiting = asyncio.create_task(adm.admit("Bearer ks", 1, 1))
        await asyncio.sleep(0.01)
        out = []
        for key in ("ks", "kb"):
            t0 = time.perf_counter()
            with pytest.raises(errors.Unavailable) as e:
                await adm.admit(f"Bearer {key}", 1, 1)
            out.append((e.value, time.perf_counter() - t0))
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        return out

    (std, t_std), (batch, t_batch) = run(go())
    assert "standard queue is full (1 waiting)" in std.message and t_std < 0.05
    assert "batch queue is full (0 waiting)" in batch.message and t_batch < 0.05
    assert std.headers["Retry-After"] == "1"


def test_early_rejection_when_the_predicted_wait_exceeds_the_deadline() -> None:
    adm = slots(ttft_deadline_s=1.0)
    adm.observe(service_s=0.6)                                # a slot is held 0.6 s on average

    async def go():
        await adm.admit("Bearer ks", 1, 1)
        # first in the queue: one release ahead, 0.6 s <= 1 s: it waits
        waiting = asyncio.create_task(adm.admit("Bearer ks", 1, 1))
        await asyncio.sleep(0.01)
        assert adm.queued == 1
        # second: (1 + 1) x 0.6 s = 1.2 s > 1 s: rejected at the door
        with pytest.raises(errors.Unavailable) as e:
            await adm.admit("Bearer ks", 1, 1)
        # a batch request waits behind everything too
        with pytest.raises(errors.Unavailable):
            await adm.admit("Bearer kb", 1, 1)
        # an interactive one only behind its own class: (0 + 1) x 0.6 s, it waits
        inter = asyncio.create_task(adm.admit("Bearer ki", 1, 1))
        await asyncio.sleep(0.01)
        assert not inter.done()
        for t in (waiting, inter):
            t.cancel()
        await asyncio.gather(waiting, inter, return_exceptions=True)
        return e.value

    e = run(go())
    assert "predicted wait of 1.2 s exceeds the standard deadline of 1 s" in e.message
    assert e.headers["Retry-After"] == "2" and e.headers["retry-after-ms"] == "1200"


def test_predicted_wait_adds_the_time_to_first_token() -> None:
    adm = slots(ttft_deadline_s=1.0, max_in_flight=2)
    adm.observe(service_s=1.0, ttft_s=0.3)

    async def go():
        await adm.admit("Bearer ks", 1, 1)
        await adm.admit("Bearer ks", 1, 1)
        waiting = asyncio.create_task(adm.admit("Bearer ks", 1, 1))   # 1 x 1.0 / 2 + 0.3 = 0.8
        await asyncio.sleep(0.01)
        with pytest.raises(errors.Unavailable) as e:                    # 2 x 1.0 / 2 + 0.3 = 1.3
            await adm.admit("Bearer ks", 1, 1)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        return e.value

    assert "predicted wait of 1.3 s" in run(go()).message


def test_a_queued_request_times_out_with_a_503_and_its_reservation_back() -> None:
    adm = slots(classes=[{"name": "interactive"}, {"name": "standard"}, {"name": "batch", "max_queue_wait_s": 0.05}])

    async def go():
        await adm.admit("Bearer ks", 1, 1)
        t0 = time.perf_counter()
        with pytest.raises(errors.Unavailable) as e:
            await adm.admit("Bearer kb", 100, 100)
        return e.value, time.perf_counter() - t0

    e, took = run(go())
    assert "waited 0.05 s for a slot (batch class)" in e.message and 0.04 < took < 1
    assert adm.headers("b")["x-ratelimit-remaining-tokens"] == "100000" and adm.queued == 0


def test_a_client_that_leaves_while_queued_frees_everything() -> None:
    adm = slots()
    before = value("pd_serve_admission_total", tenant="b", outcome="cancelled", reason="client")

    async def go():
        holder = await adm.admit("Bearer ks", 1, 1)
        task = asyncio.create_task(adm.admit("Bearer kb", 100, 100))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        holder.settle(1, 1)

    run(go())
    assert adm.queued == 0 and adm.in_flight == 0 and adm.snapshot()["tenants"]["b"]["active"] == 0
    assert adm.headers("b")["x-ratelimit-remaining-tokens"] == "100000"
    assert value("pd_serve_admission_total", tenant="b", outcome="cancelled", reason="client") == before + 1


def test_settlement_feeds_the_service_time_average() -> None:
    clock = Clock()
    adm = admission(clock)
    t = run(adm.admit(f"Bearer {KEY_A}", 1, 1))
    clock.t += 0.4
    t.first_token()
    clock.t += 1.6
    t.settle(1, 1)
    assert (adm.service_s, adm.ttft_s) == (pytest.approx(2.0), pytest.approx(0.4))
    t2 = run(adm.admit(f"Bearer {KEY_A}", 1, 1))
    clock.t += 1.0
    t2.settle(1, 1)
    assert adm.service_s == pytest.approx(1.9)                 # moving average, alpha 0.1


# ------------------------------------------------------------------------------------------------
# Leases behind Admission


def test_admission_with_leases_waits_for_a_top_up_instead_of_a_429() -> None:
    ledger = BudgetLedger()
    sec = AdmissionSection.model_validate({"tenants": [
        {"name": "t", "api_keys": [hash_key("k")], "tokens_per_minute": 6000}],
        "lease": {"max_fraction": 0.1, "sync_period_s": 0.05, "ttl_s": 5, "wait_s": 0.5}})

    async def go():
        leases = LeaseClient.for_ledger(ledger, "r1", sec.lease)
        adm = Admission(sec, leases=leases, metrics=False)
        await adm.start()
        # 30 x 100 = 3000 at once: far more than the lease (cap 600), less than the budget
        out = await asyncio.gather(*(adm.admit("Bearer k", 50, 50) for _ in range(30)), return_exceptions=True)
        ok = [t for t in out if not isinstance(t, BaseException)]
        for t in ok:
            t.settle(50, 0)                                      # 50 of 100 back each
        h = adm.headers("t")
        await adm.close()
        return len(ok), h

    n, h = run(go())
    assert n == 30
    assert h["x-ratelimit-limit-tokens"] == "6000" and 4400 <= int(h["x-ratelimit-remaining-tokens"]) <= 4600
    assert sum(ledger.snapshot()["t"]["held"].values()) == 0


# ------------------------------------------------------------------------------------------------
# Config


def test_plaintext_keys_are_refused_with_the_hash_to_write_and_never_echoed() -> None:
    args = config_args("tiny-cpu.yaml")
    args["admission"] = {"tenants": [{"name": "a", "api_keys": ["sk-my-secret-key"]}]}
    with pytest.raises(ValidationError) as e:
        AppConfig.model_validate(args)
    msg = str(e.value)
    assert "plaintext key" in msg and hash_key("sk-my-secret-key") in msg and "hash-key" in msg
    assert "sk-my-secret-key" not in msg


@pytest.mark.parametrize("change, words", [
    ({"tenants": [{"name": "a", "priority": "urgent"}]}, "priority 'urgent' is not a class"),
    ({"tenants": [{"name": "a"}, {"name": "a"}]}, "two tenants are named 'a'"),
    ({"tenants": [{"name": "none"}]}, "is reserved"),
    ({"tenants": [{"name": "a", "api_keys": [hash_key("x")]}, {"name": "b", "api_keys": [hash_key("x")]}]},
     "share a key"),
    ({"tenants": [{"name": "a", "api_keys": ["sha256:abc"]}]}, "malformed key reference"),
    ({"tenants": [{"name": "a", "api_keys": [hash_key("x")], "revoked_keys": [hash_key("x")]}]},
     "both api_keys and revoked_keys"),
    ({"default_priority": "urgent"}, "default_priority 'urgent' is not a class"),
    ({"classes": [{"name": "x"}, {"name": "x"}], "default_priority": "x"}, "duplicate class names"),
    ({"lease": {"ttl_s": 1, "sync_period_s": 0.5}}, "must exceed twice lease.sync_period_s"),
    ({"tenant": []}, "Extra inputs are not permitted"),
])
def test_admission_config_mistakes_name_the_fix(change, words) -> None:
    args = config_args("tiny-cpu.yaml")
    args["admission"] = change
    with pytest.raises(ValidationError) as e:
        AppConfig.model_validate(args)
    assert words in str(e.value)


def test_sha256_references_are_normalised() -> None:
    sec = AdmissionSection.model_validate({"tenants": [{"name": "a", "api_keys": ["SHA256:" + "AB" * 32]}]})
    assert sec.tenants[0].api_keys == ["sha256:" + "ab" * 32]


def test_example_tenants_config_validates_and_its_comment_keys_match_its_hashes() -> None:
    import re

    import yaml

    text = (ROOT / "configs" / "tiny-cpu-tenants.yaml").read_text()
    doc = yaml.safe_load(text)
    cfg = AppConfig.model_validate(doc["applications"][0]["args"])
    base = yaml.safe_load((ROOT / "configs" / "tiny-cpu.yaml").read_text())
    ours = copy.deepcopy(doc["applications"][0]["args"])
    ours.pop("admission")
    assert ours == base["applications"][0]["args"]                # tiny-cpu.yaml plus tenants
    assert (doc["http_options"]["host"], doc["http_options"]["port"]) == (cfg.ingress.host, cfg.ingress.port)
    keys = re.findall(r"Bearer (sk-[\w-]+)", text)
    assert len(keys) == 2
    adm = Admission(cfg.admission, metrics=False)
    tenants = [adm.authenticate(f"Bearer {k}") for k in keys]
    assert len({t.name for t in tenants}) == 2
    assert len({t.cls.name for t in tenants}) == 2 and len({t.budget.capacity for t in tenants}) == 2
    for k in keys:                                                 # only hashes in the config itself
        assert k not in yaml.safe_dump(doc)


def test_hash_key_tool_prints_the_config_reference() -> None:
    out = subprocess.run([sys.executable, "-m", "pd_serve.admission", "hash-key"], input=KEY_A + "\n",
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == hash_key(KEY_A)
    out = subprocess.run([sys.executable, "-m", "pd_serve.admission", "new-key"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    key = out.stdout.split("not stored): ")[1].split()[0]
    assert hash_key(key) in out.stdout


def test_metrics_series_exist_at_zero_for_config_tenants_and_classes() -> None:
    Admission(section())
    for tenant in ("alpha", "bravo"):
        for k in ("reserved", "used", "refunded"):
            assert REGISTRY.get_sample_value(f"pd_serve_admission_tokens_{k}_total", {"tenant": tenant}) is not None
        assert REGISTRY.get_sample_value("pd_serve_admission_total",
                                         {"tenant": tenant, "outcome": "rejected", "reason": "deadline"}) is not None
    assert REGISTRY.get_sample_value("pd_serve_admission_total",
                                     {"tenant": "none", "outcome": "rejected", "reason": "unauthorized"}) is not None
    for c in ("interactive", "standard", "batch"):
        assert REGISTRY.get_sample_value("pd_serve_admission_queue_depth", {"priority": c}) is not None


def test_rate_limited_is_in_the_error_tree_with_its_headers() -> None:
    e = errors.of_status(429, "slow down")
    assert isinstance(e, errors.RateLimited) and e.headers is None
    assert e.body() == {"error": {"message": "slow down", "type": "RateLimitError", "param": None, "code": 429}}
    e = errors.Unavailable("busy", headers={"Retry-After": "3"})
    assert (e.status, e.headers, e.param) == (503, {"Retry-After": "3"}, None)
    assert errors.BadRequest("x", "max_tokens").headers is None      # existing errors: unchanged
