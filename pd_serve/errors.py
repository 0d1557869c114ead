"""The one function that builds OpenAI-shaped error bodies outside vLLM.

Errors reach clients from two places, both in OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``):

- vLLM's own serving classes (``ErrorResponse``) for what the engine validates: context length,
  sampling parameters, failed generations. The engine replicas pass those bodies through as they are.
- ``error_body`` for what pd_serve decides itself:
  - 400: invalid JSON, wrong types, `max_tokens` < 1, client-set `kv_transfer_params`;
  - 401: a missing or wrong API key;
  - 404: an unknown model;
  - 502: remote prefill failed under `failure_policy: fail`;
  - 503: no decode replica could take the request;
  - 500: an unexpected internal error, named by its exception type.

Third-party exceptions (pydantic, Ray) are mapped where they are caught, in the ingress and
decode, and never reach clients raw.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


def error_body(message: str, status: int, err_type: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object, the same shape vLLM's ``ErrorResponse`` serialises to."""
    if err_type is None:
        try:
            err_type = HTTPStatus(status).phrase.replace(" ", "") + "Error"
        except ValueError:
            err_type = "Error"
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}
