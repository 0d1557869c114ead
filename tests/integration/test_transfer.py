"""The transfer lifecycle on real engines: leases, and pulls from a prefill that died."""

from __future__ import annotations

import os
import signal
import time

import pytest
from transformers import AutoTokenizer

from tests.integration import cases
from tests.integration.conftest import wait_idle
from kv_transfer import KVTransferParams
from pd_serve.protocol import answer_items
from tests.support.metrics import Scrape

CASE = cases.ORPHAN


def _handles():
    from ray import serve

    return (serve.get_deployment_handle("PrefillServer", app_name="pd_serve"),
            serve.get_deployment_handle("DecodeServer", app_name="pd_serve"),
            serve.get_deployment_handle("Control", app_name="pd_serve"))


def _prefill_only(model_path: str, request_id: str, case: cases.Case = CASE):
    """Run prefill the way decode would, and never pull: returns its PrefillResult."""
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from kv_transfer import prefill_request_params
    from pd_serve.protocol import RoutingHint

    ids = AutoTokenizer.from_pretrained(model_path)(case.body["prompt"]).input_ids
    body = {**case.body, "prompt": ids, "max_tokens": 1, "request_id": request_id,
            "kv_transfer_params": prefill_request_params()}
    prefill, _, _ = _handles()
    res = prefill.prefill.remote("completion", CompletionRequest(**body), RoutingHint(request_id, ids)).result()
    assert res.status == 200 and res.kv_transfer_params["remote_block_ids"]
    return ids, res


def test_prefill_frees_unpulled_blocks_when_the_lease_expires(pd_url: str, model_path: str) -> None:
    before = wait_idle(pd_url)
    ids, res = _prefill_only(model_path, "never-pulled-1", next(c for c in cases.ALL if c.name == "long"))
    now = Scrape.get(pd_url)
    held = now.values("vllm:kv_cache_usage_perc", tier="prefill")
    assert held and held[0] > 0, "prefill should hold the blocks for decode"
    # the gauge names exactly what is held: this request and its blocks
    blocks = KVTransferParams.from_vllm(res.kv_transfer_params).num_blocks
    assert blocks in (-(-len(ids) // 32), -(-len(ids) // 32) + 1)  # block_size 32 (configs/tiny-cpu.yaml)
    assert now.values("pd_serve_kv_blocks_awaiting_pull", tier="prefill") == [blocks]
    assert now.values("pd_serve_kv_requests_awaiting_pull", tier="prefill") == [1]
    t0 = time.monotonic()
    after = wait_idle(pd_url, timeout=30 + 20)  # lease_s: 30 in configs/tiny-cpu.yaml
    freed_after = time.monotonic() - t0
    assert (after.sum("vllm:nixl_num_kv_expired_reqs_total", tier="prefill")
            - before.sum("vllm:nixl_num_kv_expired_reqs_total", tier="prefill")) == 1
    assert after.values("pd_serve_kv_blocks_awaiting_pull", tier="prefill") == [0]
    assert freed_after > 10, "blocks were freed long before the lease: something else released them"


@pytest.mark.disruptive
def test_pull_from_a_dead_prefill_recomputes_on_decode_with_identical_tokens(
        pd_url: str, model_path: str, reference) -> None:
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from pd_serve.protocol import JSONReply

    wait_idle(pd_url)
    ids, res = _prefill_only(model_path, "orphaned-1")
    _, decode, control = _handles()
    (victim,) = control.replicas.remote("prefill").result()
    os.kill(victim.pid, signal.SIGKILL)  # prefill dies between its answer and decode's pull
    before = Scrape.get(pd_url)
    req = CompletionRequest(**{**CASE.body, "prompt": ids, "request_id": "orphaned-1",
                               "kv_transfer_params": res.kv_transfer_params})
    out = answer_items(decode.options(stream=True).generate.remote("completion", req, None))
    assert len(out) == 1 and isinstance(out[0], JSONReply) and out[0].status == 200, out
    import json

    body = json.loads(out[0].body)
    assert body["choices"][0]["token_ids"] == reference[CASE.name].token_ids
    after = wait_idle(pd_url, engines=1, timeout=60)
    # not silent: decode computed the prompt itself and counted the failed pull
    assert (after.sum("vllm:prompt_tokens_by_source_total", tier="decode", source="local_compute")
            - before.sum("vllm:prompt_tokens_by_source_total", tier="decode", source="local_compute")) >= len(ids) - 32
    assert (after.sum("vllm:prompt_tokens_by_source_total", tier="decode", source="external_kv_transfer")
            - before.sum("vllm:prompt_tokens_by_source_total", tier="decode", source="external_kv_transfer")) == 0
    nixl = {n: after.sum(n, tier="decode") - before.sum(n, tier="decode")
            for n in {name for name, _, _ in after.samples if name.startswith("vllm:nixl_num_")}}
    assert nixl.get("vllm:nixl_num_failed_transfers_total", 0) >= 1, f"the failed pull was not counted: {nixl}"


@pytest.mark.own_app("fail-policy")
def test_failed_pull_under_fail_policy_is_a_clear_error_not_a_silent_recompute(apps, model_path: str) -> None:
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from pd_serve.protocol import JSONReply
    from tests.support.servers import load_app_args

    url = apps.get("fail-policy", load_app_args(kv_transfer={"failure_policy": "fail"}))
    wait_idle(url)
    ids, res = _prefill_only(model_path, "orphaned-2")
    _, decode, control = _handles()
    (victim,) = control.replicas.remote("prefill").result()
    os.kill(victim.pid, signal.SIGKILL)
    before = Scrape.get(url)
    req = CompletionRequest(**{**CASE.body, "prompt": ids, "request_id": "orphaned-2",
                               "kv_transfer_params": res.kv_transfer_params})
    out = answer_items(decode.options(stream=True).generate.remote("completion", req, None))
    assert len(out) == 1 and isinstance(out[0], JSONReply), out
    import json

    err = json.loads(out[0].body)["error"]
    assert out[0].status >= 500 and err["code"] == out[0].status and err["message"], err
    after = wait_idle(url, engines=1, timeout=60)
    assert (after.sum("vllm:prompt_tokens_by_source_total", tier="decode", source="local_compute")
            - before.sum("vllm:prompt_tokens_by_source_total", tier="decode", source="local_compute")) == 0


def _new_prefill_replica(control, victim_pid: int, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reps = control.replicas.remote("prefill").result()
        if reps and reps[0].pid != victim_pid:
            return reps[0]
        time.sleep(2)
    pytest.fail(f"prefill replica did not come back within {timeout}s")


def _stream_token_ids(chunks: list) -> list[int]:
    import json

    ids: list[int] = []
    for event in "".join(chunks).split("\n\n"):
        payload = event.removeprefix("data: ").strip()
        if not payload or payload == "[DONE]":
            continue
        obj = json.loads(payload)
        assert "error" not in obj, obj
        for ch in obj.get("choices") or ():
            ids.extend(ch.get("token_ids") or [])
    return ids


@pytest.mark.own_app("retry-policy")
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_failed_pull_under_retry_policy_prefills_again_on_another_replica(
        apps, model_path: str, reference, stream: bool) -> None:
    """Prefill dies between its answer and decode's pull. Decode's pull fails (its engine runs
    with vLLM's `fail` policy), it asks the prefill tier again excluding the dead replica, gets
    the restarted one, and pulls from it: identical tokens, and the prompt came by transfer."""
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from pd_serve.protocol import JSONReply
    from tests.support.servers import load_app_args

    # prefill_select_timeout_s: long enough for Serve to restart the only prefill replica; a
    # cluster with more than one retries on a live one at once.
    url = apps.get("retry-policy", load_app_args(kv_transfer={
        "failure_policy": "retry_prefill", "prefill_select_timeout_s": 240}))
    wait_idle(url)
    rid = f"orphaned-retry-{'s' if stream else 'w'}"
    _, decode, control = _handles()
    # the other parametrization left this prompt cached on decode: start cold so that the whole
    # prompt has to come by transfer
    assert decode.reset_prefix_cache.remote().result()
    ids, res = _prefill_only(model_path, rid)
    (victim,) = control.replicas.remote("prefill").result()
    assert res.replica_id == victim.replica_id
    os.kill(victim.pid, signal.SIGKILL)
    before = Scrape.get(url)
    body = {**CASE.body, "prompt": ids, "request_id": rid, "kv_transfer_params": res.kv_transfer_params}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    out = answer_items(decode.options(stream=True).generate.remote("completion", CompletionRequest(**body), None))
    if stream:
        assert all(isinstance(x, str) for x in out), out
        token_ids = _stream_token_ids(out)
    else:
        import json

        assert len(out) == 1 and isinstance(out[0], JSONReply) and out[0].status == 200, out
        token_ids = json.loads(out[0].body)["choices"][0]["token_ids"]
    assert token_ids == reference[CASE.name].token_ids

    served_by = _new_prefill_replica(control, victim.pid, timeout=5)
    assert served_by.replica_id != victim.replica_id
    after = wait_idle(url, timeout=60)

    def delta(name: str, **labels) -> float:
        return after.sum(name, tier="decode", **labels) - before.sum(name, tier="decode", **labels)

    assert delta("pd_serve_prefill_retries_total", stage="pull") == 1
    assert delta("pd_serve_prefill_total", where="remote", reason="pull_retry") == 1
    assert delta("vllm:nixl_num_failed_transfers_total") >= 1, "the failed pull was not counted"
    # the answer's KV came from the second prefill, by transfer; decode computed none of it
    assert delta("vllm:prompt_tokens_by_source_total", source="external_kv_transfer") == len(ids)
    assert delta("vllm:prompt_tokens_by_source_total", source="local_compute") == 0
