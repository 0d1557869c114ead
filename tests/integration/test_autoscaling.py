"""Decode scales on its KV-cache usage, on real engines, through pd_serve's policy; scale-down
under a streaming load fails no request."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.integration import cases
from tests.support.servers import load_app_args


def autoscale_args() -> dict:
    args = load_app_args(
        decode={"autoscaling": {"min_replicas": 1, "max_replicas": 2, "target": 0.3,
                                "upscale_delay_s": 2, "downscale_delay_s": 5},
                "cpu_cores": [0, 1], "engine_args": {"num_gpu_blocks_override": 64}},  # 2048 tokens
        kv_transfer={"backend": None})
    args["prefill"] = {"replicas": 0}
    args["decode"].pop("replicas", None)
    return args


def _decode_replicas() -> int:
    from ray import serve

    app = serve.status().applications["pd_serve"]
    return app.deployments["DecodeServer"].replica_states.get("RUNNING", 0)


@pytest.mark.own_app("autoscale")
def test_decode_scales_up_on_kv_usage_and_back_down(apps) -> None:
    url = apps.get("autoscale", autoscale_args())
    assert _decode_replicas() == 1
    stop = threading.Event()
    errors: list[str] = []

    def load(seed: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            i = 0
            while not stop.is_set():
                r = c.post("/v1/completions", json={"model": "tiny-llama", "prompt": cases.text(350, seed * 100 + i),
                                                    "max_tokens": 300, "ignore_eos": True, "temperature": 0})
                if r.status_code != 200:
                    errors.append(r.text)
                i += 1

    workers = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(4)]
    for w in workers:
        w.start()
    try:
        deadline = time.monotonic() + 180
        while _decode_replicas() < 2:
            assert time.monotonic() < deadline, "decode did not scale up under KV pressure within 180 s"
            time.sleep(2)
    finally:
        stop.set()
        for w in workers:
            w.join(130)
    assert not errors, errors[:2]
    # Scale-down under load: one stream at a time keeps running while Serve removes a replica
    # (KV usage stays under the target). A stream on the replica being removed finishes within
    # its graceful shutdown or is resumed on the other (decode failover); none may fail.
    body = {"model": "tiny-llama", "prompt": "scale down while I stream", "max_tokens": 300,
            "ignore_eos": True, "temperature": 0, "stream": True, "return_token_ids": True}
    with httpx.Client(base_url=url, timeout=120) as c:
        ref = _stream_ids(c, body)
        streams, down_at = 0, None
        deadline = time.monotonic() + 180
        while down_at is None or time.monotonic() < down_at + 10:
            assert time.monotonic() < deadline, "decode did not scale back down under light load"
            assert _stream_ids(c, body) == ref, f"stream {streams} differs from the first (or failed)"
            streams += 1
            if down_at is None and _decode_replicas() == 1:
                down_at = time.monotonic()
    print(f"\nscale-down under streaming load: {streams} streams, all complete and identical")


def _stream_ids(c: httpx.Client, body: dict) -> list[int] | str:
    """Token ids of one streamed completion, or what went wrong (an error chunk, no [DONE])."""
    ids: list[int] = []
    done = False
    with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {r.read()[:200]!r}"
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                d = json.loads(line[6:])
                if "error" in d:
                    return f"in-band error: {d['error']}"
                for ch in d.get("choices") or []:
                    ids.extend(ch.get("token_ids") or [])
    return ids if done else "no [DONE]"
