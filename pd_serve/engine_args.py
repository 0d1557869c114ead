"""Check `engine_args` against the installed vLLM's own argument definitions, at start-up.

pd_serve's own config keys are pydantic fields with ``extra="forbid"``; `engine_args` is passed
through to ``vllm.engine.arg_utils.AsyncEngineArgs`` inside each replica. Without this check a
typo (``max_model_lenn``) raises a ``TypeError`` inside the replica, Serve restarts it forever,
and ``serve run`` never exits. Here the names come from the ``AsyncEngineArgs`` dataclass of the
vLLM that is installed, so the check follows vLLM upgrades without a list of our own.

Values are checked too where the field's type is plain (numbers, strings, booleans, literals,
lists and dicts of those), with pydantic's lax rules; richer fields (``compilation_config``,
``speculative_config`` ...) are left to vLLM, which accepts several spellings for them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Any

_PLAIN = (int, float, str, bool, type(None))


@functools.cache
def _fields() -> dict[str, Any]:
    """Field name -> resolved type (None where it cannot be resolved) of AsyncEngineArgs."""
    import vllm.engine.arg_utils as arg_utils

    out: dict[str, Any] = {}
    for f in dataclasses.fields(arg_utils.AsyncEngineArgs):
        t = f.type
        if isinstance(t, str):
            try:
                t = eval(t, vars(arg_utils))  # noqa: S307 - vLLM's own annotation text
            except Exception:
                t = None
        out[f.name] = t
    return out


def _plain(t: Any) -> bool:
    if t in _PLAIN:
        return True
    origin = typing.get_origin(t)
    if origin is typing.Literal:
        return True
    if origin in (typing.Union, types.UnionType, list, dict, tuple):
        return all(a is Ellipsis or _plain(a) for a in typing.get_args(t))
    return False


@functools.cache
def _adapter(t: Any):
    from pydantic import TypeAdapter

    return TypeAdapter(t)


def check_engine_args(args: dict[str, Any], where: str = "engine_args") -> None:
    """Raise ValueError naming the first unknown key (with the closest valid one) or bad value."""
    fields = _fields()
    for key, value in args.items():
        if key not in fields:
            norm = key.replace("-", "_").lower()
            close = [norm] if norm in fields else difflib.get_close_matches(norm, fields, n=1, cutoff=0.6)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ValueError(f"{where}.{key} is not an argument of the installed vLLM's engine "
                             f"(vllm.engine.arg_utils.AsyncEngineArgs){hint}")
        t = fields[key]
        if t is None or not _plain(t):
            continue
        from pydantic import ValidationError

        try:
            _adapter(t).validate_python(value)
        except ValidationError as e:
            first = e.errors()[0]
            raise ValueError(f"{where}.{key}={value!r} is not valid for vLLM ({t!s}): "
                             f"{first['msg']}") from None
