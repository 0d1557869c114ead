"""Routing on real engines: prefix affinity from KV events, index updates, the P/D decider."""

from __future__ import annotations

import time

import httpx
import pytest
from transformers import AutoTokenizer

from tests.integration import cases
from tests.integration.conftest import wait_idle
from tests.support.metrics import Scrape
from tests.support.servers import load_app_args

SOURCE = "vllm:prompt_tokens_by_source_total"
PREFIX = cases.text(420, 11)


def two_decode_args() -> dict:
    args = load_app_args(decode={"replicas": 2, "cpu_cores": [0, 1]}, kv_transfer={"backend": None})
    args["prefill"] = {"replicas": 0}
    return args


def _served_tokens(s: Scrape) -> dict[str, float]:
    """prompt tokens seen per decode replica (all sources)."""
    out: dict[str, float] = {}
    for name, labels, v in s.samples:
        if name == SOURCE and labels.get("tier") == "decode":
            out[labels["replica"]] = out.get(labels["replica"], 0) + v
    return out


def _holder(before: Scrape, after: Scrape) -> tuple[str, dict[str, float]]:
    b, a = _served_tokens(before), _served_tokens(after)
    delta = {r: a.get(r, 0) - b.get(r, 0) for r in a}
    served = [r for r, d in delta.items() if d > 0]
    assert len(served) == 1, f"one request should reach exactly one replica: {delta}"
    return served[0], delta


def _complete(client: httpx.Client, prompt: str) -> dict:
    r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": prompt, "max_tokens": 4,
                                             "temperature": 0})
    r.raise_for_status()
    return r.json()


@pytest.mark.own_app("two-decode")
def test_shared_prefix_follows_its_holder_then_moves_when_cleared(apps) -> None:
    url = apps.get("two-decode", two_decode_args())
    with httpx.Client(base_url=url, timeout=120) as client:
        s0 = wait_idle(url)
        assert len(_served_tokens(s0)) == 2, "two decode replicas expected"
        _complete(client, PREFIX + " first")
        s1 = wait_idle(url)
        holder, _ = _holder(s0, s1)
        time.sleep(0.5)  # the KV events of the first request reach the router

        for i in range(4):
            before = Scrape.get(url)
            _complete(client, PREFIX + f" follow {i}")
            after = wait_idle(url)
            got, _ = _holder(before, after)
            assert got == holder, "a request sharing the prefix left the replica that holds it"
            hits = (after.sum(SOURCE, source="local_cache_hit", tier="decode", replica=holder)
                    - before.sum(SOURCE, source="local_cache_hit", tier="decode", replica=holder))
            assert hits >= 12 * 32, f"the holder should serve the prefix from its cache, got {hits} tokens"
        assert (after.sum("pd_serve_routing_decisions_total", tier="decode", reason="prefix_hit")
                - s1.sum("pd_serve_routing_decisions_total", tier="decode", reason="prefix_hit")) == 4

        # clear the holder's cache: its AllBlocksCleared event must empty the router's view of it
        from ray import serve

        assert serve.get_deployment_handle("DecodeServer", app_name="pd_serve").broadcast(
            "reset_prefix_cache", holder).results().count(True) == 1
        # vLLM publishes queued KV events on the engine's next step: keep the holder stepping
        # (unrelated short prompts) until it has served one, so AllBlocksCleared is out.
        for i in range(20):
            before = Scrape.get(url)
            _complete(client, cases.text(5, 100 + i))
            if _holder(before, wait_idle(url))[0] == holder:
                break
        else:
            pytest.fail("the holder never served a request")
        time.sleep(0.5)
        before = Scrape.get(url)
        _complete(client, PREFIX + " after clear")
        after = wait_idle(url)
        assert (after.sum("pd_serve_prefix_hit_tokens_total", tier="decode")
                - before.sum("pd_serve_prefix_hit_tokens_total", tier="decode")) == 0
        new_holder, _ = _holder(before, after)
        time.sleep(0.5)
        for i in range(2):  # routing now follows wherever the prefix was cached again
            before = Scrape.get(url)
            _complete(client, PREFIX + f" again {i}")
            after = wait_idle(url)
            assert _holder(before, after)[0] == new_holder


@pytest.mark.own_app("two-decode")
def test_routing_moves_when_the_holder_leaves(apps) -> None:
    import os
    import signal

    from ray import serve

    url = apps.get("two-decode", two_decode_args())
    prefix = cases.text(420, 12)
    with httpx.Client(base_url=url, timeout=120) as client:
        s0 = wait_idle(url)
        _complete(client, prefix + " one")
        holder, _ = _holder(s0, wait_idle(url))
        (info,) = [r for r in serve.get_deployment_handle("Control", app_name="pd_serve")
                   .replicas.remote("decode").result() if r.replica_id == holder]
        os.kill(info.pid, signal.SIGKILL)
        time.sleep(3)  # Serve notices the death; the router drops the replica and its index entries
        survivor = None
        for i in range(3):
            before = Scrape.get(url)
            _complete(client, prefix + f" two {i}")
            after = wait_idle(url, engines=1)
            got, _ = _holder(before, after)
            assert got != holder
            survivor = survivor or got
            assert got == survivor


@pytest.mark.own_app("decider")
def test_short_prompt_prefills_locally_long_one_remotely_same_tokens(apps, reference) -> None:
    url = apps.get("decider", load_app_args(router={"remote_prefill_min_tokens": 64}))
    short = next(c for c in cases.ALL if c.name == "short")
    long = next(c for c in cases.ALL if c.name == "long")
    with httpx.Client(base_url=url, timeout=120) as client:
        for case, where, reason, transferred in ((short, "local", "short_uncached", False),
                                                 (long, "remote", "remote", True),
                                                 (long, "local", "short_uncached", False)):  # now cached on decode
            before = wait_idle(url)
            out = cases.run(client, case)
            after = wait_idle(url)
            assert out.token_ids == reference[case.name].token_ids
            assert (after.sum("pd_serve_prefill_total", where=where, reason=reason)
                    - before.sum("pd_serve_prefill_total", where=where, reason=reason)) == 1
            got = (after.sum(SOURCE, source="external_kv_transfer", tier="decode")
                   - before.sum(SOURCE, source="external_kv_transfer", tier="decode"))
            assert got == (out.prompt_tokens if transferred else 0)


def test_ingress_renders_the_same_ids_the_engine_uses(pd_url: str, model_path: str) -> None:
    tok = AutoTokenizer.from_pretrained(model_path)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": cases.text(30, 21)}]
    with httpx.Client(base_url=pd_url, timeout=60) as client:
        before = Scrape.get(pd_url)
        r = client.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": messages,
                                                      "max_tokens": 2, "return_token_ids": True})
        r.raise_for_status()
        after = Scrape.get(pd_url)
    engine_ids = r.json()["prompt_token_ids"]
    ours = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ours = ours if isinstance(ours, list) else ours["input_ids"]
    assert engine_ids == ours
    assert (after.sum("pd_serve_routed_prompt_tokens_total", tier="decode")
            - before.sum("pd_serve_routed_prompt_tokens_total", tier="decode")) == len(engine_ids)


def test_a_late_router_rebuilds_an_engines_blocks_from_its_replay_socket(pd_url, model_path) -> None:
    """Warm start (issue 10, item 4): every engine publishes vLLM's KV-event replay socket in its
    routing stats; a subscriber that starts after the engine cached a prompt gets that prompt's
    blocks from the replay buffer, before any new event."""
    from ray import serve

    from scheduler import KVEventSubscriber, PrefixIndex, block_keys

    prompt = cases.text(300, 31)
    ids = AutoTokenizer.from_pretrained(model_path)(prompt).input_ids
    with httpx.Client(base_url=pd_url, timeout=120) as client:
        r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": prompt, "max_tokens": 2,
                                                 "temperature": 0})
        assert r.status_code == 200, r.text
    wait_idle(pd_url)
    stats = serve.get_deployment_handle("DecodeServer", app_name="pd_serve").record_routing_stats.remote().result()
    assert stats["kv_events_replay_endpoint"], stats
    index = PrefixIndex(stats["block_size"])
    sub = KVEventSubscriber(index, stats["kv_events_endpoint"], "decode-0", topic=stats["kv_events_topic"],
                            replay_endpoint=stats["kv_events_replay_endpoint"])
    sub.start(warm=True)
    try:
        deadline = time.monotonic() + 10
        keys = block_keys(ids, stats["block_size"])
        while time.monotonic() < deadline and index.match(keys).get("decode-0", 0) < len(keys):
            time.sleep(0.1)
        assert sub.stats.replayed_batches > 0
        # every full block of the prompt is known without a single live event after the start
        assert index.match(keys).get("decode-0", 0) == len(keys) == len(ids) // stats["block_size"]
    finally:
        sub.stop()
