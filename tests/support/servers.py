"""Start and stop the real things for the integration tests: a bare vLLM OpenAI server here,
pd_serve on Ray Serve (``pd_serve_app``) from the benchmarks' harness. Everything started is
stopped by process group or by Ray's own shutdown, so the next run starts clean.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Shared with the benchmarks; re-exported here for the tests.
from benchmarks.harness import (  # noqa: F401
    ENGINE_FLAGS,
    OFFLINE_ENV,
    ROOT,
    SERVED_NAME,
    deep_merge,
    load_app_args,
    pd_serve_app,
    wait_http,
)


@contextmanager
def bare_vllm_server(model: str, port: int, *, core: int = 0, kv_gib: int = 1,
                     extra_args: list[str] | None = None, log: Path | None = None) -> Iterator[str]:
    """One aggregated vLLM OpenAI server (no P/D) in its own process group; yields its URL."""
    env = {**os.environ, **OFFLINE_ENV, "VLLM_CPU_OMP_THREADS_BIND": str(core),
           "VLLM_CPU_KVCACHE_SPACE": str(kv_gib)}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
           *ENGINE_FLAGS, *(extra_args or [])]
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
