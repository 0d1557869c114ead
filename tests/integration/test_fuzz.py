"""Fuzz the running app (real engines, real HTTP): no 5xx, every error in OpenAI's shape.

Property-based with hypothesis, driven by the app's own ``/openapi.json``: each generated
request starts from a valid body and sets up to three of the request model's parameters to a
value drawn from that parameter's schema (valid or edge values, deep into vLLM's validators and
the engines) or to arbitrary JSON (wrong types). A smaller share is malformed bodies, non-object
JSON, and wrong methods or unknown paths. Token counts stay small so that the run stays cheap.

Checks, per request: the status is below 500; an error is ``{"error": {message, type, param,
code}}`` with ``code`` equal to the status; a 200 is a completion, or an SSE stream whose events
are JSON and which ends with ``[DONE]``. At the end: every error response was counted in
``pd_serve_ingress_errors_total`` under its status, a plain request still succeeds, ``/health``
is ok, and the leak check passes.

``PD_SERVE_FUZZ_REQUESTS`` (default 2000) sets how many requests are generated.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import wait_idle
from tests.support.metrics import Scrape

REQUESTS = int(os.environ.get("PD_SERVE_FUZZ_REQUESTS", "2000"))
MODEL = "tiny-llama"
ROUTES = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
# Token counts that make an engine work longer: clamped to a few tokens unless invalid
CHEAP = {"max_tokens": 4, "max_completion_tokens": 4, "min_tokens": 4, "n": 3, "best_of": 3}
INT_EDGES = [-(2**63), -1, 0, 1, 2, 2**31, 2**63 - 1, 2**63, 10**30]
FLOAT_EDGES = [-1.5, -0.0, 0.0, 1e-300, 0.5, 1.0, 2.5, 1e308]

_DELETE = object()  # a mutation that removes the parameter
json_leaf = (st.none() | st.booleans() | st.integers(-3, 8) | st.sampled_from(INT_EDGES)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
json_any = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                        max_leaves=6)


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def from_schema(spec: dict[str, Any], schema: dict[str, Any], depth: int = 0) -> st.SearchStrategy:
    """Values that a JSON schema (as FastAPI publishes vLLM's models) allows, with edges; deep
    or unknown parts fall back to arbitrary JSON."""
    schema = _resolve(spec, schema)
    if depth > 4:
        return json_leaf
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(spec, s, depth + 1) for s in schema[key]])
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return from_schema(spec, schema["allOf"][0], depth + 1)
    t = schema.get("type")
    if isinstance(t, list):
        return st.one_of([from_schema(spec, {**schema, "type": x}, depth) for x in t])
    if t == "integer":
        lo, hi = schema.get("minimum"), schema.get("maximum")
        inner = st.integers(min_value=lo if lo is not None else -3, max_value=hi if hi is not None else 8)
        return inner | st.sampled_from(INT_EDGES)
    if t == "number":
        return st.floats(-3, 3, allow_nan=False) | st.sampled_from(FLOAT_EDGES)
    if t == "string":
        return st.text(max_size=12) | st.sampled_from(["", "a", "hello world", "{", "\u0000", "<|eot_id|>"])
    if t == "boolean":
        return st.booleans()
    if t == "null":
        return st.none()
    if t == "array":
        return st.lists(from_schema(spec, schema.get("items", {}), depth + 1), max_size=3)
    if t == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = [k for k in schema.get("required", []) if k in props]
        optional = {k: from_schema(spec, v, depth + 1) for k, v in props.items() if k not in required}
        if props:
            return st.fixed_dictionaries({k: from_schema(spec, props[k], depth + 1) for k in required},
                                         optional=optional)
        return st.dictionaries(st.text(max_size=6), json_leaf, max_size=3)
    return json_any


def _base(kind: str) -> st.SearchStrategy:
    words = st.lists(st.sampled_from("the cache block token prefill decode engine".split()), min_size=1,
                     max_size=12).map(" ".join)
    common = {"model": st.just(MODEL), "max_tokens": st.integers(1, 3), "stream": st.booleans(),
              "temperature": st.sampled_from([0, 0.7])}
    if kind == "completion":
        prompt = words | st.lists(st.integers(0, 1023), min_size=1, max_size=16)
        return st.fixed_dictionaries({**common, "prompt": prompt})
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": words})
    return st.fixed_dictionaries({**common, "messages": st.lists(message, min_size=1, max_size=3)})


def _cheap(body: dict[str, Any], kind: str) -> dict[str, Any]:
    for key, cap in CHEAP.items():
        v = body.get(key)
        if type(v) is int and cap < v < 2**63:
            body[key] = 1 + v % cap
    if kind == "chat" and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 2  # chat's default is the whole context
    return body


def request_strategy(spec: dict[str, Any]) -> st.SearchStrategy:
    """One generated request: (method, path, body bytes or None)."""
    mutated = []
    for path, kind in ROUTES.items():
        schema = _resolve(spec, spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"])
        props = schema["properties"]
        values = {name: from_schema(spec, prop) | json_any for name, prop in props.items()}
        mutation = st.lists(st.sampled_from(sorted(values)).flatmap(
            lambda name, values=values: st.tuples(st.just(name), values[name] | st.just(_DELETE))), max_size=3)

        def build(base_and_changes, kind=kind):
            base, changes = dict(base_and_changes[0]), base_and_changes[1]
            for name, value in changes:
                if value is _DELETE:
                    base.pop(name, None)
                else:
                    base[name] = value
            return json.dumps(_cheap(base, kind)).encode()
        mutated.append(st.tuples(st.just("POST"), st.just(path),
                                 st.tuples(_base(kind), mutation).map(build)))
    malformed = st.one_of(
        st.binary(max_size=40),
        json_any.map(lambda v: json.dumps(v).encode()),
        st.tuples(_base("completion"), st.integers(1, 60)).map(lambda t: json.dumps(t[0]).encode()[:t[1]]),
        st.just(b'{"model": "tiny-llama", "prompt": "a", "max_tokens": NaN}'))
    other = st.tuples(st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "POST"]),
                      st.sampled_from([*ROUTES, "/health", "/v1/models", "/metrics", "/v1/embeddings", "/", "/v2/x"]),
                      st.none() | st.just(b"{}"))
    return st.one_of(mutated[0], mutated[1],
                     st.tuples(st.just("POST"), st.sampled_from(sorted(ROUTES)), malformed), other)


def check_response(r: httpx.Response) -> None:
    """The invariants every answer keeps, whatever was sent."""
    assert r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) >= {"message", "type", "param", "code"}, err
        assert err["code"] == r.status_code, err
        assert isinstance(err["message"], str) and err["message"], err
        assert isinstance(err["type"], str) and err["type"], err
        assert err["param"] is None or isinstance(err["param"], str), err
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", r.text[-300:]
        for e in events[:-1]:
            obj = json.loads(e)
            if "error" in obj:
                assert obj["error"]["message"] and obj["error"]["code"] >= 400, obj
    elif r.request.method == "POST" and r.request.url.path in ROUTES:
        assert r.json()["choices"], r.text[:300]


def test_openapi_describes_the_request_bodies(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    for path, required in (("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")):
        op = spec["paths"][path]["post"]
        schema = _resolve(spec, op["requestBody"]["content"]["application/json"]["schema"])
        assert {"model", "max_tokens", "stream", required} <= set(schema["properties"]), path
        err = _resolve(spec, op["responses"]["400"]["content"]["application/json"]["schema"])
        assert "error" in err["properties"]
    refs = {s.rsplit("/", 1)[-1] for s in _refs(spec)}
    assert refs <= set(spec["components"]["schemas"]), refs - set(spec["components"]["schemas"])


def _refs(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return [obj["$ref"]] if isinstance(obj.get("$ref"), str) else [r for v in obj.values() for r in _refs(v)]
    if isinstance(obj, list):
        return [r for v in obj for r in _refs(v)]
    return []


def test_fuzz_no_5xx_and_every_error_in_openai_shape(pd_url: str, client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    before = Scrape.get(pd_url).by("pd_serve_ingress_errors_total", "status")
    statuses: Counter[int] = Counter()
    t0 = time.monotonic()

    @settings(max_examples=REQUESTS, deadline=None, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(request_strategy(spec))
    def one(req: tuple[str, str, bytes | None]) -> None:
        method, path, body = req
        r = client.request(method, path, content=body, timeout=60,
                           headers={"content-type": "application/json"} if body is not None else {})
        statuses[r.status_code] += 1
        check_response(r)

    one()
    took = time.monotonic() - t0
    print(f"fuzz: {sum(statuses.values())} requests in {took:.0f} s, by status {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= REQUESTS
    assert statuses[200] > REQUESTS // 10, statuses  # the engines were reached, not only validation
    # every error response was counted under its status
    after = Scrape.get(pd_url).by("pd_serve_ingress_errors_total", "status")
    counted = {int(s): after.get(s, 0) - before.get(s, 0) for s in after}
    assert {s: n for s, n in counted.items() if n} == {s: n for s, n in statuses.items() if s >= 400}
    ok = client.post("/v1/completions", json={"model": MODEL, "prompt": "still up", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    assert client.get("/health").json()["status"] == "ok"
    wait_idle(pd_url)
