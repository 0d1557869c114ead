"""pd_serve's error tree, the mapping of third-party exceptions onto it, and the one function
that builds OpenAI-shaped error bodies outside vLLM.

Every error a client sees is in OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, with ``code`` equal to the HTTP status. Bodies come from two places:

- vLLM's own serving classes (``ErrorResponse``) for what the engine validates: context length,
  sampling parameters, failed generations. The engine replicas pass those on through
  ``engine_error_body`` (whole answers) and ``sse_error_messages`` (an error event in a stream):
  vLLM's fields as they are, except that a blank message (vLLM's 500 for an exception raised
  without one, e.g. ``EngineGenerateError()``) gets one naming the tier, the type and the code.
- ``error_body`` for everything pd_serve decides itself: the ingress by way of this tree, decode
  directly for its 502 (a body that crosses Ray as bytes inside a ``JSONReply``)::

    PDServeError                  status, type, param; .body() is error_body(...)
    ├── BadRequest          400   a body that is not JSON, or that vLLM's request models refuse
    │   │                         (the message and `param` name the parameter); a missing `model`;
    │   │                         `max_tokens` < 1; client-set `kv_transfer_params`; an
    │   │                         integer over 64 bits (the engine's msgpack cannot carry it)
    │   └── Unsupported     400   a valid parameter that disaggregated serving cannot honour
    │                             (`use_beam_search`)
    ├── Unauthorized        401   a missing, wrong or revoked API key
    ├── NotFound            404   an unknown model or path
    ├── MethodNotAllowed    405   a known path with the wrong method (GET /v1/completions)
    ├── TooLarge            413   a body over `ingress.max_body_bytes`
    ├── RateLimited         429   a tenant over its token budget or its concurrency cap
    │                             (pd_serve/admission.py; carries Retry-After and x-ratelimit-*)
    ├── Internal            500   anything unexpected, named by its exception type only
    ├── PrefillFailed       502   remote prefill failed under `failure_policy: fail`
    └── Unavailable         503   no decode replica could take the request; admission's queues
                                  full, the predicted wait past the deadline, or shed for a
                                  higher priority (with Retry-After)

An error may carry response ``headers`` (``Retry-After``, ``x-ratelimit-*``); the ingress sends
them with its body.

Third-party exceptions are mapped at the boundary where they are caught, never passed to
clients raw:

- ``validation_error`` (called by ``pd_serve.validation``): what validating a body with vLLM's
  request models raised (pydantic's ``ValidationError``, vLLM's ``VLLMValidationError`` from its
  model validators, or a plain ``TypeError``/``AttributeError`` a validator hit on a wrong type)
  -> ``BadRequest`` naming the parameter;
- ``http_error``: Starlette's ``HTTPException`` (unknown path, wrong method) -> its status;
- ``request_validation_error``: FastAPI's ``RequestValidationError`` -> ``BadRequest``;
- ``internal``: anything else -> ``Internal``.

The ingress turns a ``PDServeError`` into a response and counts it in
``pd_serve_ingress_errors_total{status}`` in one function (``ingress._respond``).
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any, Iterable, Mapping


def error_body(message: str, status: int, err_type: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object, the same shape vLLM's ``ErrorResponse`` serialises to."""
    if err_type is None:
        try:
            err_type = HTTPStatus(status).phrase.replace(" ", "")
            err_type += "" if err_type.endswith("Error") else "Error"  # not "InternalServerErrorError"
        except ValueError:
            err_type = "Error"
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def engine_error_body(status: int, error: Mapping[str, Any] | None, source: str) -> dict[str, Any]:
    """What the client gets for an engine's error answer: vLLM's error object (its
    ``ErrorResponse.error`` as a dict; None or partial if the engine gave less) in OpenAI's shape
    with ``code`` equal to ``status``. A blank message gets one that names what failed, e.g.
    ``decode engine failed the request: InternalServerError (500); vLLM gave no detail``
    (``source`` is the tier: ``prefill`` or ``decode``)."""
    err = error if isinstance(error, Mapping) else {}
    err_type = str(err.get("type") or "").strip() or None
    param = err.get("param")
    message = str(err.get("message") or "").strip()
    if not message:
        shown = err_type or error_body("", status)["error"]["type"]
        what = "failed the request" if status >= 500 else "refused the request"
        message = f"{source} engine {what}: {shown} ({status}); vLLM gave no detail"
    return error_body(message, status, err_type, param if isinstance(param, str) else None)


def engine_error_json(status: int, body: bytes | str | None, source: str) -> bytes:
    """``engine_error_body`` for an error answer already serialised (a ``JSONReply`` or
    ``PrefillResult`` body): empty, not JSON, or an OpenAI error object."""
    error: Any = None
    raw = body.decode("utf-8", "replace") if isinstance(body, bytes) else (body or "")
    if raw.strip():
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            error = parsed["error"]
        elif isinstance(parsed, dict) and "message" in parsed:  # a bare error object
            error = parsed
        else:  # not an error object: its text is the best message there is
            error = {"message": _short(raw.strip())}
    return json.dumps(engine_error_body(status, error, source)).encode()


def sse_error_messages(text: str, source: str) -> str:
    """An SSE text (``data: ...`` events) with each in-band error event's blank message filled
    in, as ``engine_error_body`` does; any other text is returned as it is (and at once when it
    holds no ``"error"``: a JSON key cannot appear in a token's text unescaped)."""
    if '"error"' not in text:
        return text
    out: list[str] = []
    changed = False
    for event in text.split("\n\n"):
        payload = event.removeprefix("data: ") if event.startswith("data: ") else None
        if payload is not None and payload.lstrip().startswith("{"):
            try:
                obj = json.loads(payload)
            except ValueError:
                obj = None
            err = obj.get("error") if isinstance(obj, dict) else None
            if isinstance(err, dict) and not str(err.get("message") or "").strip():
                code = err.get("code")
                status = code if isinstance(code, int) and 100 <= code <= 599 else 500
                event = "data: " + json.dumps(engine_error_body(status, err, source))
                changed = True
        out.append(event)
    return "\n\n".join(out) if changed else text


class PDServeError(Exception):
    """An error answered to the client with ``status`` and ``body()``."""

    status = 500
    err_type: str | None = None  # None: derived from the status ("BadRequestError", ...)
    headers: dict[str, str] | None = None  # sent with the body (Retry-After, x-ratelimit-*)

    def __init__(self, message: str, param: str | None = None, *,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if headers is not None:
            self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.err_type, self.param)


class BadRequest(PDServeError):
    status = 400


class Unsupported(BadRequest):
    """A parameter vLLM accepts but the P/D path cannot serve; the message says why."""


class Unauthorized(PDServeError):
    status = 401
    err_type = "AuthenticationError"


class NotFound(PDServeError):
    status = 404
    err_type = "NotFoundError"


class MethodNotAllowed(PDServeError):
    status = 405


class TooLarge(PDServeError):
    status = 413
    err_type = "RequestTooLargeError"


class RateLimited(PDServeError):
    """Over a tenant's token budget or concurrency cap; ``headers`` say when to retry."""

    status = 429
    err_type = "RateLimitError"


class Internal(PDServeError):
    status = 500
    err_type = "InternalServerError"


class PrefillFailed(PDServeError):
    status = 502
    err_type = "PrefillFailedError"


class Unavailable(PDServeError):
    status = 503
    err_type = "ServiceUnavailableError"


_BY_STATUS: dict[int, type[PDServeError]] = {
    c.status: c for c in (BadRequest, Unauthorized, NotFound, MethodNotAllowed, TooLarge, RateLimited,
                          Internal, PrefillFailed, Unavailable)}

# pydantic-core's names for wrapper and union-branch steps in an error's `loc`: not parameters
_INTERNAL_LOC = frozenset({
    "function-wrap", "function-after", "function-before", "function-plain", "json-or-python",
    "lax-or-strict", "chain", "default", "nullable", "tagged-union", "union", "call", "arguments",
    "is-instance", "is-subclass", "callable", "str", "int", "float", "bool", "bytes", "bytearray",
    "list", "tuple", "dict", "set", "frozenset", "complex", "none", "nonetype", "generator",
    "typed-dict", "dataclass", "literal", "enum", "any"})
_MAX_MESSAGE = 500


def param_from_loc(loc: Iterable[Any]) -> str | None:
    """A pydantic error location as a dotted parameter path (``messages.0.content``), without
    pydantic's internal steps (``function-wrap[...]``, union branch names)."""
    parts = [str(p) for p in loc if isinstance(p, int) or not _internal_step(str(p))]
    return ".".join(parts) or None


def _internal_step(step: str) -> bool:
    # brackets: "function-wrap[...]", "list[int]"; capitalised: a union branch named by its
    # class ("ChatCompletionContentPartTextParam"); OpenAI's parameters are snake_case
    return bool(re.search(r"[\[\](){}]", step)) or step[:1].isupper() or step.lower() in _INTERNAL_LOC


def _short(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "...[truncated]"


def validation_error(e: BaseException, *, prefix: tuple[Any, ...] = (),
                     locate: Any = None) -> BadRequest:
    """What validating a request body raised, as a 400 that names the parameter.

    ``prefix``: where the validated value sits in the body (for values validated lazily, such
    as a chat message's content parts). ``locate``: a callable that returns the offending
    parameter's ``(param, message)`` or None; it is asked for exceptions that carry no location
    of their own (a vLLM validator that hit a ``TypeError`` on a wrong type).
    """
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        errors = e.errors(include_url=False, include_input=False)
        if any(err.get("type") == "json_invalid" for err in errors):
            return BadRequest("request body is not valid JSON")
        first = errors[0] if errors else {}
        param = param_from_loc((*prefix, *first.get("loc", ())))
        msg = str(first.get("msg", "invalid value"))
        # a ValueError raised by a validator reads "Value error, <its message>"
        msg = msg.removeprefix("Value error, ")
        more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
        if param is None:
            return BadRequest(_short(f"request body: {msg}{more}"))
        return BadRequest(_short(f"{param}: {msg}{more}"), param)
    parameter = getattr(e, "parameter", None)  # vllm.exceptions.VLLMValidationError
    if parameter is not None:
        message = str(e.args[0]) if e.args else str(e)
        return BadRequest(_short(message), parameter)
    found = locate() if locate is not None else None
    if found is not None:
        param, message = found
        return BadRequest(_short(f"{param}: {message}"), param)
    return BadRequest(_short(f"invalid request: {e}"))


def of_status(status: int, message: str, param: str | None = None, err_type: str | None = None) -> PDServeError:
    """The tree's error for ``status`` (``err_type`` overrides its type); a status outside the
    tree still gets the shape, with ``code`` equal to the status."""
    cls = _BY_STATUS.get(status, PDServeError)
    err = cls(message, param)
    if cls is PDServeError:
        err.status = status
    if err_type is not None:
        err.err_type = err_type
    return err


def http_error(status: int, detail: Any, method: str = "", path: str = "") -> PDServeError:
    """Starlette's ``HTTPException`` (routing: unknown path, wrong method) in the tree."""
    if status == 404:
        return NotFound(f"no route for {method} {path}".replace("  ", " "))
    if status == 405:
        return MethodNotAllowed(f"method {method} is not allowed on {path}")
    if isinstance(detail, str):
        message = detail
    else:
        try:
            message = HTTPStatus(status).phrase
        except ValueError:
            message = f"HTTP {status}"
    return of_status(status, message)


def request_validation_error(errors: list[dict[str, Any]]) -> BadRequest:
    """FastAPI's ``RequestValidationError`` (a route's declared parameters) as a 400."""
    first = errors[0] if errors else {}
    loc = tuple(first.get("loc", ()))
    param = param_from_loc(loc[1:] if loc and loc[0] in ("body", "query", "path", "header", "cookie") else loc)
    msg = str(first.get("msg", "invalid request"))
    return BadRequest(_short(f"{param}: {msg}" if param else msg), param)


def internal(e: BaseException) -> Internal:
    """Anything unexpected: named by its type only, so no internals leak to clients."""
    return Internal(f"internal error: {type(e).__name__}")
