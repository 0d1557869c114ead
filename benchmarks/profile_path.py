"""Where the CPU goes on pd_serve's request path: py-spy on every Serve replica under N streams.

    flock /tmp/pd_serve_engines.lock .venv/bin/python -m benchmarks.profile_path   # 1 and 32 streams, 20 s
    .venv/bin/python -m benchmarks.profile_path --streams 1,8,32 --seconds 30
    .venv/bin/python -m benchmarks.profile_path --report benchmarks/results/profile_path_<UTC>.json  # re-render

Starts pd_serve once, as ``serving_bench`` does (``serve run`` on a copy of ``configs/tiny-cpu.yaml``
with its port set to 8500), warms it up, and then for each N in ``--streams``:

1. starts a closed-loop ``vllm bench serve`` load (random 256 tokens in, 64 out, ``--ignore-eos``,
   ``--max-concurrency N``; enough prompts to outlast the window, see ``prompts_for``);
2. waits ``--settle`` seconds after the generator's measured run began (steady state);
3. for ``--seconds``: samples the CPU of every process of the server tree (``harness.TreeCpu``,
   the vLLM engines apart from the rest) and runs ``py-spy record --rate R --format raw
   --nonblocking --threads --full-filenames`` on each Ray Serve replica process of
   ``--deployments`` (found by the title ``ray::ServeReplica:<app>:<Deployment>``) and on the
   Serve proxy (``ray::ProxyActor``) if there is one (``configs/tiny-cpu.yaml`` disables it).
   py-spy runs under ``chrt -f 20`` when that is permitted: at normal priority it starved on a
   2-core machine and took a fraction of its samples (benchmarks/README.md). Without the permission it runs at normal
   priority and the report says so. ``vllm:generation_tokens_total`` (decode tier) is read from
   ``/metrics`` just before and after the window;
4. lets the load finish and keeps its client figures (output tok/s, TTFT, TPOT).

Each py-spy raw file (collapsed stacks, one line per distinct stack with its sample count) is
summarised (``summarize``) into the top self-time frames (the leaf of each sample), the top
inclusive frames (every distinct frame of a sample's stack once), the threads, and **buckets**:
each sample goes to the bucket of the innermost frame of its stack that a rule of ``BUCKETS``
claims. Standard-library frames (asyncio, json, threading, ...) and generated code (``<string>``)
are transparent, so a ``json.dumps`` that vLLM calls counts as vLLM. Only a stack made of
standard-library frames alone goes to ``native_thread``, ``event_loop``, ``thread_pool`` or
``other`` (by its thread's name, then by its frames). Shares are percentages of the samples
py-spy took of the threads it did not judge idle (a thread that waits for a core counts, so
samples are not CPU time). A bucket's share times the
replica's measured CPU gives an estimate of that bucket's CPU (``cpu_pct_est``); that estimate
uses ``busy_pct``, the share among the samples whose leaf frame does not block (a selector poll
or a threading wait: with ``--nonblocking`` some samples of a thread that is about to block
land there, ``BLOCKING_LEAF``).

Writes ``benchmarks/results/profile_path_<UTC>.json`` (harness envelope: git sha, machine, config
with each N's load arguments) and a PNG next to it: per N the CPU of each process (stacked),
and per replica its bucket shares. The server's and the generator's output go to
``benchmarks/results/profile_path_<UTC>.log`` (git-ignored); py-spy's raw files to a temporary
directory, or to ``--raw-dir``. The whole run holds ``/tmp/pd_serve_engines.lock`` and stops the
server (and any py-spy and load generator it started) on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import psutil

from benchmarks import harness
from benchmarks.harness import ROOT, SERVED_NAME, Scrape

RESULTS_DIR = harness.RESULTS_DIR
DEFAULT_STREAMS = "1,32"
DEFAULT_DEPLOYMENTS = "Ingress,DecodeServer,PrefillServer"
PY_SPY = Path(sys.executable).parent / "py-spy"
RT_PRIORITY = 20
IN_LEN, OUT_LEN = 256, 64
PROXY_MARKER = "ProxyActor"
REPLICA_MARKER = "ServeReplica:"

# ------------------------------------------------------------------------------------------------
# Buckets: the one table of rules (rendered in benchmarks/README.md).
#
# Each rule is (bucket, pass, regex, what it holds); the regex is matched (re.match) against a
# frame's normalised file path (``norm_path``: site-packages prefix, the clone's root or the
# standard library's directory removed). A sample goes to the first bucket found by:
#   pass "frame":  the frames from the leaf to the root; the first frame that a "frame" rule
#                  claims decides (rules tried in table order). Standard-library frames and
#                  generated code (``<string>``, ``<frozen ...>``) are claimed by none of them;
#                  any other file no rule claims goes to "other".
#   pass "thread": only when no frame was claimed (a stack of standard-library frames alone):
#                  the thread's name against the "thread" rules.
#   pass "stdlib": then the frames from the leaf to the root against the "stdlib" rules.
#   otherwise "other".
BUCKETS: tuple[tuple[str, str, str, str], ...] = (
    ("metrics", "frame", r"ray/util/metrics\.py|prometheus_client/|opentelemetry/",
     "Ray's metrics API (Serve's request metrics), prometheus_client, OpenTelemetry"),
    ("ray_serve", "frame", r"ray/serve/|ray/llm/",
     "Ray Serve's router, replica and handle machinery (ray/serve/_private, ...)"),
    ("ray_core", "frame", r"(python/)?ray/",
     "Ray core calls and streaming: ray/_private (object_ref_generator, worker, serialization), "
     "ray/actor.py, _raylet, the rest of ray/"),
    ("http", "frame", r"(uvicorn|starlette|fastapi|httptools|h11|anyio|sse_starlette|httpx|httpcore)/",
     "HTTP server and client: uvicorn, starlette, fastapi, httptools, h11, anyio"),
    ("vllm", "frame", r"vllm/",
     "vLLM: OpenAI serving, detokenizer, output processing, engine client"),
    ("tokenizer", "frame", r"(transformers|tokenizers)/", "transformers / tokenizers"),
    ("serialization", "frame", r"(pydantic|pydantic_core|msgspec|msgpack|cloudpickle|orjson)/",
     "pydantic, msgspec, msgpack, cloudpickle (outside Ray's and vLLM's own files)"),
    ("pd_serve", "frame", r"(pd_serve|scheduler|kv_transfer)/",
     "pd_serve's own code: pd_serve/, scheduler/, kv_transfer/"),
    ("zmq", "frame", r"zmq/",
     "ZeroMQ (pyzmq): vLLM's engine-client sockets to its EngineCore, pd_serve's KV-event subscriber"),
    ("native_thread", "thread", r"$",
     "no frame claimed, in a thread without a name (one Python's threading module did not start: a "
     "native thread, often with no Python frame at all); in these replicas Ray's core-worker threads, "
     "which run Ray's callbacks (deserialisation, completion callbacks) on the same threads"),
    ("event_loop", "thread", r"AsyncIO Thread",
     "only standard-library frames, in Ray's event-loop thread (`AsyncIO Thread: default`, the replica's "
     "loop): the loop is uvloop, native code, so its own work shows as the leaf `Thread.run`"),
    ("event_loop", "stdlib", r"asyncio/|selectors\.py",
     "only standard-library frames, under asyncio: the event loop itself (callbacks, selector, tasks)"),
    ("thread_pool", "stdlib", r"concurrent/futures/|threading\.py|queue\.py",
     "only standard-library frames, in another thread: a pool worker running native code "
     "(`_WorkItem.run`), or a thread whose target is native; py-spy cannot see the caller"),
)
OTHER = "other"
BUCKET_NAMES = list(dict.fromkeys(b[0] for b in BUCKETS)) + [OTHER]
_FRAME_RULES = [(name, re.compile(rx)) for name, kind, rx, _ in BUCKETS if kind == "frame"]
_THREAD_RULES = [(name, re.compile(rx)) for name, kind, rx, _ in BUCKETS if kind == "thread"]
_STDLIB_RULES = [(name, re.compile(rx)) for name, kind, rx, _ in BUCKETS if kind == "stdlib"]
# A leaf frame that blocks: a selector's poll, a Condition wait, a pool worker waiting for work
# (in SimpleQueue.get, which is native), a ZeroMQ poll. py-spy's --nonblocking reads a thread's
# state and its stack at slightly different moments, so some samples of a thread about to block
# land here; ``blocking_leaf_pct`` says how many.
BLOCKING_LEAF = re.compile(r"^(\S*(select|poll|wait)\b.* \((selectors|threading)\.py\)"
                           r"|_worker \(concurrent/futures/thread\.py\)|\S*\.poll \(zmq/sugar/\w+\.py\))$")
_SITE = re.compile(r"^.*/(?:site|dist)-packages/")
_STDLIB_DIR = re.compile(r"^.*/lib/python\d+(?:\.\d+)?/")
_STDLIB_NAMES = frozenset(sys.stdlib_module_names)


@dataclass(frozen=True)
class Frame:
    func: str
    file: str  # as py-spy wrote it
    line: int | None


@dataclass(frozen=True)
class Stack:
    thread: str | None  # thread name ("" for a thread without one; None without --threads)
    frames: tuple[Frame, ...]  # root first, leaf last
    count: int


def parse_frame(text: str) -> Frame:
    """``func (file:line)`` (py-spy's raw format) into a Frame; text without a file is a function alone."""
    if text.endswith(")") and " (" in text:
        func, rest = text[:-1].split(" (", 1)  # qualnames hold no spaces; paths may
        file, sep, line = rest.rpartition(":")
        if sep and line.isdigit():
            return Frame(func, file, int(line))
        return Frame(func, rest, None)
    return Frame(text, "", None)


_THREAD = re.compile(r"^thread \((?:0x)?[0-9a-fA-F]+\)(?::\s*(.*))?$")
_PROCESS = re.compile(r"^process \d+:")


def parse_raw(text: str) -> list[Stack]:
    """py-spy's ``--format raw`` output: one ``frame;frame;... count`` line per distinct stack,
    root first. With ``--threads`` the first element is ``thread (ID): NAME``; with
    ``--subprocesses`` a ``process PID:...`` element may precede it. Blank or malformed lines are
    skipped."""
    out: list[Stack] = []
    for line in text.splitlines():
        line = line.rstrip()
        if not line or " " not in line:
            continue
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        parts = stack.split(";")
        thread: str | None = None
        if parts and _PROCESS.match(parts[0]):
            parts = parts[1:]
        if parts and (m := _THREAD.match(parts[0])):
            thread = (m.group(1) or "").strip()
            parts = parts[1:]
        out.append(Stack(thread, tuple(parse_frame(p) for p in parts if p), int(n)))
    return out


def norm_path(file: str, root: str | Path = ROOT) -> str:
    """A frame's file relative to site-packages, to the clone (``root``) or to the standard
    library's directory; anything else unchanged."""
    if not file:
        return ""
    if (m := _SITE.match(file)):
        return file[m.end():]
    r = str(root).rstrip("/") + "/"
    if str(root) and file.startswith(r):
        return file[len(r):]
    if (m := _STDLIB_DIR.match(file)):
        return file[m.end():]
    return file


def is_stdlib(path: str) -> bool:
    """A normalised path of the standard library or of generated code (``<string>``, ``<frozen ...>``)."""
    if not path or path.startswith("<"):
        return True
    if path.startswith("/"):
        return False
    top = path.split("/", 1)[0]
    return top.removesuffix(".py") in _STDLIB_NAMES


def frame_bucket(path: str) -> str | None:
    """The bucket a "frame" rule gives a normalised path; None for standard-library frames
    (transparent), ``other`` for any other file no rule claims."""
    for name, rx in _FRAME_RULES:
        if rx.match(path):
            return name
    return None if is_stdlib(path) else OTHER


def stack_bucket(paths: list[str], thread: str | None = None) -> tuple[str, int | None]:
    """The bucket of one sample (``paths``: normalised files, root first; ``thread``: its thread's
    name, "" for a thread without one, None when unknown: the "thread" rules are then skipped) and
    the index of the frame that decided it (None when no frame did)."""
    for i in range(len(paths) - 1, -1, -1):
        if (b := frame_bucket(paths[i])) is not None:
            return b, i
    for name, rx in _THREAD_RULES if thread is not None else ():
        if rx.match(thread):
            return name, None
    for i in range(len(paths) - 1, -1, -1):
        for name, rx in _STDLIB_RULES:
            if rx.match(paths[i]):
                return name, i
    return OTHER, None


def frame_key(f: Frame, root: str | Path = ROOT) -> str:
    """A frame as ``func (path)``: the line number left out, so that a function's lines add up."""
    p = norm_path(f.file, root)
    return f"{f.func} ({p})" if p else f.func


def thread_group(name: str | None) -> str:
    """Thread names with their numbers as N (``ThreadPoolExecutor-0_3`` -> ``ThreadPoolExecutor-N_N``)."""
    if name is None:
        return "(no thread information)"
    return re.sub(r"\d+", "N", name) if name else "(unnamed)"


def _pct(n: float, total: float) -> float:
    return round(100 * n / total, 1) if total else 0.0


def summarize(stacks: Iterable[Stack], root: str | Path = ROOT, top: int = 15) -> dict[str, Any]:
    """Self-time and inclusive top frames, threads and bucket shares of one raw profile.

    Percentages are of all samples in the profile (``samples``). ``top_self``: leaf frames;
    ``top_inclusive``: each distinct frame of a stack counted once; ``buckets``: every bucket of
    ``BUCKET_NAMES`` with its samples and share, and its 3 largest deciding frames (the frame
    whose rule claimed the sample; the leaf when none did), and ``busy_pct``, its share of the
    samples whose leaf does not block; ``blocking_leaf_pct``: samples whose leaf is a selector
    poll or a threading wait (see ``BLOCKING_LEAF``).
    """
    self_c: Counter[str] = Counter()
    blocking = 0
    incl_c: Counter[str] = Counter()
    bucket_c: Counter[str] = Counter()
    bucket_busy: Counter[str] = Counter()
    decider: dict[str, Counter[str]] = {b: Counter() for b in BUCKET_NAMES}
    threads: Counter[str] = Counter()
    total = 0
    for s in stacks:
        total += s.count
        threads[thread_group(s.thread)] += s.count
        keys = [frame_key(f, root) for f in s.frames]
        paths = [norm_path(f.file, root) for f in s.frames]
        blocked = bool(keys) and bool(BLOCKING_LEAF.match(keys[-1]))
        if keys:
            self_c[keys[-1]] += s.count
        if blocked:
            blocking += s.count
        for k in set(keys):
            incl_c[k] += s.count
        b, i = stack_bucket(paths, s.thread)
        bucket_c[b] += s.count
        if not blocked:
            bucket_busy[b] += s.count
        if keys:
            decider[b][keys[i if i is not None else -1]] += s.count

    def listing(c: Counter[str], n: int) -> list[dict[str, Any]]:
        return [{"frame": k, "samples": v, "pct": _pct(v, total)}
                for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]

    return {"samples": total, "blocking_leaf_samples": blocking, "blocking_leaf_pct": _pct(blocking, total),
            "buckets": {b: {"samples": bucket_c[b], "pct": _pct(bucket_c[b], total),
                            "busy_pct": _pct(bucket_busy[b], total - blocking),
                            "top_frames": listing(decider[b], 3)} for b in BUCKET_NAMES},
            "threads": {k: {"samples": v, "pct": _pct(v, total)}
                        for k, v in sorted(threads.items(), key=lambda kv: (-kv[1], kv[0]))},
            "top_self": listing(self_c, top), "top_inclusive": listing(incl_c, top)}


# ------------------------------------------------------------------------------------------------
# Processes


def process_label(title: str, ancestor_titles: Iterable[str] = ()) -> str:
    """A short name for a server process from its title (Ray sets ``ray::...`` titles; vLLM
    ``VLLM::...``). An engine process is named with the deployment of the replica above it."""
    t = title.strip()
    if REPLICA_MARKER in t:
        return deployment_of(t) + " replica"
    if PROXY_MARKER in t:
        return "Serve proxy"
    if "ServeController" in t:
        return "Serve controller"
    if t.startswith("VLLM::"):
        name = t.split()[0].removeprefix("VLLM::")
        for a in ancestor_titles:
            if REPLICA_MARKER in a:
                return f"{name} [{deployment_of(a)}]"
        return name
    if t.startswith("ray::"):
        return t.split()[0]
    words = t.split()
    for w in words:
        base = w.rsplit("/", 1)[-1]
        if base in ("raylet", "gcs_server"):
            return base
    if any(w.endswith("/serve") for w in words[:2]) and "run" in words:
        return "serve run (launcher)"
    for w in words:
        if w.endswith(".py"):
            return w.rsplit("/", 1)[-1]
    return (words[0].rsplit("/", 1)[-1] if words else "?")[:40]


def deployment_of(title: str) -> str:
    """``ray::ServeReplica:pd_serve:DecodeServer.generate`` -> ``DecodeServer``."""
    rest = title.split(REPLICA_MARKER, 1)[1].split()[0]
    return rest.split(":")[-1].split(".")[0]


def _title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()).strip() or p.name()
    except psutil.Error:
        return ""


def find_targets(server: harness.Server, deployments: list[str]) -> list[dict[str, Any]]:
    """The replica processes of ``deployments`` (and the Serve proxy, if any) in the server's
    tree: ``[{"name", "pid", "title"}]``, in the order of ``deployments``, proxy last."""
    found: dict[str, list[tuple[int, str]]] = {}
    proxies: list[tuple[int, str]] = []
    for p in server.snapshot():
        t = _title(p)
        if REPLICA_MARKER in t:
            found.setdefault(deployment_of(t), []).append((p.pid, t))
        elif PROXY_MARKER in t:
            proxies.append((p.pid, t))
    out = []
    for d in deployments:
        for k, (pid, t) in enumerate(sorted(found.get(d, []))):
            out.append({"name": d if k == 0 else f"{d}#{k + 1}", "pid": pid, "title": t[:90]})
    for k, (pid, t) in enumerate(sorted(proxies)):
        out.append({"name": "proxy" if k == 0 else f"proxy#{k + 1}", "pid": pid, "title": t[:90]})
    return out


def per_process(tree: harness.TreeCpu, labels: dict[int, str]) -> list[dict[str, Any]]:
    """CPU of the tree's processes over the window, summed per label, largest first."""
    wall = max(tree.t1 - tree.t0, 1e-9)
    agg: dict[str, dict[str, Any]] = {}
    for pid, last in tree.last.items():
        d = last - tree.base[pid]
        lab = labels.get(pid) or process_label(tree.title.get(pid, ""))
        e = agg.setdefault(lab, {"process": lab, "n": 0, "cpu_s": 0.0, "engine": tree.engine[pid]})
        e["n"] += 1
        e["cpu_s"] += d
    rows = sorted(agg.values(), key=lambda e: -e["cpu_s"])
    for e in rows:
        e["cpu_s"] = round(e["cpu_s"], 2)
        e["pct"] = round(100 * e["cpu_s"] / wall, 1)
    return rows


def labels_of(pids: Iterable[int]) -> dict[int, str]:
    out = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out[pid] = process_label(_title(p), [_title(a) for a in p.parents()])
        except psutil.Error:
            continue
    return out


# ------------------------------------------------------------------------------------------------
# One N


def prompts_for(n: int, settle: float, seconds: float) -> int:
    """Prompts for N closed-loop streams: enough to run through ``settle + seconds`` plus 15 s at a
    generous guess of the rate (250 output tok/s for one stream, 2,000 for 32: measured here
    178 and 1,572 on 2026-12-03), and at least 8 per stream."""
    tok_s = min(3000.0, 250.0 * n ** 0.6)
    return max(8 * n, 32, math.ceil(tok_s * (settle + seconds + 15) / OUT_LEN))


def load_args(n: int, prompts: int) -> list[str]:
    from benchmarks.serving_bench import LOAD_COMMON

    return [*LOAD_COMMON, "--dataset-name", "random", "--random-input-len", str(IN_LEN),
            "--random-output-len", str(OUT_LEN), "--num-prompts", str(prompts), "--max-concurrency", str(n)]


class LoadMarks:
    """The window ``harness.run_load`` opens and closes: when the measured run starts and ends."""

    def __init__(self) -> None:
        self.started, self.ended = threading.Event(), threading.Event()
        self.pid: int | None = None
        self.t_start = self.t_end = None

    def start(self, pid: int) -> None:
        self.pid, self.t_start = pid, time.monotonic()
        self.started.set()

    def stop(self) -> None:
        self.t_end = time.monotonic()
        self.ended.set()


def machine_busy_s() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


def client_cpu_s(loadgen_pid: int | None) -> dict[int, float]:
    """CPU-seconds of this process and of the load generator (the client side), by pid."""
    out = {}
    for pid in (os.getpid(), loadgen_pid):
        if pid is not None:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                out[pid] = t.user + t.system
    return out


def rt_allowed() -> bool:
    """Whether ``chrt -f RT_PRIORITY`` works here (needs CAP_SYS_NICE or an RLIMIT_RTPRIO)."""
    try:
        return subprocess.run(["chrt", "-f", str(RT_PRIORITY), "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def spy_cmd(pid: int, seconds: float, rate: int, out: Path, rt: bool) -> list[str]:
    cmd = [str(PY_SPY), "record", "--pid", str(pid), "--rate", str(rate), "--duration", str(int(math.ceil(seconds))),
           "--format", "raw", "--nonblocking", "--threads", "--full-filenames", "--output", str(out)]
    return (["chrt", "-f", str(RT_PRIORITY)] if rt else []) + cmd


_SPY_SUMMARY = re.compile(r"Samples:\s*(\d+)\s+Errors:\s*(\d+)")


def generation_tokens(s: Scrape | None) -> float | None:
    """Output tokens the decode tier's engines have generated (all engines if no tier label)."""
    if s is None:
        return None
    dec = s.by("vllm:generation_tokens_total", "tier", "all")
    if not dec:
        return None
    return dec.get("decode", sum(dec.values()))


def profile_one(server: harness.Server, model: str, n: int, a: argparse.Namespace, raw_dir: Path,
                log_path: Path, rt: bool, bar: Any) -> dict[str, Any]:
    """One N: load, settle, the window (TreeCpu + py-spy per replica), the load's result."""
    log = bar.write
    prompts = a.prompts.get(n) or prompts_for(n, a.settle, a.seconds)
    load = {"args": load_args(n, prompts)}
    entry: dict[str, Any] = {"streams": n, "prompts": prompts,
                             "vllm_bench_args": [*harness.BENCH_COMMON, *load["args"]], "notes": []}
    marks = LoadMarks()
    result: dict[str, Any] = {}

    def go() -> None:
        try:
            result["load"] = harness.run_load(server.url, model, load, log_path, timeout=900, window=marks)
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = f"{type(e).__name__}: {e}"
        finally:
            marks.ended.set()
            marks.started.set()

    th = threading.Thread(target=go, name=f"load c{n}", daemon=True)
    spies: list[tuple[dict[str, Any], subprocess.Popen, Path, Path]] = []
    try:
        bar.set_description(f"c{n}: load starting")
        th.start()
        marks.started.wait(600)
        if "error" in result or marks.pid is None:
            raise RuntimeError(result.get("error") or "the load generator did not start its run")
        bar.update(1)
        bar.set_description(f"c{n}: settling {a.settle:g} s")
        if marks.ended.wait(a.settle):
            raise RuntimeError(f"the load ended during the settle time: {result.get('error') or 'too few prompts'}")
        bar.update(1)

        targets = find_targets(server, a.deployments)
        missing = [d for d in a.deployments if not any(t["name"] == d for t in targets)]
        if missing:
            entry["notes"].append(f"no replica process found for {missing}")
        if not any(t["name"].startswith("proxy") for t in targets):
            entry["notes"].append("no Serve proxy process (proxy_location: Disabled): not profiled")
        bar.set_description(f"c{n}: profiling {a.seconds:g} s")
        t_b0 = time.monotonic()
        before = Scrape.try_get(server.url)
        t_b1 = time.monotonic()
        tree = harness.TreeCpu(server.proc.pid).start(interval=1.0)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy0, client0 = machine_busy_s(), client_cpu_s(marks.pid)
        for t in targets:
            raw = raw_dir / f"c{n}_{t['name']}.raw"
            out = raw_dir / f"c{n}_{t['name']}.py-spy.txt"
            with open(out, "w") as fh:
                p = subprocess.Popen(spy_cmd(t["pid"], a.seconds, a.rate, raw, rt), stdout=fh,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            spies.append((t, p, raw, out))
        t_w0 = time.monotonic()
        while (el := time.monotonic() - t_w0) < a.seconds and any(p.poll() is None for _, p, _, _ in spies):
            bar.set_postfix_str(f"{el:.0f}/{a.seconds:g} s")
            time.sleep(min(1.0, max(0.05, a.seconds - el)))
        for _, p, _, _ in spies:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
        tree.stop()
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy1, client1 = machine_busy_s(), client_cpu_s(marks.pid)
        labels = labels_of(tree.last)
        t_a0 = time.monotonic()
        after = Scrape.try_get(server.url)
        t_a1 = time.monotonic()
        bar.set_postfix_str("")
        entry["load_ran_through_window"] = not marks.ended.is_set()
        if marks.ended.is_set():
            entry["notes"].append("the load ended inside the profiling window: raise the prompts")
        bar.update(1)

        bar.set_description(f"c{n}: load finishing")
        th.join(900)
        if "error" in result:
            raise RuntimeError(result["error"])
        bar.update(1)
        ld = result["load"]
        entry["load"] = {k: ld.get(k) for k in (
            "duration", "completed", "failed", "total_output_tokens", "output_throughput", "request_throughput",
            "p50_ttft_ms", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p50_tpot_ms", "p99_tpot_ms",
            "mean_itl_ms", "p50_itl_ms", "errors_sample")}

        # The window: CPU per process, tokens, py-spy per replica.
        res = tree.result()
        wall = res["wall_s"]
        spy_s = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        client_s = sum(v - client0[pid] for pid, v in client1.items() if pid in client0)  # both readings only
        g0, g1 = generation_tokens(before), generation_tokens(after)
        tok_s_window = None
        if g0 is not None and g1 is not None and g1 > g0:
            tok_s_window = (g1 - g0) / max(1e-9, (t_a0 + t_a1) / 2 - (t_b0 + t_b1) / 2)
        tok_s = tok_s_window or ld.get("output_throughput")
        tokens = tok_s * wall if tok_s else None
        entry["window"] = {
            "wall_s": wall, "output_tok_s": round(tok_s_window, 1) if tok_s_window else None,
            "output_tok_s_source": "vllm:generation_tokens_total{tier=decode} around the window"
            if tok_s_window else "the load's output_throughput",
            "output_tokens_est": round(tokens) if tokens else None,
            "total_pct": res["total_pct"], "engines_pct": res["engines_pct"], "orch_pct": res["orch_pct"],
            "orch_cpu_s": res["orch_cpu_s"], "engine_cpu_s": res["engine_cpu_s"],
            "orch_cpu_s_per_1k_tok": round(1000 * res["orch_cpu_s"] / tokens, 3) if tokens else None,
            "engine_cpu_s_per_1k_tok": round(1000 * res["engine_cpu_s"] / tokens, 3) if tokens else None,
            "profiler_cpu_s": round(spy_s, 2), "profiler_pct": round(100 * spy_s / wall, 1),
            "client_pct": round(100 * client_s / wall, 1),
            "machine_busy_pct": round(100 * (busy1 - busy0) / wall, 1),
            "others_pct": round(100 * max(0.0, busy1 - busy0 - res["total_cpu_s"] - client_s - spy_s)
                                / wall, 1),
            "processes": per_process(tree, labels),
        }
        cpu_by_pid = {pid: tree.last[pid] - tree.base[pid] for pid in tree.last}
        entry["replicas"] = {}
        for t, p, raw, out in spies:
            text = out.read_text(errors="replace") if out.exists() else ""
            m = _SPY_SUMMARY.search(text)
            rep: dict[str, Any] = {"pid": t["pid"], "title": t["title"], "py_spy_rc": p.returncode,
                                   "py_spy_reported_samples": int(m.group(1)) if m else None,
                                   "py_spy_errors": int(m.group(2)) if m else None}
            cpu_s = cpu_by_pid.get(t["pid"])
            rep["cpu_pct"] = round(100 * cpu_s / wall, 1) if cpu_s is not None else None
            rep["cpu_s_per_1k_tok"] = round(1000 * cpu_s / tokens, 3) if cpu_s is not None and tokens else None
            if raw.exists():
                s = summarize(parse_raw(raw.read_text(errors="replace")))
                for b in s["buckets"].values():
                    b["cpu_pct_est"] = (round(b["busy_pct"] * rep["cpu_pct"] / 100, 1)
                                        if rep["cpu_pct"] is not None else None)
                rep.update(s)
            else:
                rep["error"] = "py-spy wrote no raw file: " + text.strip()[-300:]
            entry["replicas"][t["name"]] = rep
        # CPU-seconds per 1k output tokens by bucket, over the profiled replicas (busy share x CPU).
        per_b: dict[str, float] = {}
        for rep in entry["replicas"].values():
            pid_cpu = cpu_by_pid.get(rep["pid"])
            for b, v in (rep.get("buckets") or {}).items():
                if pid_cpu is not None and tokens:
                    per_b[b] = per_b.get(b, 0.0) + v["busy_pct"] / 100 * pid_cpu * 1000 / tokens
        entry["replicas_cpu_s_per_1k_tok_by_bucket"] = {b: round(v, 3) for b, v in per_b.items()}
        bar.update(1)
        entry["status"] = "ok"
        return entry
    finally:
        bar.set_postfix_str("")
        for _, p, _, _ in spies:  # interrupted: stop py-spy (it writes what it has)
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
                if p.poll() is None:
                    p.kill()
        if th.is_alive() and marks.pid is not None and not marks.ended.is_set():
            # Interrupted or failed while the load still runs: stop the generator we started.
            with contextlib.suppress(psutil.Error):
                psutil.Process(marks.pid).kill()
            th.join(30)


# ------------------------------------------------------------------------------------------------
# Report


def _f(v: Any, nd: int = 1) -> str:
    return "-" if v is None else f"{v:,.{nd}f}"


def table(report: dict[str, Any]) -> str:
    out = []
    cfg = report["config"]
    prio = f"under chrt -f {RT_PRIORITY}" if cfg.get("py_spy_realtime") else "at normal priority"
    out.append(f"profile_path: py-spy {cfg['py_spy_rate_hz']} Hz for {cfg['seconds']:g} s after {cfg['settle_s']:g} s "
               f"of load; py-spy {prio}")
    for key, r in report["runs"].items():
        out.append("")
        if r.get("status") != "ok":
            out.append(f"== {key} streams: {r.get('status')} {r.get('error', '')}")
            continue
        ld, w = r["load"], r["window"]
        out.append(f"== {key} streams: load {_f(ld['output_throughput'], 0)} tok/s (window "
                   f"{_f(w['output_tok_s'], 0)}), TTFT p50 {_f(ld['p50_ttft_ms'])} ms, TPOT mean "
                   f"{_f(ld['mean_tpot_ms'], 2)} ms, failed {ld['failed']}")
        out.append(f"   CPU over {w['wall_s']:.1f} s: total {w['total_pct']}%, engines {w['engines_pct']}%, outside "
                   f"{w['orch_pct']}% = {_f(w['orch_cpu_s_per_1k_tok'], 2)} CPU-s per 1k output tokens "
                   f"(engines {_f(w['engine_cpu_s_per_1k_tok'], 2)})")
        out.append(f"   machine busy {w.get('machine_busy_pct')}%: server {w['total_pct']}%, "
                   f"client {w.get('client_pct')}%, py-spy {w.get('profiler_pct')}%, "
                   f"other processes {w.get('others_pct')}%")
        out.append("   " + ", ".join(f"{p['process']}{' x' + str(p['n']) if p['n'] > 1 else ''} {p['pct']}%"
                                     for p in w["processes"][:10] if p["pct"] >= 0.5))
        for name, rep in r["replicas"].items():
            if "samples" not in rep:
                out.append(f"   {name}: {rep.get('error')}")
                continue
            bk = sorted(((b, v["pct"]) for b, v in rep["buckets"].items() if v["pct"] > 0), key=lambda x: -x[1])
            out.append(f"   {name} (CPU {rep['cpu_pct']}%, {rep['samples']} samples, "
                       f"{rep.get('blocking_leaf_pct')}% with a blocking leaf): "
                       + ", ".join(f"{b} {p}%" for b, p in bk))
            for fr in rep["top_self"][:5]:
                out.append(f"      {fr['pct']:5.1f}%  {fr['frame'][:110]}")
        for note in r.get("notes", []):
            out.append(f"   note: {note}")
    return "\n".join(out)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(k, r) for k, r in report["runs"].items() if r.get("status") == "ok"]
    if not runs:
        return
    fig, axes = plt.subplots(1, 1 + len(runs), figsize=(6 + 6 * len(runs), 6.5),
                             gridspec_kw={"width_ratios": [1.2] + [1.6] * len(runs)})
    ax = axes[0]
    names: list[str] = []
    for _, r in runs:
        for p in r["window"]["processes"]:
            if p["pct"] >= 2 and p["process"] not in names:
                names.append(p["process"])
    cmap = plt.get_cmap("tab20")
    for i, (k, r) in enumerate(runs):
        procs = {p["process"]: p for p in r["window"]["processes"]}
        bottom = 0.0
        for j, nm in enumerate(names + ["other"]):
            v = (procs[nm]["pct"] if nm in procs else 0.0) if nm != "other" else \
                sum(p["pct"] for p in r["window"]["processes"] if p["process"] not in names)
            eng = nm in procs and procs[nm]["engine"]
            ax.bar(i, v, bottom=bottom, color=cmap(j % 20), hatch="//" if eng else None,
                   edgecolor="white", label=nm if i == 0 else None)
            if v >= 6:
                ax.text(i, bottom + v / 2, f"{v:.0f}", ha="center", va="center", fontsize=7)
            bottom += v
        tok = r["window"]["output_tok_s"] or r["load"]["output_throughput"]
        ax.text(i, bottom + 2, f"{bottom:.0f}%\n{tok:.0f} tok/s", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(runs)), [f"N = {k}" for k, _ in runs])
    ax.set_ylabel("% of one core (window)")
    ax.set_title("CPU per process (hatched: engines)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    palette = ["#d62728", "#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
               "#bcbd22", "#393b79", "#aec7e8", "#7f7f7f"]
    bcolors = {b: palette[i % len(palette)] for i, b in enumerate(BUCKET_NAMES)}
    bcolors[OTHER] = "lightgrey"
    for ax, (k, r) in zip(axes[1:], runs):
        reps = [(n, rep) for n, rep in r["replicas"].items() if "buckets" in rep]
        for y, (n, rep) in enumerate(reps):
            left = 0.0
            for b in BUCKET_NAMES:
                v = rep["buckets"][b]["pct"]
                ax.barh(y, v, left=left, color=bcolors[b], edgecolor="white", label=b if y == 0 else None)
                if v >= 5:
                    ax.text(left + v / 2, y, f"{v:.0f}", ha="center", va="center", fontsize=7)
                left += v
        ax.set_yticks(range(len(reps)), [f"{n}\nCPU {rep['cpu_pct']}%" for n, rep in reps])
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("% of the replica's py-spy samples")
        ax.set_title(f"N = {k} streams: where each replica's py-spy samples go")
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    sha = report["git"]["sha"][:10] + ("-dirty" if report["git"]["dirty"] else "")
    fig.suptitle(f"pd_serve request path profile, tiny-llama on {report['machine']['nproc']} CPU cores ({sha})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Main


def app_args(config: Path) -> dict[str, Any] | None:
    """The ``args`` of the first application in a serve config file."""
    import yaml

    with contextlib.suppress(OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return yaml.safe_load(config.read_text())["applications"][0]["args"]
    return None


def checkout_changes() -> list[str]:
    """``git status --porcelain`` of the clone: the files that differ from the commit."""
    try:
        out = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in out.splitlines() if line.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", default=DEFAULT_STREAMS, help=f"comma list of N (default {DEFAULT_STREAMS})")
    p.add_argument("--seconds", type=float, default=20.0, help="profiling window per N (default 20)")
    p.add_argument("--settle", type=float, default=8.0,
                   help="seconds of load before the window opens (default 8)")
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second (default 100)")
    p.add_argument("--deployments", default=DEFAULT_DEPLOYMENTS,
                   help=f"Serve deployments whose replicas are profiled (default {DEFAULT_DEPLOYMENTS}); "
                        "the Serve proxy is added when there is one")
    p.add_argument("--prompts", default="",
                   help="N:prompts overrides, e.g. 1:120,32:400 (default: prompts_for(N))")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny-cpu.yaml")
    p.add_argument("--start-timeout", type=float, default=420)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--raw-dir", type=Path, default=None,
                   help="keep py-spy's raw files (and its output) here; default: a temporary directory")
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="only re-render a saved result (print the summary, redraw the PNG); starts nothing")
    a = p.parse_args(argv)
    try:
        a.streams = [int(s) for s in a.streams.split(",") if s.strip()]
        a.prompts = {int(k): int(v) for k, v in (x.split(":") for x in a.prompts.split(",") if x.strip())}
    except ValueError:
        p.error("--streams takes integers, --prompts N:prompts pairs")
    if not a.streams or min(a.streams) < 1:
        p.error("--streams needs at least one N >= 1")
    a.deployments = [d.strip() for d in a.deployments.split(",") if d.strip()]
    return a


def rerender(path: Path) -> int:
    report = json.loads(path.read_text())
    for run in report.get("runs", {}).values():  # the first result files' name for py-spy's "Samples:" count
        for rep in (run.get("replicas") or {}).values():
            if "py_spy_ticks" in rep:
                rep["py_spy_reported_samples"] = rep.pop("py_spy_ticks")
    report["report_rerendered_utc"] = harness.utc_stamp()
    harness.write_result(report, path, plot)
    print(table(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.report:
        return rerender(a.report)
    if os.environ.get("PD_SERVE_BENCH_SESSION") != "1":
        from benchmarks.serving_bench import run_in_own_session

        return run_in_own_session(sys.argv[1:] if argv is None else argv, module="benchmarks.profile_path")
    from tqdm import tqdm

    from benchmarks.serving_bench import (
        CLIENT_AUTOGROUP_NICE, PD_SERVE_ENV, PORT_PD, SERVERS, bench_config, boost_autogroup,
        pd_serve_launch, start_server, warm_up,
    )
    from pd_serve.tiny_model import TINY_URI, resolve_model

    boosted = boost_autogroup(os.getpid())
    model = resolve_model(TINY_URI)
    stamp = harness.utc_stamp()
    json_path = a.out_dir / f"profile_path_{stamp}.json"
    log_path = a.out_dir / f"profile_path_{stamp}.log"
    a.out_dir.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="pd_serve_profile_")
    config = bench_config(a.config, PORT_PD, Path(tmp.name))
    raw_dir = a.raw_dir or Path(tmp.name) / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    rt = rt_allowed()

    def _sigterm(*_: Any) -> None:  # SIGTERM behaves like Ctrl-C: the finally-blocks clean up
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _sigterm)
    report = harness.envelope("profile_path", stamp, {
        "model": model, "served_model_name": SERVED_NAME,
        "pd_serve_config": f"{harness.rel(a.config)} with its port set to {PORT_PD}",
        "pd_serve_launch": " ".join(pd_serve_launch(a.config)), "pd_serve_env": PD_SERVE_ENV,
        "streams": a.streams, "seconds": a.seconds, "settle_s": a.settle, "py_spy_rate_hz": a.rate,
        "py_spy": f"{harness.rel(PY_SPY)} record --rate {a.rate} --format raw --nonblocking --threads --full-filenames",
        "py_spy_realtime": rt, "deployments": a.deployments,
        "loads": {str(n): {"description": f"closed loop, {n} concurrent streams: random {IN_LEN} in / {OUT_LEN} out, "
                                          f"{a.prompts.get(n) or prompts_for(n, a.settle, a.seconds)} prompts",
                           "vllm_bench_args": [*harness.BENCH_COMMON,
                                               *load_args(n, a.prompts.get(n) or prompts_for(n, a.settle, a.seconds))]}
                  for n in a.streams},
        "warm_up": "4 completions of ~200 words, 8 tokens out (2 streamed) before the first load",
        "buckets": [{"bucket": b, "pass": k, "regex": rx, "holds": d} for b, k, rx, d in BUCKETS],
        "client_autogroup_nice": CLIENT_AUTOGROUP_NICE if boosted else None,
        "loadgen": "vllm bench serve (benchmarks/vllm_bench.py)",
        # What ran: the application's args from the config copy, and what in the checkout
        # differed from the commit (the git sha alone does not say).
        "pd_serve_app_args": app_args(config),
        "checkout_changes": checkout_changes(),
    }, git_paths=None, runs={}, log=harness.rel(log_path))

    bar = tqdm(total=2 + 5 * len(a.streams), desc="profile_path", unit="step", dynamic_ncols=True)
    t_run = time.monotonic()
    interrupted = False
    server = None
    try:
        with harness.engines_to_myself(bar.write, report):
            bar.reset()
            t_run = time.monotonic()
            bar.set_description("pd_serve: starting")
            t0 = time.monotonic()
            server = start_server(SERVERS["pd_serve"], model, config, log_path, a.start_timeout)
            report["start_s"] = round(time.monotonic() - t0, 1)
            bar.update(1)
            bar.set_description("pd_serve: warm-up")
            report["warm_up_s"] = round(warm_up(server.url), 2)
            time.sleep(2)
            bar.update(1)
            for n in a.streams:
                try:
                    entry = profile_one(server, model, n, a, raw_dir, log_path, rt, bar)
                except KeyboardInterrupt:
                    report["runs"][str(n)] = {"streams": n, "status": "interrupted"}
                    raise
                except Exception as e:  # noqa: BLE001 - recorded; the next N still runs
                    entry = {"streams": n, "status": "failed", "error": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc(limit=6).splitlines()[-12:]}
                    bar.write(f"c{n}: FAILED {entry['error']}")
                report["runs"][str(n)] = entry
                if entry.get("status") == "ok":
                    w = entry["window"]
                    bar.write(f"c{n}: {_f(entry['load']['output_throughput'], 0)} tok/s, outside the engines "
                              f"{w['orch_pct']}% = {_f(w['orch_cpu_s_per_1k_tok'], 2)} CPU-s per 1k tokens")
                time.sleep(3)  # the last streams drain before the next load
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if server is not None:
            bar.set_description("pd_serve: stopping")
            try:
                report["stop_notes"] = harness.stop_server(server)
            except KeyboardInterrupt:
                interrupted = True
                report["stop_notes"] = ["interrupted while stopping (stop completed)"]
            report["leftover_processes_at_end"] = harness.describe(harness.leftovers())
        bar.close()
        tmp.cleanup()
        report["runtime_s"] = round(time.monotonic() - t_run, 1)
        if report["runs"]:
            png = harness.write_result(report, json_path, plot)
            print(table(report))
            print(f"\nwrote {harness.rel(json_path)}" + (f" and {png.name}" if png else "")
                  + f" in {report['runtime_s']:.0f} s")
    return 1 if interrupted or any(r.get("status") != "ok" for r in report["runs"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
