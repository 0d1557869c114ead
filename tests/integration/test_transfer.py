"""The transfer lifecycle on real engines: leases, and pulls from a prefill that died."""

from __future__ import annotations

import os
import signal
import time

import pytest
from transformers import AutoTokenizer

from tests.integration import cases
from tests.integration.conftest import wait_idle
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
    _, res = _prefill_only(model_path, "never-pulled-1", next(c for c in cases.ALL if c.name == "long"))
    held = Scrape.get(pd_url).values("vllm:kv_cache_usage_perc", tier="prefill")
    assert held and held[0] > 0, "prefill should hold the blocks for decode"
    t0 = time.monotonic()
    after = wait_idle(pd_url, timeout=30 + 20)  # lease_s: 30 in configs/tiny-cpu.yaml
    freed_after = time.monotonic() - t0
    assert (after.sum("vllm:nixl_num_kv_expired_reqs_total", tier="prefill")
            - before.sum("vllm:nixl_num_kv_expired_reqs_total", tier="prefill")) == 1
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
    out = [x for x in decode.options(stream=True).generate.remote("completion", req, None)]
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
    out = [x for x in decode.options(stream=True).generate.remote("completion", req, None)]
    assert len(out) == 1 and isinstance(out[0], JSONReply), out
    import json

    err = json.loads(out[0].body)["error"]
    assert out[0].status >= 500 and err["code"] == out[0].status and err["message"], err
    after = wait_idle(url, engines=1, timeout=60)
    assert (after.sum("vllm:prompt_tokens_by_source_total", tier="decode", source="local_compute")
            - before.sum("vllm:prompt_tokens_by_source_total", tier="decode", source="local_compute")) == 0
