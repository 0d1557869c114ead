"""Engine errors reach the client with a message (issue 9, gap B).

vLLM answers an exception raised without a message (``EngineGenerateError()``, which AsyncLLM
raises for any failure inside ``generate``) with a 500 whose message is ``""``. Decode and
prefill passed that on as it was. Every error an engine replica answers now goes through
``errors.engine_error_body`` (whole answers) or ``errors.sse_error_messages`` (an in-band error
event in a stream): OpenAI's shape, ``code`` equal to the status, and a blank message replaced by
one naming the tier, the type and the code. No Ray, no engine: vLLM's own error builders.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from pd_serve import errors
from pd_serve.servers import _error_json, _error_messages

KEYS = {"message", "type", "param", "code"}


def _vllm_error(exc: Exception):
    """The ErrorResponse vLLM's serving classes build for ``exc`` (what EngineHost.create returns)."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    return create_error_response(exc)


def _vllm_stream_error(message: str, code: int = 500) -> str:
    """The in-band error event vLLM's streaming generators yield (``create_streaming_error_response``)."""
    from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse

    err = ErrorResponse(error=ErrorInfo(message=message, type="InternalServerError", code=code))
    return f"data: {json.dumps(err.model_dump())}\n\n"


def test_vllms_500_for_an_exception_without_a_message_is_empty_and_we_name_what_failed() -> None:
    from vllm.v1.engine.exceptions import EngineGenerateError

    resp = _vllm_error(EngineGenerateError())
    assert resp.error.code == 500 and resp.error.message == ""  # what vLLM gives: the bug's source
    for tier in ("decode", "prefill"):
        status, body = _error_json(resp, tier)
        err = json.loads(body)["error"]
        assert status == 500 and set(err) == KEYS and err["code"] == 500
        assert err["type"] == "InternalServerError"
        assert err["message"] == f"{tier} engine failed the request: InternalServerError (500); vLLM gave no detail"


@pytest.mark.parametrize("status,err_type", [(500, "InternalServerError"), (503, "ServiceUnavailableError"),
                                             (502, None), (504, "")])
@pytest.mark.parametrize("message", ["", "   ", None])
def test_every_5xx_gets_a_message_with_its_type_and_code(status, err_type, message) -> None:
    err = errors.engine_error_body(status, {"message": message, "type": err_type, "code": status}, "decode")["error"]
    assert set(err) == KEYS and err["code"] == status and err["param"] is None
    assert err["type"] and err["type"].endswith("Error") and "ErrorError" not in err["type"]
    assert err["message"].startswith("decode engine failed the request: ")
    assert err["type"] in err["message"] and f"({status})" in err["message"]


def test_no_error_object_at_all_still_gets_one() -> None:
    assert errors.engine_error_body(500, None, "prefill") == {"error": {
        "message": "prefill engine failed the request: InternalServerError (500); vLLM gave no detail",
        "type": "InternalServerError", "param": None, "code": 500}}


def test_a_message_vllm_gave_is_kept_as_it_is() -> None:
    resp = _vllm_error(ValueError("This model's maximum context length is 1024 tokens"))
    status, body = _error_json(resp, "decode")
    assert status == 400 and json.loads(body) == json.loads(resp.model_dump_json())
    err = errors.engine_error_body(400, {"message": "bad", "type": "BadRequestError", "param": "max_tokens",
                                         "code": 400}, "decode")["error"]
    assert err == {"message": "bad", "type": "BadRequestError", "param": "max_tokens", "code": 400}
    # a 4xx without one says "refused", not "failed"
    assert errors.engine_error_body(400, {"message": ""}, "decode")["error"]["message"].startswith(
        "decode engine refused the request: BadRequestError (400)")


@pytest.mark.parametrize("body", [b"", None, b"  ", b'{"error": {"message": "", "type": "InternalServerError"}}'])
def test_an_empty_serialised_error_gets_one_too(body) -> None:
    err = json.loads(errors.engine_error_json(500, body, "prefill"))["error"]
    assert set(err) == KEYS and err["code"] == 500 and err["type"] == "InternalServerError"
    assert err["message"].startswith("prefill engine failed the request: InternalServerError (500)")


def test_a_serialised_error_that_says_something_keeps_it() -> None:
    body = errors.engine_error_json(502, json.dumps(errors.error_body("remote prefill failed: timeout", 502,
                                                                      "PrefillFailedError")).encode(), "prefill")
    assert json.loads(body)["error"] == {"message": "remote prefill failed: timeout", "type": "PrefillFailedError",
                                         "param": None, "code": 502}
    plain = json.loads(errors.engine_error_json(500, b"upstream exploded", "prefill"))["error"]
    assert plain["message"] == "upstream exploded" and plain["code"] == 500


# --- streams: the in-band error event ------------------------------------------------------

def test_an_empty_in_band_error_event_gets_a_message_and_nothing_else_changes() -> None:
    chunk = 'data: {"id": "cmpl-1", "choices": [{"index": 0, "text": "x"}]}\n\n'
    text = chunk + _vllm_stream_error("") + "data: [DONE]\n\n"
    fixed = errors.sse_error_messages(text, "decode")
    events = fixed.split("\n\n")
    assert fixed.startswith(chunk) and fixed.endswith("data: [DONE]\n\n")
    err = json.loads(events[1].removeprefix("data: "))["error"]
    assert set(err) == KEYS and err["code"] == 500 and err["type"] == "InternalServerError"
    assert err["message"] == "decode engine failed the request: InternalServerError (500); vLLM gave no detail"


@pytest.mark.parametrize("text", [
    'data: {"id": "cmpl-1", "choices": [{"index": 0, "text": "error"}]}\n\n',   # a token that reads "error"
    'data: {"id": "c", "choices": [{"text": "\\"error\\": {}"}]}\n\n',           # ... or looks like the key
    _vllm_stream_error("Internal server error"),                                # a message vLLM gave
    "data: [DONE]\n\n", "",
])
def test_streams_without_an_empty_error_pass_untouched(text: str) -> None:
    assert errors.sse_error_messages(text, "decode") is text


def test_decodes_stream_wrapper_fills_in_the_error_and_closes_the_engine_stream() -> None:
    closed: list[bool] = []

    async def engine_stream():
        try:
            yield ['data: {"choices": [{"text": "a"}]}\n\n']
            yield [_vllm_stream_error(""), "data: [DONE]\n\n"]
            yield ["never read"]
        finally:
            closed.append(True)

    async def go():
        s = _error_messages(engine_stream())
        first = await s.__anext__()
        second = await s.__anext__()
        await s.aclose()  # the client left: the engine's stream (and request) must close too
        return first, second

    first, second = asyncio.run(go())
    assert first == ['data: {"choices": [{"text": "a"}]}\n\n']
    assert json.loads(second[0].removeprefix("data: "))["error"]["message"].startswith("decode engine failed")
    assert second[1] == "data: [DONE]\n\n" and closed == [True]
