"""pd_serve.failover: which streams can resume, the continuation request, and the rewrite of
the resumed stream into the original's shape (pure logic; the real failover is tested on
engines in tests/integration/test_failover.py)."""

from __future__ import annotations

import json

import pytest
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from pd_serve import failover


def _comp(**kw) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": [1, 2, 3], "stream": True, **kw})


def _chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, **kw})


@pytest.mark.parametrize("req,ok", [
    (_comp(), True), (_comp(stream=False), False), (_comp(n=2), False), (_comp(echo=True), False),
    (_comp(logprobs=2), True), (_chat(), True), (_chat(logprobs=True), False),
    (_chat(response_format={"type": "json_object"}), False),
    (_chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), False),
])
def test_eligible(req, ok) -> None:
    kind = "chat" if isinstance(req, ChatCompletionRequest) else "completion"
    assert failover.eligible(kind, req, True) is ok
    assert failover.eligible(kind, req, False) is False  # no prompt ids: nothing to resume from


def test_track_mode_keeps_ids_only_when_the_client_asked() -> None:
    assert failover.track_mode("completion", _comp(), True, True) == failover.TRACK_STRIP
    assert failover.track_mode("completion", _comp(return_token_ids=True), True, True) == failover.TRACK_KEEP
    assert failover.track_mode("completion", _comp(), True, False) == failover.TRACK_OFF


def test_resume_body_of_a_completion_continues_the_budget_and_sampling() -> None:
    req = _comp(max_tokens=10, temperature=0, min_tokens=6, stop=["x"], seed=3,
                stream_options={"include_usage": True})
    body = failover.resume_body("completion", req, [1, 2, 3], [7, 8, 9, 10], None, 1)
    assert body["prompt"] == [1, 2, 3, 7, 8, 9, 10] and body["max_tokens"] == 6 and body["min_tokens"] == 2
    assert body["temperature"] == 0 and body["stop"] == ["x"] and body["seed"] == 3
    assert body["stream"] and body["return_token_ids"] and "echo" not in body
    assert body["stream_options"]["include_usage"] is True
    CompletionRequest.model_validate(body)  # vLLM accepts it


def test_resume_body_of_a_chat_becomes_a_completion_with_the_rendered_prompt() -> None:
    req = _chat(max_completion_tokens=5, temperature=0, stop_token_ids=[2])
    body = failover.resume_body("chat", req, [1, 2], [5, 6], None, 1)
    assert body["prompt"] == [1, 2, 5, 6] and body["max_tokens"] == 3 and body["stop_token_ids"] == [2]
    assert "messages" not in body
    CompletionRequest.model_validate(body)


def test_resume_body_without_a_budget_uses_the_context_left() -> None:
    body = failover.resume_body("chat", _chat(), [1] * 10, [2] * 5, 100, 1)
    assert body["max_tokens"] == 85
    assert failover.resume_body("chat", _chat(), [1] * 10, [2] * 5, None, 1) is None  # unknown context
    assert failover.resume_body("completion", _comp(max_tokens=5), [1], [2] * 5, 100, 1) is None  # all sent


def _sse(*objs) -> str:
    return "".join(f"data: {json.dumps(o) if isinstance(o, dict) else o}\n\n" for o in objs)


def test_track_chunk_reads_ids_and_strips_what_the_client_did_not_ask_for() -> None:
    text = _sse({"id": "c", "prompt_token_ids": [1, 2], "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "token_ids": None, "finish_reason": None, "logprobs": None}]},
                {"id": "c", "choices": [{"index": 0, "delta": {}, "token_ids": [7], "finish_reason": None, "logprobs": None}]},
                {"id": "c", "choices": [{"index": 0, "delta": {"content": "ab"}, "token_ids": [8, 9], "finish_reason": None, "logprobs": None}]},
                "[DONE]")
    out, ids = failover.track_chunk(text, strip=True)
    assert ids == [7, 8, 9]
    events = failover.split_events(out)
    assert events[-1] == "[DONE]" and len(events) == 3  # the empty chunk sent only for its id is gone
    assert all("token_ids" not in e for e in events)
    kept, ids2 = failover.track_chunk(text, strip=False)
    assert kept == text and ids2 == ids


def test_rewriter_gives_resumed_chunks_the_original_chat_shape_and_usage() -> None:
    first = _sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "m",
                  "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    rw = failover.Rewriter("chat", first, prompt_tokens=10, before=4, keep_ids=False, usage=True)
    resumed = _sse({"id": "cmpl-9", "object": "text_completion", "created": 9, "model": "m",
                    "choices": [{"index": 0, "text": "xy", "token_ids": [3, 4], "finish_reason": None,
                                 "prompt_token_ids": [1] * 14}]},
                   {"id": "cmpl-9", "object": "text_completion", "created": 9, "model": "m",
                    "choices": [{"index": 0, "text": "", "token_ids": [5], "finish_reason": "length"}]},
                   {"id": "cmpl-9", "choices": [], "usage": {"prompt_tokens": 14, "completion_tokens": 3,
                                                             "total_tokens": 17}},
                   "[DONE]")
    events = failover.split_events(rw(resumed))
    a, b, u = (json.loads(e) for e in events[:3])
    assert events[3] == "[DONE]"
    assert (a["id"], a["object"], a["created"]) == ("chatcmpl-1", "chat.completion.chunk", 5)
    assert a["choices"][0]["delta"] == {"content": "xy"} and "token_ids" not in a["choices"][0]
    assert b["choices"][0]["finish_reason"] == "length"
    assert u["usage"] == {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17}


def test_rewriter_keeps_completion_ids_when_asked_and_drops_usage_when_not() -> None:
    first = _sse({"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "m",
                  "choices": [{"index": 0, "text": "a", "token_ids": [1]}]})
    rw = failover.Rewriter("completion", first, prompt_tokens=3, before=1, keep_ids=True, usage=False)
    events = failover.split_events(rw(_sse(
        {"id": "cmpl-9", "choices": [{"index": 0, "text": "b", "token_ids": [2], "prompt_token_ids": [9, 9, 9, 1]}]},
        {"id": "cmpl-9", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}})))
    (only,) = events
    c = json.loads(only)
    assert c["id"] == "cmpl-1" and c["choices"][0]["token_ids"] == [2] and "prompt_token_ids" not in c["choices"][0]
