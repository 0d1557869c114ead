"""The windows around a remote prefill that nothing tested (issue 9, item 6), on real engines:
a client that goes away while its remote prefill runs, and a prefill replica killed while
prefills are in flight. Each test makes the window observable (many concurrent long prompts
queue up on the one prefill engine), proves it was hit by polling decode's
``pd_serve_requests_in_flight{stage="prefill"}``, and ends with the leak check."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.integration import cases
from tests.integration.conftest import PD_PORT, wait_idle
from tests.support.metrics import Scrape

CONCURRENT = 16
PROMPT_WORDS = 900  # ~900 tokens each (one token per word), under max_model_len 1024
_STAGE = re.compile(r'^pd_serve_requests_in_flight\{stage="(\w+)"\} ([0-9.e+-]+)$', re.M)


def _control():
    from ray import serve

    return serve.get_deployment_handle("Control", app_name="pd_serve")


def _decode_stages(metrics_url: str) -> dict[str, float]:
    """Decode's in-flight stages from its own registry: one small scrape, not the whole /metrics."""
    return {k: float(v) for k, v in _STAGE.findall(httpx.get(metrics_url, timeout=5).text)}


def _wait_for_prefill_stage(metrics_url: str, alive, timeout: float = 60) -> tuple[float, dict[str, float]]:
    """Poll decode until a request is in stage ``prefill`` (its prefill replica chosen, the remote
    prefill running). Fails the test if that is never seen while requests are still running."""
    t0 = time.monotonic()
    polls = 0
    while time.monotonic() - t0 < timeout:
        st = _decode_stages(metrics_url)
        polls += 1
        if st.get("prefill", 0) >= 1:
            return time.monotonic() - t0, st
        if not alive():
            break
        time.sleep(0.005)
    pytest.fail(f"never saw a request in decode stage `prefill` ({polls} polls): the window was not hit")


def _body(i: int, seed: int, **kw) -> dict:
    return {"model": "tiny-llama", "prompt": cases.text(PROMPT_WORDS, seed + i), "max_tokens": 16,
            "temperature": 0, "return_token_ids": True, **kw}


def _raw_post(body: dict) -> socket.socket:
    """Send a request on a socket of our own, so that the test can drop the connection at any
    moment, before any byte of the answer."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", PD_PORT))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: pd\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def _leak_check(url: str, before: Scrape, engines: int, timeout: float) -> Scrape:
    after = wait_idle(url, engines=engines, timeout=timeout)
    assert after.values("pd_serve_kv_blocks_awaiting_pull", tier="prefill") in ([0.0], [])
    assert after.sum("pd_serve_requests_in_flight") == 0
    return after


def test_client_gone_during_remote_prefill_frees_both_engines(pd_url: str, client: httpx.Client) -> None:
    wait_idle(pd_url)
    (dec,) = _control().replicas.remote("decode").result()
    before = Scrape.get(pd_url)
    max_tokens = 100
    socks = [_raw_post(_body(i, 71000, max_tokens=max_tokens, ignore_eos=True, stream=True))
             for i in range(CONCURRENT)]
    try:
        at, stages = _wait_for_prefill_stage(dec.metrics_url, alive=lambda: True)
    finally:
        for s in socks:  # reset, not a polite close: the client is simply gone
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
    # unpulled blocks of a prefill that finished after its client left are freed at the latest by
    # the lease (kv_transfer.lease_s: 30 s in configs/tiny-cpu.yaml)
    after = _leak_check(pd_url, before, engines=2, timeout=60)

    def delta(name: str, **labels: str) -> float:
        return after.sum(name, **labels) - before.sum(name, **labels)

    in_prefill = delta("pd_serve_client_aborts_total", phase="prefill")
    in_decode = delta("pd_serve_client_aborts_total", phase="decode")
    # reached decode after its client had left: dropped there on the ingress's cancel_stream
    before_start = delta("pd_serve_client_aborts_total", phase="before_start")
    generated = delta("vllm:generation_tokens_total", tier="decode")
    print(f"\nclients gone {at:.2f} s after sending, decode stages then {stages}: aborted in prefill "
          f"{in_prefill:.0f}, in decode {in_decode:.0f}, before starting {before_start:.0f}; {generated:.0f} tokens generated of "
          f"{CONCURRENT * max_tokens} asked; remote prefills {delta('pd_serve_prefill_total', where='remote'):.0f}; "
          f"leases expired {delta('vllm:nixl_num_kv_expired_reqs_total'):.0f}")
    # Every request was given up, none ran to its end. (Today the ingress notices a disconnect
    # only once decode's first byte arrives, so the prefills run to the end, decode pulls their
    # KV and computes a token or so before the abort, counted in phase `decode`.)
    assert delta("pd_serve_requests_total", outcome="ok") == 0
    assert in_prefill + in_decode + before_start >= 1
    assert generated < CONCURRENT * max_tokens / 4, "the engines kept generating for clients that had left"
    # the server keeps serving
    r = client.post("/v1/completions", json=_body(0, 71500))
    assert r.status_code == 200


@pytest.mark.disruptive
def test_prefill_replica_killed_while_prefills_are_in_flight(pd_url: str, client: httpx.Client) -> None:
    wait_idle(pd_url)
    control = _control()
    (dec,) = control.replicas.remote("decode").result()
    (victim,) = control.replicas.remote("prefill").result()
    # reference ids: the same prompts, undisturbed (remote prefill), one at a time
    want = {}
    for i in range(CONCURRENT):
        r = client.post("/v1/completions", json=_body(i, 72000))
        assert r.status_code == 200
        want[i] = r.json()["choices"][0]["token_ids"]
    # cold caches again, so that every prompt goes to the prefill tier and takes its full time
    from ray import serve

    assert serve.get_deployment_handle("DecodeServer", app_name="pd_serve").reset_prefix_cache.remote().result()
    assert serve.get_deployment_handle("PrefillServer", app_name="pd_serve").reset_prefix_cache.remote().result()
    wait_idle(pd_url)
    before = Scrape.get(pd_url)

    answers: dict[int, httpx.Response | BaseException] = {}

    def one(i: int) -> None:
        try:
            with httpx.Client(base_url=pd_url, timeout=120) as c:
                answers[i] = c.post("/v1/completions", json=_body(i, 72000))
        except BaseException as e:  # a hang ends in the timeout and fails below
            answers[i] = e

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(CONCURRENT)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    at, stages = _wait_for_prefill_stage(dec.metrics_url, alive=lambda: any(t.is_alive() for t in threads))
    os.kill(victim.pid, signal.SIGKILL)
    for t in threads:
        t.join(150)
    took = time.monotonic() - t0
    assert not any(t.is_alive() for t in threads), "a request hung after its prefill replica was killed"

    ok = errors = 0
    for i in range(CONCURRENT):
        r = answers[i]
        assert isinstance(r, httpx.Response), f"request {i}: {r!r}"
        if r.status_code == 200:
            assert r.json()["choices"][0]["token_ids"] == want[i], f"request {i}: other token ids"
            ok += 1
        else:  # a clean OpenAI-shaped error, never a bare 500 or a cut connection
            err = r.json()["error"]
            assert err["code"] == r.status_code and err["message"] and err["type"], r.text
            errors += 1
    after = _leak_check(pd_url, before, engines=1, timeout=60)

    def delta(name: str, **labels: str) -> float:
        return after.sum(name, **labels) - before.sum(name, **labels)

    broken = delta("pd_serve_remote_prefill_failures_total")
    print(f"\nprefill replica killed {at:.2f} s after sending, with decode stages {stages}: {ok} x 200 with "
          f"identical ids, {errors} errors, in {took:.1f} s; remote prefill failures {broken:.0f} "
          f"(replica_gone {delta('pd_serve_remote_prefill_failures_total', reason='replica_gone'):.0f}), "
          f"prefilled locally {delta('pd_serve_prefill_total', where='local'):.0f}, "
          f"remotely {delta('pd_serve_prefill_total', where='remote'):.0f}")
    assert broken >= 1, "no remote prefill in flight was broken by the kill"
    assert ok == CONCURRENT, "under failure_policy local_prefill every request should be served"

    # Serve restarts the replica; remote prefill resumes; the next tests find the app whole
    deadline = time.monotonic() + 240
    while True:
        reps = control.replicas.remote("prefill").result()
        if reps and reps[0].pid != victim.pid:
            break
        assert time.monotonic() < deadline, "prefill replica did not come back within 240 s"
        time.sleep(2)
    time.sleep(2)  # decode's heartbeat view
    before = Scrape.get(pd_url)
    r = client.post("/v1/completions", json=_body(99, 72000))
    assert r.status_code == 200
    after = _leak_check(pd_url, before, engines=2, timeout=60)
    assert after.sum("pd_serve_prefill_total", where="remote") - before.sum("pd_serve_prefill_total", where="remote") == 1
