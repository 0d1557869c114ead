"""Session fixtures for integration tests: real vLLM engines on the CPU, real NIXL, real Ray.

Order matters on a 2-core machine (at most two engines at once): the aggregated reference
server runs first and is stopped, then pd_serve (prefill + decode) starts once and is shared.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pd_serve.tiny_model import TINY_URI, resolve_model
from tests.integration import cases
from tests.support.metrics import Scrape
from tests.support.servers import ROOT, bare_vllm_server, load_app_args, pd_serve_app

PD_PORT = int(os.environ.get("PD_SERVE_TEST_PORT", "8123"))
REF_PORT = PD_PORT + 1
LOG_DIR = Path(os.environ.get("PD_SERVE_TEST_LOG_DIR", ROOT / ".test-logs"))


def pytest_configure(config):
    config.addinivalue_line("markers", "disruptive: kills parts of the shared app; runs after the others")
    config.addinivalue_line("markers", "own_app: needs a differently configured app; runs last")


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
    # one app at a time on 2 cores: shared-app tests first, then the ones that break it,
    # then the ones that need their own app
    def key(item):
        own = item.get_closest_marker("own_app")
        return (own is not None, item.get_closest_marker("disruptive") is not None,
                own.args[0] if own and own.args else "")

    items.sort(key=key)


class Apps:
    """Holds at most one running pd_serve app; starting another stops the current one."""

    def __init__(self) -> None:
        self._name: str | None = None
        self._cm = None
        self.url = ""

    def get(self, name: str, args: dict) -> str:
        if name != self._name:
            self.close()
            self._cm = pd_serve_app(args, PD_PORT)
            self.url = self._cm.__enter__()
            self._name = name
        return self.url

    def close(self) -> None:
        if self._cm is not None:
            cm, self._cm, self._name = self._cm, None, None
            cm.__exit__(None, None, None)


@pytest.fixture(scope="session")
def apps(reference):  # depends on `reference` so that engines never overlap
    a = Apps()
    yield a
    a.close()


@pytest.fixture(scope="session")
def model_path() -> str:
    try:
        return resolve_model(TINY_URI)
    except FileNotFoundError:
        subprocess.run([sys.executable, "-m", "pd_serve.tiny_model"], check=True)
        return resolve_model(TINY_URI)


@pytest.fixture(scope="session")
def reference(model_path: str) -> dict[str, cases.Output]:
    """Greedy outputs of one aggregated vLLM engine for every case (then the engine stops)."""
    LOG_DIR.mkdir(exist_ok=True)
    with bare_vllm_server(model_path, REF_PORT, core=0, log=LOG_DIR / "reference.log") as url:
        with httpx.Client(base_url=url, timeout=120) as client:
            return {c.name: cases.run(client, c) for c in cases.ALL + cases.EXTRA}


@pytest.fixture
def pd_url(apps: Apps) -> str:
    """The shared app, configured as configs/tiny-cpu.yaml."""
    return apps.get("tiny-cpu", load_app_args())


@pytest.fixture
def client(pd_url: str):
    with httpx.Client(base_url=pd_url, timeout=120) as c:
        yield c


def wait_idle(url: str, timeout: float = 30.0, engines: int = 2) -> Scrape:
    """Wait until no engine has running or waiting requests, no KV block is in use and none is
    held for a pull."""
    deadline = time.monotonic() + timeout
    while True:
        s = Scrape.get(url)
        busy = (s.sum("vllm:num_requests_running") + s.sum("vllm:num_requests_waiting")
                + s.sum("vllm:kv_cache_usage_perc") + s.sum("pd_serve_kv_blocks_awaiting_pull")
                + s.sum("pd_serve_requests_in_flight"))
        if busy == 0 and len(s.values("vllm:kv_cache_usage_perc")) >= engines:
            return s
        if time.monotonic() > deadline:
            raise AssertionError(
                f"engines not idle after {timeout}s: running={s.values('vllm:num_requests_running')} "
                f"waiting={s.values('vllm:num_requests_waiting')} kv={s.values('vllm:kv_cache_usage_perc')} "
                f"awaiting_pull={s.values('pd_serve_kv_blocks_awaiting_pull')} "
                f"in_flight={s.values('pd_serve_requests_in_flight')}")
        time.sleep(0.5)
