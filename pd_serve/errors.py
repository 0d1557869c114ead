"""pd_serve's error tree, and the one place errors become OpenAI-shaped JSON.

    PDServeError                      base; carries an HTTP status and an OpenAI error type
    ├── InvalidRequest (400)          bad JSON, wrong types, bad values
    ├── Unauthorized (401)            missing or wrong API key
    ├── ModelNotFound (404)           `model` is not the served model
    ├── PrefillFailed (502)           remote prefill failed and the policy is `fail`
    └── EngineUnavailable (503)       no healthy engine can take the request

Third-party exceptions (pydantic, Ray, vLLM) are mapped at the boundary that sees them;
``error_body`` is the only function that builds the response body.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


class PDServeError(Exception):
    status: int = 500
    type: str = "InternalServerError"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(PDServeError):
    status, type = 400, "BadRequestError"


class Unauthorized(PDServeError):
    status, type = 401, "AuthenticationError"


class ModelNotFound(PDServeError):
    status, type = 404, "NotFoundError"


class PrefillFailed(PDServeError):
    status, type = 502, "PrefillFailedError"


class EngineUnavailable(PDServeError):
    status, type = 503, "ServiceUnavailableError"


def error_body(message: str, status: int, err_type: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object, the same shape vLLM's ``ErrorResponse`` serialises to."""
    if err_type is None:
        try:
            err_type = HTTPStatus(status).phrase.replace(" ", "") + "Error"
        except ValueError:
            err_type = "Error"
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def from_exception(exc: PDServeError) -> tuple[int, dict[str, Any]]:
    return exc.status, error_body(exc.message, exc.status, exc.type, exc.param)
