"""The P/D path on real engines: identical tokens, KV really transferred, nothing leaked."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration import cases
from tests.integration.conftest import wait_idle
from tests.support.metrics import Scrape

SOURCE = "vllm:prompt_tokens_by_source_total"


def test_openai_client_completion_and_streamed_chat(pd_url: str) -> None:
    c = openai.OpenAI(base_url=pd_url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in c.models.list().data] == ["tiny-llama"]
    r = c.completions.create(model="tiny-llama", prompt="the router and the cache", max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    stream = c.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "stream please"}], max_tokens=5,
        temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content is not None) >= 5
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


@pytest.mark.parametrize("case", cases.ALL, ids=lambda c: c.name)
def test_identical_tokens_and_kv_arrived_by_transfer(case: cases.Case, pd_url: str, client: httpx.Client,
                                                     reference: dict[str, cases.Output]) -> None:
    before = wait_idle(pd_url)
    out = cases.run(client, case)
    after = wait_idle(pd_url)

    ref = reference[case.name]
    assert out.token_ids == ref.token_ids, f"P/D tokens differ from the aggregated engine for {case.name}"
    assert out.prompt_tokens == ref.prompt_tokens and len(out.token_ids) == case.body["max_tokens"]

    def delta(source: str, tier: str) -> float:
        return after.sum(SOURCE, source=source, tier=tier) - before.sum(SOURCE, source=source, tier=tier)

    # decode received the whole prompt by transfer and computed none of it
    assert delta("external_kv_transfer", "decode") == out.prompt_tokens
    assert delta("local_compute", "decode") == 0
    # prefill computed (or had cached) the prompt
    assert delta("local_compute", "prefill") + delta("local_cache_hit", "prefill") == out.prompt_tokens
    assert (after.sum("pd_serve_prefill_total", where="remote")
            - before.sum("pd_serve_prefill_total", where="remote")) == 1


def test_aborted_stream_frees_both_engines(pd_url: str, client: httpx.Client) -> None:
    wait_idle(pd_url)
    before = Scrape.get(pd_url)
    body = {"model": "tiny-llama", "prompt": cases.text(100, 9), "max_tokens": 900, "temperature": 0,
            "ignore_eos": True, "stream": True}
    got = 0
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                got += 1
            if got >= 3:
                break  # leaving the block closes the connection mid-stream
    after = wait_idle(pd_url, timeout=30)
    assert (after.sum("pd_serve_client_aborts_total", phase="decode")
            - before.sum("pd_serve_client_aborts_total", phase="decode")) == 1
    # the engine stopped early: far fewer than 900 tokens were generated
    gen = (after.sum("vllm:generation_tokens_total", tier="decode")
           - before.sum("vllm:generation_tokens_total", tier="decode"))
    assert 0 < gen < 900


PHASES = ("parse", "render", "to_decode", "prefill_select", "prefill", "decode_first_token", "to_client")


def test_phases_of_a_request_add_up_to_its_time_to_first_byte(pd_url: str, client: httpx.Client) -> None:
    """pd_serve_phase_seconds: one observation per phase for a remotely prefilled stream, and
    the phases together account for the client's time to first token (the ingress cannot see
    the Serve proxy's and the client's own share, so they are at most that, and most of it)."""
    import time

    before = wait_idle(pd_url)
    body = {"model": "tiny-llama", "prompt": cases.text(300, 21), "max_tokens": 8, "temperature": 0,
            "stream": True}
    t0 = time.perf_counter()
    ttft = None
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if ttft is None and line.startswith("data: "):
                ttft = time.perf_counter() - t0
    after = wait_idle(pd_url)
    counts = {p: after.sum("pd_serve_phase_seconds_count", phase=p)
              - before.sum("pd_serve_phase_seconds_count", phase=p) for p in PHASES}
    assert counts == {p: 1 for p in PHASES}, counts
    total = sum(after.sum("pd_serve_phase_seconds_sum", phase=p)
                - before.sum("pd_serve_phase_seconds_sum", phase=p) for p in PHASES)
    assert 0.5 * ttft <= total <= ttft, (total, ttft)
    assert (after.sum("pd_serve_phase_seconds_sum", phase="prefill")
            - before.sum("pd_serve_phase_seconds_sum", phase="prefill")) > 0


def test_engines_idle_after_all_requests(pd_url: str) -> None:
    s = wait_idle(pd_url)
    assert s.values("vllm:num_requests_running", tier="decode") == [0.0]
    assert s.values("vllm:num_requests_running", tier="prefill") == [0.0]
    assert s.values("vllm:kv_cache_usage_perc", tier="prefill") == [0.0]


@pytest.mark.own_app("serve-proxy")
def test_serve_proxy_listener_gives_the_same_tokens(apps, reference) -> None:
    """`ingress.listener: serve_proxy` (KubeRay's path: Ray Serve's proxy in front of the
    ingress) serves the same token ids, whole and streamed, with KV received by transfer."""
    from tests.support.servers import load_app_args

    url = apps.get("serve-proxy", load_app_args(ingress={"listener": "serve_proxy"}))
    with httpx.Client(base_url=url, timeout=120) as client:
        for case in [c for c in cases.ALL if c.api == "completions"][:2] + [c for c in cases.ALL if c.stream]:
            before = Scrape.get(url)
            out = cases.run(client, case)
            after = wait_idle(url)
            assert out.token_ids == reference[case.name].token_ids, case.name
            got = (after.sum(SOURCE, source="external_kv_transfer", tier="decode")
                   - before.sum(SOURCE, source="external_kv_transfer", tier="decode"))
            assert got == out.prompt_tokens, (case.name, got)
