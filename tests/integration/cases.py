"""The request cases compared between pd_serve and one aggregated vLLM engine."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

import httpx

WORDS = ("the cache block token prefill decode engine model request server replica transfer "
         "memory layer head router prefix hash event stream batch queue latency").split()


def text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@dataclass(frozen=True)
class Case:
    name: str
    api: str  # "completions" | "chat"
    body: dict[str, Any]

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


@dataclass
class Output:
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str | None = None
    raw: list[Any] = field(default_factory=list)


def _completion(prompt: str, max_tokens: int = 12, **kw: Any) -> dict[str, Any]:
    return {"model": "tiny-llama", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "return_token_ids": True, **kw}


def _chat(content: str, max_tokens: int = 12, **kw: Any) -> dict[str, Any]:
    return {"model": "tiny-llama", "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True, **kw}


STREAM = {"stream": True, "stream_options": {"include_usage": True}}
ALL = [
    Case("short", "completions", _completion("hello cache", 10)),                 # < 1 block
    Case("blocks", "completions", _completion(text(120, 1), 16)),                 # several blocks
    Case("long", "completions", _completion(text(500, 2), 16)),                   # many blocks
    Case("chat", "chat", _chat(text(60, 3), 12)),
    Case("stream_completion", "completions", _completion(text(90, 4), 20, **STREAM)),
    Case("stream_chat", "chat", _chat(text(40, 5), 14, **STREAM)),
]


# Prompts only the fault tests send (so no engine has them cached when those tests run).
ORPHAN = Case("orphan", "completions", _completion(text(110, 31), 16))
EXTRA = [ORPHAN]


def run(client: httpx.Client, case: Case) -> Output:
    """Send ``case`` and collect generated token ids (streams are reassembled)."""
    path = "/v1/completions" if case.api == "completions" else "/v1/chat/completions"
    if not case.stream:
        r = client.post(path, json=case.body)
        r.raise_for_status()
        d = r.json()
        ch = d["choices"][0]
        return Output(ch["token_ids"], d["usage"]["prompt_tokens"], ch["finish_reason"], [d])
    ids: list[int] = []
    usage = None
    finish = None
    chunks = []
    with client.stream("POST", path, json=case.body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            chunks.append(d)
            assert "error" not in d, d
            for ch in d.get("choices", []):
                ids.extend(ch.get("token_ids") or [])
                finish = ch.get("finish_reason") or finish
            usage = d.get("usage") or usage
    assert usage is not None, "stream_options.include_usage was ignored"
    return Output(ids, usage["prompt_tokens"], finish, chunks)
