"""Decode failover mid-stream: resume a stream on another decode replica from the tokens sent.

When a decode replica dies while it streams, the ingress holds what the client already has:
the prompt's token ids (``RoutingHint.token_ids``, rendered once by the ingress) and the token
ids of every chunk it forwarded (decode reports them per batch, ``track_ids``). It sends a
*completion* request for ``prompt + generated`` with what is left of the token budget to
another decode replica, and rewrites that stream's chunks into the original stream's shape
(id, object, created, usage counted from the original prompt). For greedy sampling the client
sees one uninterrupted stream with the same tokens as an undisturbed run, ``[DONE]`` and
correct usage.

Eligible: streamed, one choice (``n`` 1), one prompt, no ``echo``/``best_of``; chat without
``logprobs``, tools, ``response_format`` or structured outputs (their state lives in the dead
engine). Sampled requests resume too, but their continuation is a new sample; output-token
penalties (presence, frequency) restart their counts. A multi-byte character split across the
failover point may lose its first bytes in the text (never in the token ids).

Pure functions and one rewriter: no Ray, no I/O (unit-tested in tests/unit/test_failover.py).
"""

from __future__ import annotations

from typing import Any

import msgspec

_json_decode = msgspec.json.Decoder().decode
_json_encode = msgspec.json.Encoder().encode

# Chat fields that carry over to a completion request unchanged (sampling and stopping).
_CHAT_TO_COMPLETION = (
    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
    "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "bad_words",
    "allowed_token_ids", "skip_special_tokens", "spaces_between_special_tokens",
    "include_stop_str_in_output", "length_penalty", "truncate_prompt_tokens", "priority",
    "cache_salt", "vllm_xargs",
)

# Track the ids of each chunk, and strip them before the client sees them (it did not ask);
# or track and keep them (it asked for ``return_token_ids``).
TRACK_OFF, TRACK_STRIP, TRACK_KEEP = 0, 1, 2


def eligible(kind: str, req: Any, has_hint: bool) -> bool:
    """Whether a stream of ``req`` can be resumed elsewhere (see the module docstring)."""
    if not getattr(req, "stream", False) or not has_hint:
        return False
    if (getattr(req, "n", 1) or 1) != 1 or getattr(req, "best_of", None) not in (None, 1):
        return False
    if kind == "completion":
        return not getattr(req, "echo", False)
    if getattr(req, "logprobs", False) or getattr(req, "top_logprobs", None):
        return False
    if getattr(req, "tools", None) or getattr(req, "response_format", None) is not None:
        return False
    return getattr(req, "structured_outputs", None) is None


def track_mode(kind: str, req: Any, has_hint: bool, enabled: bool) -> int:
    if not enabled or not eligible(kind, req, has_hint):
        return TRACK_OFF
    return TRACK_KEEP if getattr(req, "return_token_ids", False) else TRACK_STRIP


def _budget(kind: str, req: Any) -> int | None:
    if kind == "chat":  # max_tokens is deprecated there: read it only when the client set it
        legacy = req.max_tokens if "max_tokens" in req.model_fields_set else None
        return req.max_completion_tokens or legacy
    return req.max_tokens


def resume_body(kind: str, req: Any, prompt_ids: list[int], generated: list[int],
                max_model_len: int | None, attempt: int) -> dict[str, Any] | None:
    """The JSON body of the completion request that continues ``req`` after ``generated``;
    None when nothing is left to generate or the budget cannot be known."""
    prompt = list(prompt_ids) + list(generated)
    budget = _budget(kind, req)
    if budget is None:
        if not max_model_len:
            return None
        left = max_model_len - len(prompt)
    else:
        left = budget - len(generated)
    if left < 1:
        return None
    body: dict[str, Any] = {
        "model": req.model, "prompt": prompt, "max_tokens": left, "stream": True,
        "return_token_ids": True, "request_id": f"{req.request_id}-resume{attempt}",
    }
    if kind == "completion":
        src = req.model_dump(exclude_unset=True)
        for k in ("prompt", "max_tokens", "stream", "echo", "suffix", "request_id", "stream_options",
                  "return_token_ids", "kv_transfer_params", "prompt_embeds"):
            src.pop(k, None)
        body = {**src, **body}
        if req.logprobs is not None:
            body["logprobs"] = req.logprobs
    else:
        for k in _CHAT_TO_COMPLETION:
            v = getattr(req, k, None)
            if v is not None and k in req.model_fields_set:
                body[k] = v
    min_tokens = getattr(req, "min_tokens", 0) or 0
    if min_tokens:
        body["min_tokens"] = max(0, min_tokens - len(generated))
    opts = getattr(req, "stream_options", None)
    if opts is not None:
        body["stream_options"] = {"include_usage": bool(opts.include_usage),
                                  "continuous_usage_stats": bool(getattr(opts, "continuous_usage_stats", False))}
    return body


def split_events(text: str) -> list[str]:
    """The ``data: ...`` payloads of an SSE text (one or more events)."""
    return [e[6:] if e.startswith("data: ") else e for e in text.split("\n\n") if e.strip()]


def track_chunk(text: str, strip: bool) -> tuple[str, list[int]]:
    """Decode side: the token ids in one batch of SSE text (``return_token_ids`` was forced on),
    and the text as the client should see it (without the ids it did not ask for)."""
    ids: list[int] = []
    out: list[str] = []
    for payload in split_events(text):
        if payload.startswith("[DONE]") or not payload.startswith("{"):
            out.append(f"data: {payload}\n\n")
            continue
        obj = _json_decode(payload)
        choices = obj.get("choices") or []
        for ch in choices:
            ids.extend(ch.get("token_ids") or ())
        if strip:
            obj.pop("prompt_token_ids", None)
            empty = bool(choices)
            for ch in choices:
                ch.pop("token_ids", None)
                delta = ch.get("delta")
                if (delta is None or "role" in delta or any(delta.values())
                        or ch.get("finish_reason") is not None or ch.get("logprobs") is not None):
                    empty = False
            if not empty or obj.get("usage"):  # an empty chat chunk was sent only for its ids
                out.append(f"data: {_json_encode(obj).decode()}\n\n")
        else:
            out.append(f"data: {payload}\n\n")
    return "".join(out), ids


class Rewriter:
    """Ingress side: turns the resumed completion stream's chunks into the original stream's.

    ``first`` is the original stream's first SSE text (its id, created and model are reused)."""

    def __init__(self, kind: str, first: str, prompt_tokens: int, before: int, *,
                 keep_ids: bool, usage: bool) -> None:
        head = next((p for p in split_events(first) if p.startswith("{")), "{}")
        obj = _json_decode(head)
        self.kind = kind
        self.id, self.created, self.model = obj.get("id"), obj.get("created"), obj.get("model")
        self.prompt_tokens, self.before = prompt_tokens, before
        self.keep_ids, self.usage = keep_ids, usage

    def _usage(self, u: dict[str, Any] | None) -> dict[str, Any] | None:
        if u is None:
            return None
        done = self.before + int(u.get("completion_tokens") or 0)
        return {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens + done,
                "completion_tokens": done}

    def __call__(self, text: str) -> str:
        out: list[str] = []
        for payload in split_events(text):
            if not payload.startswith("{"):
                out.append(f"data: {payload}\n\n")
                continue
            obj = _json_decode(payload)
            if "error" in obj:
                out.append(f"data: {payload}\n\n")
                continue
            usage = self._usage(obj.get("usage"))
            choices = []
            for ch in obj.get("choices") or []:
                ids = ch.get("token_ids")
                if self.kind == "chat":
                    text_part = ch.get("text") or ""
                    c: dict[str, Any] = {"index": 0, "delta": {"content": text_part} if text_part else {},
                                         "logprobs": None, "finish_reason": ch.get("finish_reason")}
                    if ch.get("stop_reason") is not None:
                        c["stop_reason"] = ch["stop_reason"]
                else:
                    c = {k: v for k, v in ch.items() if k not in ("prompt_token_ids", "token_ids")}
                    c["index"] = 0
                if self.keep_ids:
                    c["token_ids"] = ids
                elif self.kind == "chat" and not c["delta"] and c["finish_reason"] is None:
                    continue  # sent only for its ids
                choices.append(c)
            if not choices and not (usage and self.usage):
                continue
            new: dict[str, Any] = {"id": self.id,
                                   "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                                   "created": self.created, "model": self.model, "choices": choices}
            if usage is not None and self.usage:
                new["usage"] = usage
            out.append(f"data: {_json_encode(new).decode()}\n\n")
        return "".join(out)
