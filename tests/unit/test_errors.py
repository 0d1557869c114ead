"""The error tree, the mapping of third-party exceptions onto it, and request validation with
vLLM's real request models (no Ray cluster, no engine)."""

from __future__ import annotations

import json
import pickle

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from pd_serve import errors, validation
from pd_serve.errors import BadRequest, NotFound, PDServeError, Unsupported

M = "tiny-llama"
U = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def models():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return {"completion": CompletionRequest, "chat": ChatCompletionRequest}


def parse(models, kind: str, body) -> object:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return validation.parse(models[kind], raw, {M})


def refused(models, kind: str, body) -> PDServeError:
    with pytest.raises(PDServeError) as info:
        parse(models, kind, body)
    return info.value


def test_every_error_in_the_tree_is_openai_shaped_with_code_equal_to_status():
    classes = [errors.BadRequest, errors.Unsupported, errors.Unauthorized, errors.NotFound,
               errors.MethodNotAllowed, errors.TooLarge, errors.Internal, errors.PrefillFailed,
               errors.Unavailable]
    for cls in classes:
        body = cls("why", "p").body()
        assert set(body) == {"error"}
        assert body["error"] == {"message": "why", "type": body["error"]["type"], "param": "p", "code": cls.status}
        assert body["error"]["type"].endswith("Error")
    assert errors.Unsupported.status == 400 and errors.Internal("x").body()["error"]["type"] == "InternalServerError"


def test_of_status_keeps_the_shape_for_statuses_outside_the_tree():
    assert isinstance(errors.of_status(503, "busy"), errors.Unavailable)
    e = errors.of_status(429, "slow down", err_type="RateLimitError")
    assert e.body()["error"] == {"message": "slow down", "type": "RateLimitError", "param": None, "code": 429}
    assert errors.of_status(422, "x").body()["error"]["code"] == 422


@pytest.mark.parametrize("loc,param", [
    (("prompt",), "prompt"),
    (("prompt", "list[int]", 0), "prompt.0"),
    (("messages", 0, "content", "ChatCompletionContentPartTextParam", "text"), "messages.0.content.text"),
    (("stop", "function-wrap[check()]", "str"), "stop"),
    (("model", "str"), "model"),
    ((), None),
])
def test_param_from_loc_drops_pydantic_internal_steps(loc, param):
    assert errors.param_from_loc(loc) == param


# The issue's reproducers, each answered 500 on main before this change (issue 9).
REPRODUCERS = [
    ("completion", {"model": M, "prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ("completion", {"model": M, "prompt": ""}, "prompt"),
    ("completion", {"model": M}, "prompt"),
    ("chat", {"model": M, "messages": U, "top_logprobs": 5}, "top_logprobs"),
    ("chat", {"model": M, "messages": U, "tool_choice": "auto"}, "tool_choice"),
    ("chat", {"model": M, "messages": U, "tools": []}, "tools"),
    ("completion", {"model": M, "prompt": "hi", "cache_salt": ""}, "cache_salt"),
    ("completion", {"model": M, "prompt": "hi", "structured_outputs": {"regex": "a", "choice": ["b"]}},
     "structured_outputs"),
    ("completion", {"model": M, "prompt": "hi", "structured_outputs": "x"}, "structured_outputs"),
    ("chat", {"model": M, "messages": U, "response_format": {"type": "json_schema"}}, "response_format"),
    ("chat", {"model": M, "messages": 1}, "messages"),
    ("completion", {"model": M, "prompt": "hi", "use_beam_search": True}, "use_beam_search"),
    ("chat", {"model": M, "messages": U, "use_beam_search": True}, "use_beam_search"),
    ("chat", {"model": M, "messages": [{"role": "user", "content": [{"type": "bogus"}]}]}, "messages.0.content.0"),
    ("completion", {"prompt": "hi", "max_tokens": 2}, "model"),
]


@pytest.mark.parametrize("kind,body,param", REPRODUCERS, ids=[f"{k}-{p}-{i}" for i, (k, _, p) in enumerate(REPRODUCERS)])
def test_the_issue_reproducers_are_400s_that_name_the_parameter(models, kind, body, param):
    e = refused(models, kind, body)
    assert isinstance(e, BadRequest) and e.status == 400
    assert e.param == param, e.message
    assert e.message and "\n" not in e.message


def test_an_integer_the_engine_cannot_receive_is_a_400_naming_where_it_is(models):
    """Found by the fuzz test: msgpack carries 64-bit integers only, so a larger one failed
    inside the engine with an empty 500."""
    for kind, body, param in [
        ("chat", {"model": M, "messages": U, "stream_interval": 10**30}, "stream_interval"),
        ("completion", {"model": M, "prompt": "hi", "vllm_xargs": {"a": -(2**64)}}, "vllm_xargs.a"),
        ("completion", {"model": M, "prompt": "hi", "stop_token_ids": [1, 2**64]}, "stop_token_ids.1"),
    ]:
        e = refused(models, kind, body)
        assert e.status == 400 and e.param == param and "64 bits" in e.message
    ok = parse(models, "completion", {"model": M, "prompt": "hi", "seed": 2**63 - 1, "priority": -(2**63)})
    assert ok.seed == 2**63 - 1


def test_beam_search_says_that_pd_cannot_serve_it(models):
    e = refused(models, "completion", {"model": M, "prompt": "hi", "use_beam_search": True})
    assert isinstance(e, Unsupported) and "not supported" in e.message


def test_unknown_model_is_404_and_client_kv_transfer_params_400(models):
    e = refused(models, "completion", {"model": "gpt-9", "prompt": "hi"})
    assert isinstance(e, NotFound) and e.param == "model"
    e = refused(models, "completion", {"model": M, "prompt": "hi", "kv_transfer_params": {"remote_host": "x"}})
    assert e.status == 400 and e.param == "kv_transfer_params"
    for field in ("max_tokens", "max_completion_tokens"):
        e = refused(models, "chat", {"model": M, "messages": U, field: 0})
        assert e.status == 400 and e.param == field


@pytest.mark.parametrize("raw,message", [
    (b'{"model": "tiny-llama", "prompt": ', "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[1, 2]", "should be an object"),
    (b"null", "should be an object"),
])
def test_a_body_that_is_not_a_json_object_is_a_400_without_param(models, raw, message):
    e = refused(models, "completion", raw)
    assert e.status == 400 and e.param is None and message in e.message


def test_valid_requests_pass_and_pickle(models):
    """A request crosses Ray pickled: content parts, validated lazily by pydantic, must be
    plain lists by then."""
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    for kind, body in [
        ("chat", {"model": M, "messages": [{"role": "user", "content": parts}], "max_tokens": 2}),
        ("chat", {"model": M, "messages": U, "max_completion_tokens": "3"}),
        ("completion", {"model": M, "prompt": [1, 2, 3], "max_tokens": 2, "n": 2}),
        ("completion", {"model": M, "prompt": ["a", "b"], "max_tokens": "2"}),
    ]:
        req = parse(models, kind, body)
        again = pickle.loads(pickle.dumps(req))
        assert again.model == M
    assert parse(models, "chat", {"model": M, "messages": U, "max_completion_tokens": "3"}).max_completion_tokens == 3


def test_bad_field_locates_the_parameter_a_validator_tripped_over(models):
    assert validation.bad_field(models["chat"], b'{"model": "m", "messages": 1}')[0] == "messages"
    assert validation.bad_field(models["completion"], b'{"model": "m", "prompt": "hi"}') is None
    assert validation.bad_field(models["completion"], b"not json") is None


def test_openapi_bodies_come_from_the_request_models(models):
    spec = {"paths": {"/v1/completions": {"post": {"responses": {}}}}}
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    out = validation.add_request_bodies(spec, {"/v1/completions": models["completion"]}, ErrorResponse)
    op = out["paths"]["/v1/completions"]["post"]
    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/CompletionRequest"
    assert "prompt" in out["components"]["schemas"]["CompletionRequest"]["properties"]
    assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    refs = set()

    def walk(o):
        if isinstance(o, dict):
            if isinstance(o.get("$ref"), str):
                refs.add(o["$ref"].rsplit("/", 1)[-1])
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
    walk(out)
    assert refs <= set(out["components"]["schemas"])


# -- the ingress's app: routing errors, the catch-all -------------------------------------------

def _errors_total(status: str) -> float:
    from pd_serve import metrics as m

    return m.INGRESS_ERRORS.labels(status)._value.get()


def test_routing_errors_of_the_ingress_app_are_openai_shaped_and_counted():
    from pd_serve.ingress import app

    c = TestClient(app)
    for method, path, status in [("GET", "/nope", 404), ("GET", "/v1/completions", 405),
                                 ("POST", "/health", 405), ("DELETE", "/v1/chat/completions", 405)]:
        before = _errors_total(str(status))
        r = c.request(method, path)
        assert r.status_code == status
        assert r.json()["error"]["code"] == status and path in r.json()["error"]["message"]
        assert _errors_total(str(status)) == before + 1


def test_the_catch_all_turns_an_exception_into_a_counted_500_but_leaves_a_started_stream_alone():
    from pd_serve.ingress import _CatchAll

    app = FastAPI()
    app.add_middleware(_CatchAll)

    @app.get("/boom")
    async def boom():
        raise KeyError("secret detail")

    async def broken():
        yield "data: 1\n\n"
        raise RuntimeError("mid-stream")

    @app.get("/stream")
    async def stream():
        return StreamingResponse(broken(), media_type="text/event-stream")

    c = TestClient(app, raise_server_exceptions=False)
    before = _errors_total("500")
    r = c.get("/boom")
    assert r.status_code == 500
    assert r.json() == {"error": {"message": "internal error: KeyError", "type": "InternalServerError",
                                  "param": None, "code": 500}}
    assert _errors_total("500") == before + 1
    with pytest.raises(RuntimeError):
        TestClient(app).get("/stream")
    assert _errors_total("500") == before + 1
