"""Request validation for the ingress: a body in, a vLLM request model or a ``PDServeError`` out.

vLLM's own OpenAI request models (``CompletionRequest``, ``ChatCompletionRequest``) validate;
this module maps whatever they raise to a 400 that names the parameter
(``errors.validation_error``), refuses what pd_serve must refuse before the request reaches an
engine, and describes the request bodies for ``/openapi.json``. Pure functions of the body:
no Ray, no engine, unit-tested in ``tests/unit/test_errors.py``.

Refused here, beyond what the models refuse:

- a missing or unknown ``model`` (400 naming ``model``, 404);
- ``kv_transfer_params`` from a client (it would make decode pull KV from wherever the client says);
- ``max_tokens`` / ``max_completion_tokens`` below 1;
- an integer outside 64 bits in any parameter but the prompt and messages (the engine's wire
  format, msgpack, cannot carry it: a 31-digit ``stream_interval`` failed inside the engine
  with a 500); prompt token ids that large fail vLLM's vocabulary check instead;
- ``use_beam_search``: vLLM's beam search runs its own loop of single-token requests around the
  engine, outside the OpenAI path that carries ``kv_transfer_params``, so a prefill replica
  cannot hand its KV to decode (prefill answers without transfer params).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import lru_cache
from typing import Annotated, Any

from pd_serve.errors import BadRequest, NotFound, PDServeError, Unsupported, param_from_loc, validation_error


def parse(model: type, body: bytes, served: set[str]) -> Any:
    """Validate ``body`` with ``model`` (a vLLM request model) for one of the ``served`` model
    names. Returns the request, with every lazily validated part already validated (a request
    must pickle to cross Ray). Raises ``PDServeError``."""
    try:
        req = model.model_validate_json(body)
        if hasattr(req, "messages"):  # the only field with lazily validated parts (content)
            req.messages = materialize(req.messages, ("messages",))
    except PDServeError:
        raise
    except Exception as e:  # vLLM's validators run on the client's body only: its fault
        raise validation_error(e, locate=lambda: bad_field(model, body)) from None
    if getattr(req, "kv_transfer_params", None) is not None:
        raise BadRequest("kv_transfer_params is set by pd_serve, not by clients", "kv_transfer_params")
    if req.model is None:
        raise BadRequest("you must provide a model parameter", "model")
    if req.model not in served:
        raise NotFound(f"The model `{req.model}` does not exist.", "model")
    for field in ("max_tokens", "max_completion_tokens"):
        v = getattr(req, field, None)
        if v is not None and v < 1:
            raise BadRequest(f"{field} must be at least 1, got {v}", field)
    check_ints(req)
    if getattr(req, "use_beam_search", False):
        raise Unsupported("use_beam_search is not supported by pd_serve: beam search runs outside the "
                          "path that moves KV from prefill to decode", "use_beam_search")
    return req


_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what msgspec's msgpack encoder carries
_NOT_SENT_AS_INTS = frozenset({"prompt", "prompt_embeds", "messages"})  # rendered or checked by vLLM


def check_ints(req: Any) -> None:
    """Raise a 400 for an integer the engine could not receive, naming where it is."""
    for name, value in vars(req).items():
        if value is None or type(value) in _SCALARS or name in _NOT_SENT_AS_INTS:
            continue
        where = _big_int(value)
        if where is not None:
            param = param_from_loc((name, *where[0]))
            raise BadRequest(f"{param}: {where[1]} does not fit in 64 bits", param)


_SCALARS = (str, float, bool)


def _big_int(value: Any) -> tuple[tuple[Any, ...], int] | None:
    """(path, value) of the first integer in ``value`` outside what msgpack carries, or None."""
    if type(value) is int:
        return None if _INT_MIN <= value <= _INT_MAX else ((), value)
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    elif hasattr(value, "__dict__"):  # nested models and dataclasses (stream_options, structured_outputs)
        items = vars(value).items()
    else:
        return None
    for k, v in items:
        if v is None or type(v) in _SCALARS:
            continue
        found = _big_int(v)
        if found is not None:
            return (k, *found[0]), found[1]
    return None


def materialize(value: Any, path: tuple[Any, ...]) -> Any:
    """``value`` with every lazy iterator (pydantic validates ``Iterable`` fields, such as a
    chat message's content parts, only when iterated) turned into a validated list. A
    validation failure there is raised as a 400 at its place in the body (``path``)."""
    if isinstance(value, dict):
        return {k: materialize(v, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [materialize(v, (*path, i)) for i, v in enumerate(value)]
    if isinstance(value, Iterator):
        try:
            items = list(value)
        except Exception as e:
            raise _part_error(e, path) from None
        return [materialize(v, (*path, i)) for i, v in enumerate(items)]
    return value


def _part_error(e: Exception, path: tuple[Any, ...]) -> BadRequest:
    """A lazily validated item that matches none of its union's shapes: named by the item
    (``messages.0.content.1``), with the first branch's complaint as an example."""
    from pydantic import ValidationError

    if not isinstance(e, ValidationError) or not e.errors():
        return validation_error(e, prefix=path)
    first = e.errors(include_url=False, include_input=False)[0]
    loc = tuple(first.get("loc", ()))
    item = param_from_loc((*path, loc[0]) if loc and isinstance(loc[0], int) else path)
    return BadRequest(f"{item}: matches none of the accepted shapes (e.g. {param_from_loc((*path, *loc))}: "
                      f"{first.get('msg')})", item)


@lru_cache(maxsize=None)
def _field_adapter(model: type, name: str) -> Any:
    from pydantic import TypeAdapter

    field = model.model_fields[name]
    return TypeAdapter(Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation)


def bad_field(model: type, body: bytes) -> tuple[str, str] | None:
    """The first top-level parameter in ``body`` whose value fails its own field type in
    ``model``, as ``(param, message)``; None when each one passes alone. Asked only after a
    validator failed without naming a parameter (e.g. ``"messages": 1`` raises a TypeError in
    one of vLLM's model validators before pydantic checks the field)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    from pydantic import ValidationError

    for name, field in model.model_fields.items():
        key = field.alias or name
        if key not in data:
            continue
        try:
            _field_adapter(model, name).validate_python(data[key])
        except ValidationError as e:
            errors = e.errors(include_url=False, include_input=False)
            first = errors[0] if errors else {}
            return param_from_loc((key, *first.get("loc", ()))) or key, str(first.get("msg", "invalid value"))
        except Exception as e:
            return key, f"invalid value ({type(e).__name__})"
    return None


# -- /openapi.json ------------------------------------------------------------------------------

def request_schemas(models: dict[str, type]) -> tuple[dict[str, Any], dict[str, Any]]:
    """JSON schemas of the request models, for OpenAPI: ``({name: schema}, {def name: schema})``
    with references under ``#/components/schemas``."""
    bodies: dict[str, Any] = {}
    defs: dict[str, Any] = {}
    for model in models.values():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        defs.update(schema.pop("$defs", {}))
        bodies[model.__name__] = schema
    return bodies, defs


def add_request_bodies(spec: dict[str, Any], paths: dict[str, type], error_model: type | None = None) -> dict[str, Any]:
    """``spec`` (FastAPI's OpenAPI document) with each POST path's request body described by
    its vLLM model, and its error responses by ``error_model``. The ingress reads raw bodies
    itself (size limit, off-loop parsing), so FastAPI cannot infer these."""
    bodies, defs = request_schemas(paths)
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    components.update(defs)
    components.update(bodies)
    if error_model is not None:
        err = error_model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(err.pop("$defs", {}))
        components[error_model.__name__] = err
    for path, model in paths.items():
        op = spec.get("paths", {}).get(path, {}).get("post")
        if op is None:
            continue
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        if error_model is not None:
            ref = {"$ref": f"#/components/schemas/{error_model.__name__}"}
            for status, what in (("400", "Invalid request: the error's `param` names the parameter"),
                                 ("404", "Unknown model"), ("413", "Body over ingress.max_body_bytes"),
                                 ("500", "Internal error"), ("503", "No decode replica available")):
                op.setdefault("responses", {})[status] = {
                    "description": what, "content": {"application/json": {"schema": ref}}}
    return spec
