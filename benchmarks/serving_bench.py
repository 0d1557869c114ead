"""Serving, side by side in one run: bare vLLM vs pd_serve vs Ray Serve LLM's own P/D.

    python -m benchmarks.serving_bench                       # or: make bench
    python -m benchmarks.serving_bench --quick --servers bare,pd_serve --loads sequential,c8
    python -m benchmarks.serving_bench --report benchmarks/results/serving_<UTC>.json   # re-render only

Starts each server in turn on the same model, engine args and cores, warms it up (so pd_serve's
and the peer's first NIXL handshake is not measured), records its idle CPU, drives each load with
vLLM's own ``vllm bench serve`` (``benchmarks/harness.py:run_load``), stops it and checks that
nothing is left running. Servers:

- ``bare``           one aggregated vLLM OpenAI server (no P/D), pinned to core 1;
- ``pd_serve``       ``serve run configs/tiny-cpu.yaml`` (``pd_serve_launch``, ``PD_SERVE_ENV``):
                     prefill on core 0, decode on core 1, NIXL;
- ``pd_serve_nofix`` the same with pd_serve's CPU NIXL workaround off (``PD_SERVE_NIXL_CPU_FIX=0``);
- ``peer``           Ray Serve LLM's ``build_pd_openai_app`` (``benchmarks/peer_config.py``), run
                     with ``.venv-bench`` (``scripts/bench_env.sh``; created on first use), without
                     pd_serve's workaround (upstream behaviour);
- ``peer_fix``       the peer with pd_serve's workaround on.

Default: ``bare,pd_serve,peer_fix``. Loads: ``sequential`` (10 one at a time), ``random`` and
``prefix`` (Poisson), and the closed loops ``c1``, ``c8``, ``c32``, ``c64`` (``--max-concurrency N``).
For every load and server: client latencies and throughput, CPU-seconds per 1,000 output tokens
outside the engines and in them, engine-side and pd_serve phase means from ``/metrics``; under
the closed loops also ``/health`` and ``/metrics`` latency and the in-flight gauges.

Writes ``benchmarks/results/serving_<UTC>.json`` (harness envelope; per server per load results;
``ratios[load]["pd_serve/<server>"]``; targets) and a PNG next to it. Server and load-generator
logs go to ``benchmarks/results/serving_<UTC>_<server>.log`` (git-ignored). The whole run holds
the machine lock ``/tmp/pd_serve_engines.lock``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import psutil
from tqdm import tqdm

from benchmarks import harness
from benchmarks.harness import ROOT, SERVED_NAME, Scrape

# ------------------------------------------------------------------------------------------------
# How pd_serve is started: the one place to change it. PD_SERVE_ENV is merged into the environment
# of `serve run` (so Ray, the Serve replicas and the engines inherit it): Ray Serve knobs go here.
PD_SERVE_ENV: dict[str, str] = {}


def pd_serve_launch(config: Path) -> list[str]:
    """The command that starts pd_serve (its environment: PD_SERVE_ENV + the server's own)."""
    return [str(Path(sys.executable).parent / "serve"), "run", str(config)]


# ------------------------------------------------------------------------------------------------

RESULTS_DIR = harness.RESULTS_DIR
BENCH_VENV = ROOT / ".venv-bench"
# Added to every load: no test request before the measured run (the servers are warm and ready),
# so that /metrics deltas around the generator cover exactly the measured requests.
LOAD_COMMON = ["--ready-check-timeout-sec", "0"]
# pd_serve and the peer (one at a time): Ray Serve's HTTP port. Not 8000: clients aimed at
# `make serve` (other people's load scripts) must not reach the benchmark's servers.
PORT_PD = 8500
PORT_BARE = 8100
# The benchmark (warm-up, metric scrapes, probes, load generators) runs in its own session whose
# scheduler autogroup gets this nice value; servers keep the default 0. See boost_autogroup().
CLIENT_AUTOGROUP_NICE = -10


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
DEFAULT_SERVERS = "bare,pd_serve,peer_fix"
# What the /health probe asks. The peer's OpenAI ingress has no /health; /v1/models is answered by
# its ingress replica, as pd_serve's /health is by pd_serve's (Serve's own /-/healthz would only
# reach the proxy).
HEALTH_PATH = {"bare": "/health", "pd_serve": "/health", "peer": "/v1/models"}


def server_env(spec: ServerSpec) -> dict[str, str]:
    return {**(PD_SERVE_ENV if spec.kind == "pd_serve" else {}), **spec.env}


# ------------------------------------------------------------------------------------------------
# Loads

CONCURRENCY = {"c1": 1, "c8": 8, "c32": 32, "c64": 64}
DEFAULT_LOADS = "sequential,random,prefix," + ",".join(CONCURRENCY)


def closed_loop_prompts(n: int, quick: bool) -> int:
    """Enough prompts to hold N streams for most of the run (each stream does at least 8
    requests, so the ramp-down at the end is a small part), and at least 64, so that even the
    short loads last a few /metrics probes. About 45 s for c64 on a P/D server here."""
    return max(2 * n, 16) if quick else max(8 * n, 64)


def load_specs(num_prompts: int, rate: float, quick: bool = False) -> dict[str, dict[str, Any]]:
    """``vllm bench serve`` dataset arguments per load. ``probe``: /health and /metrics are probed."""
    common = ["--num-prompts", str(num_prompts), "--request-rate", str(rate)]
    specs: dict[str, dict[str, Any]] = {  # LOAD_COMMON is added below
        "sequential": {
            "description": "unloaded: random 256 in / 32 out, 10 prompts one at a time "
                           "(--max-concurrency 1): the fixed cost of each server's path",
            "args": ["--dataset-name", "random", "--random-input-len", "256",
                     "--random-output-len", "32", "--num-prompts", "10", "--max-concurrency", "1"],
        },
        "random": {
            "description": f"random 256 in / 32 out, {num_prompts} prompts at {rate:g} req/s (Poisson)",
            "args": ["--dataset-name", "random", "--random-input-len", "256",
                     "--random-output-len", "32", *common],
        },
        "prefix": {
            "description": f"shared prefixes: 5 prefixes of 224 tokens + 32 unique tokens, 32 out, "
                           f"{num_prompts} prompts at {rate:g} req/s (Poisson)",
            "args": ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "224",
                     "--prefix-repetition-suffix-len", "32", "--prefix-repetition-num-prefixes", "5",
                     "--prefix-repetition-output-len", "32", *common],
        },
    }
    for name, n in CONCURRENCY.items():
        prompts = closed_loop_prompts(n, quick)
        specs[name] = {
            "description": f"closed loop, {n} concurrent streams: random 256 in / 64 out, {prompts} prompts",
            "args": ["--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "64",
                     "--num-prompts", str(prompts), "--max-concurrency", str(n)],
            "concurrency": n, "probe": True,
        }
    for spec in specs.values():
        spec["args"] = [*LOAD_COMMON, *spec["args"]]
    return specs


# ------------------------------------------------------------------------------------------------
# Servers


def ensure_bench_env(log: Any) -> None:
    py = BENCH_VENV / "bin" / "python"
    if py.exists():
        return
    log(f"creating {BENCH_VENV.name} for the peer (scripts/bench_env.sh)")
    subprocess.run(["bash", str(ROOT / "scripts" / "bench_env.sh")], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)


def bench_config(config: Path, port: int, directory: Path) -> Path:
    """A copy of the serve config in ``directory`` with its HTTP port (and the ingress's) set to
    ``port``; everything else as in ``config``."""
    import yaml

    doc = yaml.safe_load(config.read_text())
    doc.setdefault("http_options", {})["port"] = port
    for app in doc.get("applications", []):
        app.setdefault("args", {}).setdefault("ingress", {})["port"] = port
    path = directory / config.name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def start_server(spec: ServerSpec, model: str, config: Path, log_path: Path,
                 timeout: float) -> harness.Server:
    if spec.kind == "bare":
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(PORT_BARE),
               *harness.ENGINE_FLAGS]
        return harness.start_server(spec.name, cmd, server_env(spec), f"http://127.0.0.1:{PORT_BARE}",
                                    harness.check_health, log_path, timeout)
    if spec.kind == "pd_serve":
        return harness.start_server(spec.name, pd_serve_launch(config), server_env(spec),
                                    f"http://127.0.0.1:{PORT_PD}", harness.check_pd_health, log_path,
                                    timeout, stop_signal=signal.SIGINT, uses_ray=True)
    if spec.kind == "peer":
        cmd = [str(BENCH_VENV / "bin" / "python"), "-m", "benchmarks.peer_config", "--model", model,
               "--served-model-name", SERVED_NAME, "--port", str(PORT_PD)]
        return harness.start_server(spec.name, cmd, server_env(spec), f"http://127.0.0.1:{PORT_PD}",
                                    harness.check_models, log_path, timeout, uses_ray=True)
    raise ValueError(spec.kind)  # pragma: no cover - SERVERS is closed


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


# ------------------------------------------------------------------------------------------------
# Measurements on a running server

_WORDS = ("the a cache block token prefill decode engine model request server replica transfer "
          "memory layer head router prefix hash event stream batch queue latency scale node").split()


def warm_up(url: str, n: int = 4) -> float:
    """A few completions (plain and streamed) so one-time costs (NIXL handshake) are paid now."""
    rng = random.Random(12345)
    t0 = time.monotonic()
    with httpx.Client(timeout=120) as c:
        for i in range(n):
            body = {"model": SERVED_NAME, "prompt": " ".join(rng.choice(_WORDS) for _ in range(200)),
                    "max_tokens": 8, "temperature": 0, "stream": bool(i % 2)}
            for _attempt in range(10):
                resp = c.post(url + "/v1/completions", json=body)
                if resp.status_code == 200:
                    break
                time.sleep(2)
            else:
                raise RuntimeError(f"warm-up failed: {resp.status_code} {resp.text[:300]}")
    return time.monotonic() - t0


def idle_cpu(s: harness.Server, seconds: float) -> dict[str, Any]:
    """CPU used by the server's whole process tree while idle, in % of one core."""
    tree = harness.TreeCpu(s.proc.pid).start()
    time.sleep(seconds)
    r = tree.stop().result()
    return {"seconds": r["wall_s"], "total_pct": r["total_pct"], "engines_pct": r["engines_pct"],
            "orch_pct": r["orch_pct"], "n_processes": r["n_processes"],
            "n_engine_processes": r["n_engine_processes"], "top": r["top_orch"][:4] + r["top_engine"][:2]}


def _pct(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not xs:
        return None
    ys = sorted(xs)
    return ys[min(len(ys) - 1, max(0, math.ceil(q / 100 * len(ys)) - 1))]


class Prober:
    """GET ``url + path`` every ``interval`` seconds from a thread (one at a time: a slow answer
    delays the next probe) and keep each latency; ``on_body`` sees each 200 answer's text."""

    def __init__(self, url: str, path: str, interval: float, timeout: float = 10.0,
                 on_body: Callable[[str], None] | None = None) -> None:
        self.url, self.path, self.interval, self.timeout, self.on_body = url, path, interval, timeout, on_body
        self.ms: list[float] = []
        self.failed = 0
        self.errors: dict[str, int] = {}  # status code or exception name of each failed probe
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"probe {path}", daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout) as c:
            nxt = time.monotonic()
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    resp = c.get(self.url + self.path)
                    ok, why = resp.status_code == 200, str(resp.status_code)
                    if ok and self.on_body is not None:
                        body = resp.text
                except httpx.HTTPError as e:
                    ok, why = False, type(e).__name__
                self.ms.append(1000 * (time.perf_counter() - t0))
                if not ok:
                    self.failed += 1
                    self.errors[why] = self.errors.get(why, 0) + 1
                elif self.on_body is not None:
                    with contextlib.suppress(Exception):
                        self.on_body(body)
                nxt = max(nxt + self.interval, time.monotonic())
                self._stop.wait(max(0.0, nxt - time.monotonic()))

    def start(self) -> "Prober":
        self._thread.start()
        return self

    def _collect(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout + 5)

    def stop(self) -> dict[str, Any]:
        self._collect()
        ms = list(self.ms)
        r = (lambda v: None if v is None else round(v, 1))
        return {"path": self.path, "interval_s": self.interval, "n": len(ms), "failed": self.failed,
                "errors": dict(self.errors),
                "p50_ms": r(_pct(ms, 50)), "p99_ms": r(_pct(ms, 99)), "max_ms": r(max(ms) if ms else None),
                "mean_ms": r(sum(ms) / len(ms) if ms else None)}


class ProcessProber(Prober):
    """A ``Prober`` (no ``on_body``) that runs in a process of its own (``benchmarks.probe``), so
    the driver's own work cannot delay it: the latencies are the server's and the network's."""

    def start(self) -> "ProcessProber":
        self._proc = subprocess.Popen([sys.executable, "-m", "benchmarks.probe", self.url + self.path,
                                       str(self.interval), str(self.timeout)],
                                      cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return self

    def _collect(self) -> None:
        try:
            out, _ = self._proc.communicate(input="", timeout=self.timeout + 5)
            res = json.loads(out.strip().splitlines()[-1])
            self.ms, self.failed, self.errors = res["ms"], res["failed"], res["errors"]
        except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
            self._proc.kill()
            self.errors["probe process: " + type(e).__name__] = 1


# Gauges read from /metrics: (metric, label that tells the readings apart).
GAUGES = (("pd_serve_requests_in_flight", "stage"), ("vllm:num_requests_running", "tier"),
          ("vllm:num_requests_waiting", "tier"))


def gauges(s: Scrape | None) -> dict[str, dict[str, float]]:
    """``{metric: {key: reading}}`` for the GAUGES present, summed per key: the label's value
    (``all`` if absent), prefixed by ``<tier>/`` where a sample has a tier and the label is not
    the tier (pd_serve's decode replicas report stages of their own)."""
    out: dict[str, dict[str, float]] = {}
    for name, lab, v in (s.samples if s is not None else []):
        label = next((lb for m, lb in GAUGES if m == name), None)
        if label is None:
            continue
        key = lab.get(label, "all")
        if label != "tier" and "tier" in lab:
            key = f"{lab['tier']}/{key}"
        per = out.setdefault(name, {})
        per[key] = per.get(key, 0.0) + v
    return out


class GaugeTrack:
    """Max and mean of each gauge reading over the /metrics probes of one load."""

    def __init__(self) -> None:
        self.max: dict[str, dict[str, float]] = {}
        self.sum: dict[str, dict[str, float]] = {}
        self.n = 0

    def __call__(self, text: str) -> None:
        g = gauges(Scrape(text))
        self.n += 1
        for m, per in g.items():
            for k, v in per.items():
                self.max.setdefault(m, {})[k] = max(v, self.max.get(m, {}).get(k, v))
                self.sum.setdefault(m, {})[k] = self.sum.get(m, {}).get(k, 0.0) + v

    def result(self) -> dict[str, Any]:
        return {"n_readings": self.n, "max": self.max,
                "mean": {m: {k: round(v / self.n, 2) for k, v in per.items()} for m, per in self.sum.items()}}


class LoadWindow:
    """What is measured while a load's requests run (``harness.run_load`` opens and closes it):
    CPU of the server tree (engines apart), of the client and of the rest of the machine; on
    probed loads, /health and /metrics latency and the gauges."""

    def __init__(self, s: harness.Server, spec: ServerSpec, probe: bool) -> None:
        self.s, self.spec, self.probe = s, spec, probe
        self.tree = harness.TreeCpu(s.proc.pid)
        self.probers: list[Prober] = []
        self.track = GaugeTrack()
        self.out: dict[str, Any] = {}

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)

    def _client(self) -> float:
        total = 0.0
        for p in (psutil.Process(), *self._loadgen):
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def start(self, loadgen_pid: int) -> None:
        self._loadgen: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            self._loadgen = [psutil.Process(loadgen_pid)]
        self.t0, self.busy0, self.client0 = time.monotonic(), self._busy(), self._client()
        self.tree.start(interval=1.0)
        if self.probe:
            # /health from a process of its own (what the server does); the same probe from a
            # thread of this driver is kept for comparison (it also waits for this process's GIL).
            self.probers = [ProcessProber(self.s.url, HEALTH_PATH[self.spec.kind], 0.1).start(),
                            Prober(self.s.url, HEALTH_PATH[self.spec.kind], 0.1).start(),
                            Prober(self.s.url, "/metrics", 1.0, timeout=30, on_body=self.track).start()]

    def stop(self) -> None:
        self.tree.stop()
        wall = time.monotonic() - self.t0
        busy, client = self._busy() - self.busy0, self._client() - self.client0
        for pr in self.probers:
            key = ("metrics_probe" if pr.path == "/metrics" else
                   "health" if isinstance(pr, ProcessProber) else "health_from_driver_thread")
            self.out[key] = pr.stop()
        tree = self.tree.result()
        pct = (lambda x: round(100 * x / wall, 1))
        self.out["cpu"] = {
            "wall_s": round(wall, 1), "server_pct": pct(tree["total_cpu_s"]), "client_pct": pct(client),
            "other_pct": pct(max(0.0, busy - tree["total_cpu_s"] - client)), "machine_busy_pct": pct(busy),
            **{k: tree[k] for k in ("orch_cpu_s", "engine_cpu_s", "orch_pct", "engines_pct", "n_processes",
                                    "n_engine_processes")},
            "top_orch": tree["top_orch"][:5]}
        if self.probe and self.track.n:
            self.out["gauges_during"] = self.track.result()

    def result(self, output_tokens: int | None) -> dict[str, Any]:
        cpu = self.out.get("cpu")
        if cpu and output_tokens:
            cpu["orch_cpu_s_per_1k_tok"] = round(1000 * cpu["orch_cpu_s"] / output_tokens, 3)
            cpu["engine_cpu_s_per_1k_tok"] = round(1000 * cpu["engine_cpu_s"] / output_tokens, 3)
        return self.out


SCRAPED_HISTOGRAMS = (
    "vllm:time_to_first_token_seconds", "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
    "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
    "vllm:nixl_xfer_time_seconds", "pd_serve_remote_prefill_seconds", "pd_serve_scheduling_seconds",
)
PHASE_METRIC = "pd_serve_phase_seconds"
# The phases of pd_serve_phase_seconds{phase} that together make up a request's time to first token.
TTFT_PHASES = ("parse", "render", "to_decode", "prefill_select", "prefill", "decode_first_token", "to_client")


def _hist_deltas(before: Scrape, after: Scrape, name: str, label: str, default: str) -> dict[str, tuple[float, float]]:
    """``{label value: (Δsum, Δcount)}`` of histogram ``name`` where its count moved."""
    c0, c1 = before.by(name + "_count", label, default), after.by(name + "_count", label, default)
    s0, s1 = before.by(name + "_sum", label, default), after.by(name + "_sum", label, default)
    return {k: (s1.get(k, 0.0) - s0.get(k, 0.0), n - c0.get(k, 0.0)) for k, n in c1.items() if n - c0.get(k, 0.0) > 0}


def engine_side(before: Scrape | None, after: Scrape | None) -> dict[str, Any] | None:
    """Mean of each scraped histogram over one load: ``{name: {tier: {"n": .., "mean_ms": ..}}}``.

    The bare vLLM server and pd_serve's ingress (which merges its replicas' metrics with a
    ``tier`` label) expose them; the peer serves no ``/metrics`` on its HTTP port (None).
    """
    if before is None or after is None:
        return None
    out: dict[str, Any] = {}
    for name in SCRAPED_HISTOGRAMS:
        for tier, (ds, n) in _hist_deltas(before, after, name, "tier", "engine").items():
            out.setdefault(name, {})[tier] = {"n": int(n), "mean_ms": round(1000 * ds / n, 2)}
    return out


def phases(before: Scrape | None, after: Scrape | None, client_ttft_mean_ms: float | None) -> dict[str, Any] | None:
    """pd_serve's phase histogram over one load, and whether the TTFT phases add up to the client's TTFT.

    Per phase: the deltas ``n`` and ``sum_s``, ``mean_ms`` (over the phase's own observations)
    and ``per_request_ms`` (its total time over the number of requests, the largest count of
    any phase); a phase that only some requests pass through (e.g. a remote prefill) then
    weighs by how many did. The check sums
    ``per_request_ms`` over the phases in TTFT_PHASES that are present. None when the server
    has no such histogram (yet).
    """
    if before is None or after is None:
        return None
    d = _hist_deltas(before, after, PHASE_METRIC, "phase", "")
    if not d:
        return None
    requests = max(n for _, n in d.values())
    per = {p: {"n": int(n), "sum_s": round(s, 4), "mean_ms": round(1000 * s / n, 2),
               "per_request_ms": round(1000 * s / requests, 2)} for p, (s, n) in d.items()}
    total = sum(v["per_request_ms"] for p, v in per.items() if p in TTFT_PHASES)
    ratio = None if not client_ttft_mean_ms else round(total / client_ttft_mean_ms, 3)
    return {"per_phase": per, "requests": int(requests), "ttft_phase_sum_ms": round(total, 2),
            "client_ttft_mean_ms": client_ttft_mean_ms, "sum_over_client_ttft": ratio,
            "within_10pct": None if ratio is None else abs(ratio - 1) <= 0.10,
            "ttft_phases_missing": [p for p in TTFT_PHASES if p not in per]}


def measure_load(s: harness.Server, spec: ServerSpec, model: str, load: dict[str, Any],
                 log_path: Path) -> dict[str, Any]:
    """One load against a running server: the generator's result plus what LoadWindow and the
    before/after scrapes saw (they bracket the generator, which sends no test request)."""
    before = Scrape.try_get(s.url)
    window = LoadWindow(s, spec, probe=bool(load.get("probe")))
    m = harness.run_load(s.url, model, load, log_path, timeout=600, window=window)
    after = Scrape.try_get(s.url)
    m.update(window.result(m.get("total_output_tokens")))
    cpu = m.get("cpu") or {}
    m["orch_cpu_s_per_1k_tok"] = cpu.get("orch_cpu_s_per_1k_tok")
    m["engine_cpu_s_per_1k_tok"] = cpu.get("engine_cpu_s_per_1k_tok")
    m["engine_side"] = engine_side(before, after)
    m["phases"] = phases(before, after, m.get("mean_ttft_ms"))
    m["gauges"] = {"before": gauges(before), "after": gauges(after)}
    return m


# ------------------------------------------------------------------------------------------------
# Report


RATIO_KEYS = {"ttft_p50": "p50_ttft_ms", "tpot_mean": "mean_tpot_ms", "output_tok_s": "output_throughput",
              "tpot_p50": "p50_tpot_ms", "itl_p50": "p50_itl_ms",
              "orch_cpu_s_per_1k_tok": "orch_cpu_s_per_1k_tok"}


def _ratio(key: str, a: float | None, b: float | None) -> float | None:
    """a / b; None when either is missing, or, for latencies, under 0.05 ms: a TPOT or ITL
    percentile that small means the client got several tokens in one read (coalesced chunks)."""
    if a is None or b is None or b <= 0:
        return None
    if key.endswith("_ms") and min(a, b) < 0.05:
        return None
    return round(a / b, 3)


def ratios(results: dict[str, Any], loads: list[str]) -> dict[str, Any]:
    """``{load: {"pd_serve/<other>": {ttft_p50, tpot_mean, output_tok_s, ...}}}``, pd_serve's over the other's."""
    out: dict[str, Any] = {}
    mine = results.get("pd_serve", {}).get("loads", {})
    for load in loads:
        per: dict[str, Any] = {}
        for other, entry in results.items():
            theirs = entry.get("loads", {}).get(load)
            if other == "pd_serve" or load not in mine or not theirs:
                continue
            per[f"pd_serve/{other}"] = {k: _ratio(v, mine[load].get(v), theirs.get(v)) for k, v in RATIO_KEYS.items()}
        out[load] = per
    return out


def targets(results: dict[str, Any], ratio: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 8's targets for one run (the issue asks for the median of three runs)."""
    out: list[dict[str, Any]] = []

    def add(load: str, target: str, value: float | None, ok: Callable[[float], bool]) -> None:
        out.append({"load": load, "target": target, "value": value, "met": None if value is None else ok(value)})

    def r(load: str, other: str, key: str) -> float | None:
        return ratio.get(load, {}).get(f"pd_serve/{other}", {}).get(key)

    for load in ("sequential", "random", "prefix"):
        add(load, "TTFT p50 <= 0.7 x peer_fix", r(load, "peer_fix", "ttft_p50"), lambda v: v <= 0.7)
        add(load, "TPOT mean <= 0.9 x peer_fix", r(load, "peer_fix", "tpot_mean"), lambda v: v <= 0.9)
        add(load, "TPOT mean <= 1.5 x bare", r(load, "bare", "tpot_mean"), lambda v: v <= 1.5)
    add("c64", "output tok/s >= 1.0 x bare", r("c64", "bare", "output_tok_s"), lambda v: v >= 1.0)
    add("c64", "output tok/s >= 1.2 x peer_fix", r("c64", "peer_fix", "output_tok_s"), lambda v: v >= 1.2)
    c64 = results.get("pd_serve", {}).get("loads", {}).get("c64", {})
    add("c64", "orch CPU s per 1k tok <= 1.0", c64.get("orch_cpu_s_per_1k_tok"), lambda v: v <= 1.0)
    add("c64", "orch CPU s per 1k tok < peer_fix's (ratio)", r("c64", "peer_fix", "orch_cpu_s_per_1k_tok"),
        lambda v: v < 1.0)
    add("c64", "/health p99 <= 100 ms", (c64.get("health") or {}).get("p99_ms"), lambda v: v <= 100)
    return out


def _f(v: Any, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


ENGINE_SIDE_SHORT = {
    "vllm:time_to_first_token_seconds": "ttft", "vllm:request_queue_time_seconds": "queue",
    "vllm:request_prefill_time_seconds": "prefill", "vllm:request_decode_time_seconds": "decode",
    "vllm:inter_token_latency_seconds": "itl", "vllm:e2e_request_latency_seconds": "e2e",
    "vllm:nixl_xfer_time_seconds": "nixl_xfer", "pd_serve_remote_prefill_seconds": "remote_prefill",
    "pd_serve_scheduling_seconds": "scheduling"}


def table(report: dict[str, Any]) -> str:
    loads = list(report["config"]["loads"])
    servers = report["servers"]
    hdr = (f"{'load':<10} {'server':<14} {'TTFT p50':>8} {'p99':>7} | {'TPOT mean':>9} {'p99':>6} | "
           f"{'out tok/s':>9} {'fail':>4} | {'orch s/1k':>9} {'eng s/1k':>8} {'other%':>6} | "
           f"{'health p50':>10} {'p99':>6} {'max':>6} | {'metrics p99':>11} {'max':>6}")
    lines = ["ms; s/1k = CPU-seconds per 1,000 output tokens outside the engines (orch) and in them (eng); "
             "other% = CPU of processes outside this run (% of one core); health/metrics: probe latency "
             "under the closed loops", hdr, "-" * len(hdr)]
    for load in loads:
        for name, s in servers.items():
            m = s.get("loads", {}).get(load)
            if not m:
                lines.append(f"{load:<10} {name:<14} {s.get('status', '?')}: {str(s.get('error', ''))[:90]}")
                continue
            h, mp = m.get("health") or {}, m.get("metrics_probe") or {}
            lines.append(
                f"{load:<10} {name:<14} {_f(m.get('p50_ttft_ms')):>8} {_f(m.get('p99_ttft_ms')):>7} | "
                f"{_f(m.get('mean_tpot_ms'), 2):>9} {_f(m.get('p99_tpot_ms'), 2):>6} | "
                f"{_f(m.get('output_throughput'), 0):>9} {m.get('failed', '-'):>4} | "
                f"{_f(m.get('orch_cpu_s_per_1k_tok'), 2):>9} {_f(m.get('engine_cpu_s_per_1k_tok'), 2):>8} "
                f"{_f((m.get('cpu') or {}).get('other_pct')):>6} | {_f(h.get('p50_ms')):>10} "
                f"{_f(h.get('p99_ms')):>6} {_f(h.get('max_ms')):>6} | {_f(mp.get('p99_ms')):>11} "
                f"{_f(mp.get('max_ms')):>6}")
    lines += ["", "ratios pd_serve / other (< 1: pd_serve lower; for out tok/s > 1 is better)"]
    for load, per in report["ratios"].items():
        for pair, r in per.items():
            lines.append(f"  {load:<10} {pair:<24} TTFT p50 {_f(r.get('ttft_p50'), 2):>5}  TPOT mean "
                         f"{_f(r.get('tpot_mean'), 2):>5}  out tok/s {_f(r.get('output_tok_s'), 2):>5}  "
                         f"orch s/1k {_f(r.get('orch_cpu_s_per_1k_tok'), 2):>5}")
    lines += phase_lines(report) + gauge_lines(report)
    lines += ["", "targets (issue 8; one run, the issue asks for the median of three)"]
    for t in (t for t in report["targets"] if t["load"] in loads):
        met = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
        lines.append(f"  {t['load']:<10} {t['target']:<42} {_f(t['value'], 2):>7}  {met}")
    lines += ["", "start-up and idle CPU (% of one core over the idle window: whole server / engines)"]
    for name, s in servers.items():
        c = s.get("idle_cpu") or {}
        lines.append(f"  {name:<15} ready in {_f(s.get('start_s'), 0):>4} s   idle CPU "
                     f"{_f(c.get('total_pct'))}% / engines {_f(c.get('engines_pct'))}%")
    lines += ["", "engine-side means from /metrics (ms; tier: mean over the load's requests)"]
    for load in loads:
        for name, s in servers.items():
            es = (s.get("loads", {}).get(load) or {}).get("engine_side")
            if es:
                parts = [f"{ENGINE_SIDE_SHORT.get(h, h)}[{t}] {v['mean_ms']:.1f}" for h, per in es.items()
                         for t, v in sorted(per.items())]
                lines.append(f"  {load:<10} {name:<15} " + ", ".join(parts))
    return "\n".join(lines)


def phase_lines(report: dict[str, Any]) -> list[str]:
    rows = [(load, name, ph) for load in report["config"]["loads"] for name, s in report["servers"].items()
            if (ph := (s.get("loads", {}).get(load) or {}).get("phases"))]
    if not rows:
        return ["", f"phases: no {PHASE_METRIC} histogram on any server"]
    names = list(TTFT_PHASES) + sorted({p for _, _, ph in rows for p in ph["per_phase"]} - set(TTFT_PHASES))
    hdr = f"  {'load':<10} {'server':<14} " + " ".join(f"{p:>{max(7, len(p))}}" for p in names) + \
          f" | {'sum':>7} {'client':>7} {'ratio':>5} ok"
    out = ["", f"phases of {PHASE_METRIC} (ms per request: phase total / requests; TTFT phases summed)", hdr]
    for load, name, ph in rows:
        per = ph["per_phase"]
        cells = " ".join(f"{_f((per.get(p) or {}).get('per_request_ms'), 2):>{max(7, len(p))}}" for p in names)
        ok = {True: "yes", False: "NO", None: "-"}[ph["within_10pct"]]
        out.append(f"  {load:<10} {name:<14} {cells} | {_f(ph['ttft_phase_sum_ms']):>7} "
                   f"{_f(ph['client_ttft_mean_ms']):>7} {_f(ph['sum_over_client_ttft'], 2):>5} {ok}")
    return out


def gauge_lines(report: dict[str, Any]) -> list[str]:
    out = ["", "gauges during the closed loops (max over the /metrics probes; after the load in brackets)"]
    for load in report["config"]["loads"]:
        for name, s in report["servers"].items():
            m = s.get("loads", {}).get(load) or {}
            during, after = (m.get("gauges_during") or {}).get("max") or {}, (m.get("gauges") or {}).get("after") or {}
            if during:
                parts = [f"{metric}{{{k}}} {v:g} [{after.get(metric, {}).get(k, 0):g}]"
                         for metric, per in during.items() for k, v in sorted(per.items())]
                out.append(f"  {load:<10} {name:<14} " + ", ".join(parts))
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    loads = list(report["config"]["loads"])
    servers = [n for n, s in report["servers"].items() if s.get("loads")]

    def get(name: str, load: str, key: str) -> float | None:
        return (report["servers"][name]["loads"].get(load) or {}).get(key)

    fig, axes = plt.subplots(2, 3, figsize=(19, 10))
    width = 0.8 / max(1, len(servers))
    bars = [("TTFT p50 (ms, log)", "p50_ttft_ms", True), ("TPOT mean (ms, log)", "mean_tpot_ms", True),
            ("output tokens/s (log)", "output_throughput", True),
            ("CPU-s outside the engines per 1k output tokens", "orch_cpu_s_per_1k_tok", False)]
    for ax, (title, key, log) in zip(axes.flat, bars):
        for k, name in enumerate(servers):
            xs = [i + (k - (len(servers) - 1) / 2) * width for i in range(len(loads))]
            vals = [get(name, load, key) for load in loads]
            b = ax.bar(xs, [v or 0 for v in vals], width, label=name)
            for rect, v in zip(b, vals):
                if v is not None:
                    ax.annotate(f"{v:.0f}" if v >= 10 else f"{v:.2f}" if v < 1 else f"{v:.1f}",
                                (rect.get_x() + rect.get_width() / 2, v), ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(loads)), loads)
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title)
    axes[0][0].legend(fontsize=8)
    c_loads = [l for l in loads if l in CONCURRENCY]
    for ax, key, title, line in ((axes[1][1], "output_throughput", "closed loops: output tokens/s", None),
                                 (axes[1][2], "health", "closed loops: /health p99 (ms)", 100)):
        plotted = False
        for name in servers:
            pts = [(CONCURRENCY[l], get(name, l, key)) for l in c_loads]
            pts = [(c, (v or {}).get("p99_ms") if key == "health" else v) for c, v in pts]
            pts = [(c, v) for c, v in pts if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
                plotted = True
        if line:
            ax.axhline(line, color="grey", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        if plotted:
            ax.legend(fontsize=8)
    sha = report["git"]["sha"][:10] + ("-dirty" if report["git"]["dirty"] else "")
    fig.suptitle(f"serving, tiny-llama on {report['machine']['nproc']} CPU cores ({sha})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Main


def run_in_own_session(argv: list[str], module: str = "benchmarks.serving_bench") -> int:
    """Re-run this benchmark (or ``module``) as the leader of a new session and boost that
    session's autogroup.

    Everything client-side (warm-up, scrapes, probes, the load generators it starts) then shares
    the boosted autogroup; servers get sessions of their own at the default priority. SIGINT and
    SIGTERM are passed on, and the child stops its servers before it exits.
    """
    env = {**os.environ, "PD_SERVE_BENCH_SESSION": "1"}
    proc = subprocess.Popen([sys.executable, "-m", module, *argv], cwd=ROOT,
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
    p.add_argument("--loads", default=DEFAULT_LOADS, help=f"comma list (default {DEFAULT_LOADS})")
    p.add_argument("--quick", action="store_true",
                   help="20 prompts per Poisson load instead of 50; closed loops max(2N, 16) prompts "
                        "instead of max(8N, 64)")
    p.add_argument("--num-prompts", type=int, default=None, help="prompts per Poisson load (default 50)")
    p.add_argument("--request-rate", type=float, default=5.0, help="Poisson arrival rate, req/s")
    p.add_argument("--idle-seconds", type=float, default=5.0, help="idle-CPU window per server")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny-cpu.yaml",
                   help=f"pd_serve serve config; run with its port set to {PORT_PD}")
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
    known = load_specs(a.num_prompts, a.request_rate, a.quick)
    for l in a.loads:
        if l not in known:
            p.error(f"unknown load {l!r}; choose from {', '.join(known)}")
    return a


def finish(report: dict[str, Any], json_path: Path) -> Path | None:
    """Ratios and targets from the measurements; write JSON + PNG."""
    report["ratios"] = ratios(report["servers"], list(report["config"]["loads"]))
    report["targets"] = targets(report["servers"], report["ratios"])
    has_loads = any(s.get("loads") for s in report["servers"].values())
    return harness.write_result(report, json_path, plot if has_loads else None)


def rerender(path: Path) -> int:
    report = json.loads(path.read_text())
    report["report_rerendered_utc"] = harness.utc_stamp()
    finish(report, path)
    print(table(report))
    return 0


def run_server(name: str, a: argparse.Namespace, model: str, config: Path, loads: dict[str, Any],
               log_path: Path, entry: dict[str, Any], bar: tqdm) -> bool:
    """Start one server, measure it under every load, stop it. Returns False when interrupted."""
    spec, log = SERVERS[name], bar.write
    running = None
    steps = 3 + len(loads)
    done = 0
    try:
        if spec.kind == "peer":
            ensure_bench_env(log)
        bar.set_description(f"{name}: starting")
        t0 = time.monotonic()
        running = start_server(spec, model, config, log_path, a.start_timeout)
        entry["start_s"] = round(time.monotonic() - t0, 1)
        bar.update(1); done += 1
        bar.set_description(f"{name}: warm-up, idle CPU")
        entry["warm_up_s"] = round(warm_up(running.url), 2)
        time.sleep(2)
        entry["idle_cpu"] = idle_cpu(running, a.idle_seconds)
        log(f"{name}: ready in {entry['start_s']} s, warm-up {entry['warm_up_s']} s; idle CPU "
            f"{entry['idle_cpu']['total_pct']}% (engines {entry['idle_cpu']['engines_pct']}%)")
        bar.update(1); done += 1
        for lname, load in loads.items():
            bar.set_description(f"{name}: load {lname}")
            m = measure_load(running, spec, model, load, log_path)
            entry["loads"][lname] = m
            h = m.get("health") or {}
            log(f"{name} {lname}: TTFT p50 {_f(m.get('p50_ttft_ms'))} ms, TPOT mean "
                f"{_f(m.get('mean_tpot_ms'), 2)} ms, {_f(m.get('output_throughput'), 0)} tok/s, failed "
                f"{m.get('failed')}; orch {_f(m.get('orch_cpu_s_per_1k_tok'), 2)} / engines "
                f"{_f(m.get('engine_cpu_s_per_1k_tok'), 2)} CPU-s per 1k tok"
                + (f"; /health p99 {_f(h.get('p99_ms'))} ms" if h else ""))
            bar.update(1); done += 1
        entry["status"] = "ok"
        return True
    except KeyboardInterrupt:
        entry["status"], entry["error"] = "interrupted", "interrupted"
        entry["traceback"] = traceback.format_exc(limit=8).splitlines()[-16:]
        return False
    except Exception as e:  # noqa: BLE001 - recorded, and the next server still runs
        entry["status"], entry["error"] = "failed", f"{type(e).__name__}: {e}"
        entry["traceback"] = traceback.format_exc(limit=6).splitlines()[-12:]
        log(f"{name}: FAILED {entry['error']}")
        return True
    finally:
        if running is not None:
            bar.set_description(f"{name}: stopping")
            try:
                entry["notes"] += harness.stop_server(running)
            except KeyboardInterrupt:  # arrived during the stop, which completed
                entry["status"] = "interrupted"
                entry["notes"].append("interrupted while stopping (stop completed)")
        elif (left := harness.leftovers()):
            entry["notes"].append(f"after a failed start: {harness.describe(left)}")
        bar.update(steps - done)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.report:
        return rerender(a.report)
    if os.environ.get("PD_SERVE_BENCH_SESSION") != "1":
        return run_in_own_session(sys.argv[1:] if argv is None else argv)
    boosted = boost_autogroup(os.getpid())
    specs = load_specs(a.num_prompts, a.request_rate, a.quick)
    loads = {l: specs[l] for l in a.loads}
    from pd_serve.tiny_model import TINY_URI, resolve_model

    model = resolve_model(TINY_URI)
    stamp = harness.utc_stamp()
    json_path = a.out_dir / f"serving_{stamp}.json"
    a.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="pd_serve_bench_")
    config = bench_config(a.config, PORT_PD, Path(tmp.name))

    def _sigterm(*_: Any) -> None:  # SIGTERM behaves like Ctrl-C: the finally-blocks stop servers
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _sigterm)
    report = harness.envelope("serving", stamp, {
        "model": model, "served_model_name": SERVED_NAME, "engine_flags": harness.ENGINE_FLAGS,
        "kv_cache_gib": 1, "pd_serve_config": f"{harness.rel(a.config)} with its port set to {PORT_PD}",
        "pd_serve_launch": " ".join(pd_serve_launch(a.config)), "pd_serve_env": PD_SERVE_ENV,
        "ports": {"bare": PORT_BARE, "pd_serve_and_peer": PORT_PD},
        "loads": {k: {"description": v["description"], "vllm_bench_args": [*harness.BENCH_COMMON, *v["args"]],
                      "probed": bool(v.get("probe"))} for k, v in loads.items()},
        "servers": {s: {"description": SERVERS[s].description, "env": server_env(SERVERS[s]),
                        "health_probe": HEALTH_PATH[SERVERS[s].kind]} for s in a.servers},
        "num_prompts": a.num_prompts, "request_rate": a.request_rate, "quick": a.quick,
        "warm_up": "4 completions of ~200 words, 8 tokens out (2 streamed) before measuring",
        "idle_seconds": a.idle_seconds, "loadgen": "vllm bench serve (benchmarks/vllm_bench.py)",
        "cpu_window": "from the generator's 'Starting main benchmark run' to its result banner",
        "probes": "closed loops only: GET /health (peer: /v1/models) every 0.1 s, GET /metrics every 1 s",
        "client_autogroup_nice": CLIENT_AUTOGROUP_NICE if boosted else None,
    }, servers={})

    steps_per_server = 3 + len(loads)
    bar = tqdm(total=len(a.servers) * steps_per_server, desc="serving bench", unit="step", dynamic_ncols=True)
    t_run = time.monotonic()
    interrupted = False
    try:
        with harness.engines_to_myself(bar.write, report):
            bar.reset()  # the time spent waiting for the lock is not the benchmark's
            t_run = time.monotonic()
            for name in a.servers:
                log_path = a.out_dir / f"serving_{stamp}_{name}.log"
                entry: dict[str, Any] = {"status": "running", "kind": SERVERS[name].kind, "loads": {},
                                         "notes": [], "log": harness.rel(log_path)}
                report["servers"][name] = entry
                if not run_server(name, a, model, config, loads, log_path, entry, bar) \
                        or entry["status"] == "interrupted":
                    interrupted = True
                    break
            report["leftover_processes_at_end"] = harness.describe(harness.leftovers())
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        tmp.cleanup()
        report["runtime_s"] = round(time.monotonic() - t_run, 1)
        if report["servers"]:  # nothing ran (lock wait interrupted, stray engines): no result file
            png = finish(report, json_path)
            print(table(report))
            print(f"\nwrote {harness.rel(json_path)}" + (f" and {png.name}" if png else "")
                  + f" in {report['runtime_s']:.0f} s")
    return 1 if interrupted or any(s["status"] != "ok" for s in report["servers"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
