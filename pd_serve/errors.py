"""pd_serve's error tree, the mapping of third-party exceptions onto it, and the one function
that builds OpenAI-shaped error bodies outside vLLM.

Every error a client sees is in OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, with ``code`` equal to the HTTP status. Bodies come from two places:

- vLLM's own serving classes (``ErrorResponse``) for what the engine validates: context length,
  sampling parameters, failed generations. The engine replicas pass those bodies through as they are.
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

import re
from http import HTTPStatus
from typing import Any, Iterable


def error_body(message: str, status: int, err_type: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object, the same shape vLLM's ``ErrorResponse`` serialises to."""
    if err_type is None:
        try:
            err_type = HTTPStatus(status).phrase.replace(" ", "") + "Error"
        except ValueError:
            err_type = "Error"
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


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
