"""Start and stop the real things: a bare vLLM OpenAI server, and pd_serve on Ray Serve.

Used by the integration tests (session fixtures) and by the benchmarks. Everything started
here is stopped by process group or by Ray's own shutdown, so the next run starts clean.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}


def load_app_args(config: str | Path = ROOT / "configs" / "tiny-cpu.yaml", **overrides: Any) -> dict[str, Any]:
    """The ``args`` of the first application in a serve config file, with overrides merged in."""
    doc = yaml.safe_load(Path(config).read_text())
    args = doc["applications"][0]["args"]
    return deep_merge(args, overrides)


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@contextmanager
def bare_vllm_server(model: str, port: int, *, core: int = 0, kv_gib: int = 1,
                     extra_args: list[str] | None = None, log: Path | None = None) -> Iterator[str]:
    """One aggregated vLLM OpenAI server (no P/D) in its own process group; yields its URL."""
    env = {**os.environ, **OFFLINE_ENV, "VLLM_CPU_OMP_THREADS_BIND": str(core),
           "VLLM_CPU_KVCACHE_SPACE": str(kv_gib)}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", "tiny-llama", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "1024", "--block-size", "32",
           "--enforce-eager", "--enable-prefix-caching", *(extra_args or [])]
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", 300, proc)
        yield url
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen, grace: float = 15) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


@contextmanager
def pd_serve_app(args: dict[str, Any], port: int, *, name: str = "pd_serve",
                 timeout: float = 600) -> Iterator[str]:
    """pd_serve on a local Ray cluster started by this process; yields the endpoint URL."""
    import ray
    from ray import serve

    from pd_serve.app import build_app

    os.environ.update(OFFLINE_ENV)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False, log_to_driver=bool(os.environ.get("PD_SERVE_TEST_LOGS")),
                 runtime_env={"env_vars": OFFLINE_ENV})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        serve.run(build_app(args), name=name, route_prefix="/", blocking=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = serve.status().applications.get(name)
            if st is not None and st.status == "RUNNING":
                break
            if st is not None and st.status == "DEPLOY_FAILED":
                raise RuntimeError(f"pd_serve failed to deploy: {st.message}")
            time.sleep(1)
        wait_http(url + "/health", max(1.0, deadline - time.monotonic()))
        yield url
    finally:
        try:
            serve.shutdown()
        finally:
            if started_ray:
                ray.shutdown()
