"""failure_policy: retry_prefill — the pieces that are pure logic.

The whole path (prefill killed between its answer and decode's pull, decode prefills again on
the restarted replica) runs on real engines in tests/integration/test_transfer.py.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from pd_serve.config import AppConfig
from pd_serve.engine import plan_engine
from pd_serve.protocol import RoutingHint
from pd_serve.routing import PrefixAwareRouter, RoundRobinRouter
from pd_serve.servers import _stream_head
from tests.unit.conftest import config_args


def _sse(obj) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


ROLE = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
ERROR = {"error": {"message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500}}
TOKEN = {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
TEXT = {"choices": [{"index": 0, "text": "hi", "finish_reason": None}]}


async def _batches(*batches):
    for b in batches:
        await asyncio.sleep(0)
        yield [_sse(x) for x in b]


@pytest.mark.parametrize("batches, failed, consumed", [
    ([[ROLE], [ERROR, "[DONE]"]], True, 2),     # chat: role chunk, then the failed pull
    ([[ROLE, ERROR, "[DONE]"]], True, 1),       # the same, drained together
    ([[ERROR, "[DONE]"]], True, 1),             # completions
    ([[ROLE], [TOKEN], [TOKEN]], False, 2),     # output: stop reading, the rest stays in the stream
    ([[TEXT], [TEXT]], False, 1),
    ([["[DONE]"]], False, 1),
])
async def test_stream_head_reads_up_to_the_first_output_or_error(batches, failed, consumed) -> None:
    stream = _batches(*batches)
    head, pull_failed = await _stream_head(stream)
    assert pull_failed is failed and len(head) == consumed
    rest = [b async for b in stream]
    assert len(rest) == len(batches) - consumed, "the stream must be resumable after the head"


def _with(**kv_transfer):
    args = config_args("llama70b.yaml")
    return {**args, "kv_transfer": {**args.get("kv_transfer", {}), **kv_transfer}}


def test_decode_engine_fails_pulls_under_retry_and_fail_and_recomputes_otherwise() -> None:
    want = {"local_prefill": "recompute", "retry_prefill": "fail", "fail": "fail"}
    for policy, vllm_policy in want.items():
        cfg = AppConfig.model_validate(_with(failure_policy=policy))
        p = plan_engine(cfg, "decode", replica_tag="r1", host="10.0.0.5", side_channel_port=25601, core=None)
        assert p.engine_kwargs["kv_transfer_config"]["kv_load_failure_policy"] == vllm_policy, policy
    with pytest.raises(ValueError, match="prefill_retries"):
        AppConfig.model_validate(_with(prefill_retries=0))


def _replica(rid: str):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid), routing_stats={})


def _pending(hint: RoutingHint):
    return SimpleNamespace(args=["completion", None, hint], kwargs={},
                           metadata=SimpleNamespace(internal_request_id=hint.request_id))


@pytest.mark.parametrize("router_cls", [PrefixAwareRouter, RoundRobinRouter])
async def test_routers_avoid_excluded_replicas_but_never_answer_nothing(router_cls) -> None:
    router = object.__new__(router_cls)
    router.initialize_state(tier="prefill", block_size=4)
    replicas = [_replica(r) for r in ("a", "b", "c")]
    for ids in ([1, 2, 3, 4, 5, 6, 7, 8], []):
        hint = RoutingHint("r1", ids, exclude=["a", "c"])
        ranked = await router.choose_replicas(replicas, _pending(hint))
        assert [[r.replica_id.unique_id for r in tier] for tier in ranked] == [["b"]]
    # every candidate excluded: try them again rather than return nothing. Serve re-asks at once
    # on an empty answer, without yielding, which would spin its router loop (seen: a decode
    # replica's handles stalled for 4 minutes).
    for ids in ([1, 2], []):
        ranked = await router.choose_replicas(replicas[:1], _pending(RoutingHint("r2", ids, exclude=["a"])))
        assert [[r.replica_id.unique_id for r in tier] for tier in ranked] == [["a"]]


def test_router_applies_each_stats_report_once() -> None:
    """A replica's routing-stats report (its queued prefill tokens) replaces the router's
    backlog estimate when it arrives, not at every decision: work the router routed since then
    must stay in the estimate until the next report."""
    router = object.__new__(PrefixAwareRouter)
    router.initialize_state(tier="prefill", block_size=4)
    rep = _replica("a")
    rep.routing_stats = {"kv_usage": 0.1, "queued_prefill_tokens": 100.0}
    router._refresh([rep])
    reg = router.sched.registry
    i = reg._view.row["a"]
    assert reg._view.prefill_queued_tokens[i] == 100.0
    reg._view.prefill_queued_tokens[i] = 900.0  # the router's own estimate grows as it routes
    router._refresh([rep])                      # same report again: the estimate is kept
    assert reg._view.prefill_queued_tokens[i] == 900.0
    rep.routing_stats = {"kv_usage": 0.1, "queued_prefill_tokens": 50.0}  # Serve delivers a new one
    router._refresh([rep])
    assert reg._view.prefill_queued_tokens[i] == 50.0
