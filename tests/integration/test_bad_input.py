"""Bad input gets a 4xx with an OpenAI-shaped error, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from tests.integration import cases
from tests.integration.conftest import wait_idle

BAD = [
    ("invalid_json", "/v1/completions", b'{"model": "tiny-llama", "prompt": ', 400),
    ("unknown_model", "/v1/completions", {"model": "gpt-9", "prompt": "hi", "max_tokens": 2}, 404),
    ("max_tokens_zero", "/v1/completions", {"model": "tiny-llama", "prompt": "hi", "max_tokens": 0}, 400),
    ("max_tokens_negative", "/v1/chat/completions",
     {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400),
    ("prompt_too_long", "/v1/completions",
     {"model": "tiny-llama", "prompt": cases.text(1500, 7), "max_tokens": 4}, 400),
    # over ingress.offload_body_bytes (32 KiB): parsed and tokenized on the ingress's worker thread
    ("large_prompt_offloaded", "/v1/completions",
     {"model": "tiny-llama", "prompt": cases.text(8000, 8), "max_tokens": 4}, 400),
    ("large_chat_offloaded", "/v1/chat/completions",
     {"model": "tiny-llama", "messages": [{"role": "user", "content": cases.text(8000, 9)}], "max_tokens": 4}, 400),
    ("wrong_type_prompt", "/v1/completions", {"model": "tiny-llama", "prompt": 5}, 400),
    ("wrong_type_temperature", "/v1/chat/completions",
     {"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400),
    ("missing_messages", "/v1/chat/completions", {"model": "tiny-llama"}, 400),
    ("client_kv_transfer_params", "/v1/completions",
     {"model": "tiny-llama", "prompt": "hi", "kv_transfer_params": {"do_remote_prefill": True,
                                                                  "remote_host": "10.9.9.9"}}, 400),
]


@pytest.mark.parametrize("name,path,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_in_openai_shape(name, path, body, status, pd_url: str, client: httpx.Client) -> None:
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["message"] and err["type"]
    # still serving, and nothing left held by the rejected request
    ok = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "still up", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    wait_idle(pd_url)


def test_a_body_over_the_limit_is_a_413_before_it_is_read_whole(pd_url: str, client: httpx.Client) -> None:
    """ingress.max_body_bytes (8 MiB by default): refused from Content-Length, and from the
    bytes counted when the client streams the body without one."""
    big = b'{"model": "tiny-llama", "prompt": "' + b"a" * (9 * 2**20) + b'"}'
    r = client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text[:200]
    err = r.json()["error"]
    assert err["code"] == 413 and "max_body_bytes" in err["message"] and err["type"]

    def chunks():
        for i in range(0, len(big), 2**20):
            yield big[i:i + 2**20]
    r = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    ok = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "still up", "max_tokens": 2})
    assert ok.status_code == 200
    wait_idle(pd_url)
