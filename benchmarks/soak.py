"""Soak: N closed-loop streams against pd_serve for minutes; errors, throughput and RSS per process.

    .venv/bin/python -m benchmarks.soak                          # 16 streams, 10 minutes, a sample every 30 s
    .venv/bin/python -m benchmarks.soak --streams 4 --minutes 2  # a smoke run
    .venv/bin/python -m benchmarks.soak --report benchmarks/results/soak_<UTC>.json   # re-render only

One pd_serve application as ``configs/tiny-cpu.yaml`` (1 prefill + 1 decode vLLM CPU engine, KV
moved by NIXL, Ray Serve ingress) on a local Ray started by this process (``harness.pd_serve_app``).

**Load.** ``--streams`` clients, each sending its next request as soon as the last one ended
(closed loop), until ``--minutes`` have passed; then the requests in flight finish. Every request
is streamed with ``temperature 0``, ``stream_options.include_usage`` and a token budget
(``max_tokens`` drawn from ``--max-tokens``), so requests keep finishing and new ones keep starting.
The mix (seeded): half completions, half chat; half of the prompts start with one of 4 shared
prefixes (~120 words: a system message for chat) so the prefix cache and the prefix-aware router
see hits; the rest of the prompt is 4–300 random words; 3 requests in 4 set ``ignore_eos``.

**An error** is an HTTP status other than 200, an in-band ``{"error": ...}`` chunk, a stream
without ``data: [DONE]``, a transport error or timeout, or an ``ignore_eos`` request whose usage
says it got fewer tokens than its budget.

**Every ``--sample-s``**: requests done, errors, output tokens/s over the interval (from each
finished request's ``usage.completion_tokens``, counted when it finishes), TTFT and end-to-end
latency p50/max, the engines' gauges from ``/metrics``, and the RSS of every process in the tree
of this process (it starts Ray, so that is GCS, raylet, Ray's agents, Serve controller, proxy,
replicas, idle workers, and the engines below the replicas). Each process is named by its title
(``ray::ServeReplica:pd_serve:Ingress``, ``VLLM::EngineCore [DecodeServer]``: an engine
process gets the deployment of the replica above it), or by its executable or script.

**At the end**: a leak check (within ``--idle-timeout`` s: every engine has no running or waiting
request and KV usage 0, no KV block awaits a pull, no request is in flight), and a verdict per
process: RSS growth from the first sample at or after ``--warmup-s`` to the last sample under load,
flagged above ``--max-growth-pct``. An app process that disappears is flagged too. This script's
own process (the load generator and Ray driver) is listed but is not part of the verdict.

Writes ``benchmarks/results/soak_<UTC>.json`` (harness envelope: git sha, config, machine) and a
PNG (RSS per process, throughput, errors). Exits 1 on any error, a failed leak check, a flagged
process, or an interrupted run. Holds ``/tmp/pd_serve_engines.lock`` while engines run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Ray workers (Serve replicas, engines) inherit the driver's environment: make them import this
# checkout's pd_serve, not whatever an editable install points at.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import httpx  # noqa: E402
import psutil  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.harness import Scrape, engines_to_myself, load_app_args, pd_serve_app  # noqa: E402

PORT = 8400
SERVED = harness.SERVED_NAME
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
ENGINES = 2  # configs/tiny-cpu.yaml: one prefill and one decode engine
# Gauges that must all read 0 once the engines are idle (tests/integration/conftest.py wait_idle).
IDLE_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
               "pd_serve_kv_blocks_awaiting_pull", "pd_serve_requests_in_flight")
# Counters whose change over the run goes into the result (by label set).
COUNTER_PREFIXES = ("pd_serve_", "vllm:prefix_cache_", "vllm:nixl_", "vllm:request_success")
SELF_LABEL = "driver (this script: load generator, Ray driver)"
_WORDS = ("the a an of to in on for with and or but not is are was were be been cache block token "
          "prefill decode engine model request server replica transfer memory layer head router "
          "prefix hash event stream batch queue latency scale node cluster cpu kv value key "
          "attention sequence prompt answer question user system assistant hello world data time "
          "fast slow small large first last next each every some many few one two three").split()


# ------------------------------------------------------------------------------------------------
# The request mix


@dataclass
class Mix:
    """Seeded request bodies: completions or chat, shared prefix or not, varied lengths and budgets."""
    seed: int
    budgets: tuple[int, ...]
    prefixes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self.prefixes = [f"shared prefix {i}: " + self.words(rng, 120) for i in range(4)]

    @staticmethod
    def words(rng: random.Random, n: int) -> str:
        return " ".join(rng.choice(_WORDS) for _ in range(n))

    def body(self, rng: random.Random) -> tuple[str, dict[str, Any]]:
        """(kind, JSON body); kind is ``<api>/<shared|unique>``."""
        chat = rng.random() < 0.5
        prefix = rng.choice(self.prefixes) if rng.random() < 0.5 else None
        text = self.words(rng, rng.choice((4, 16, 48, 120, 300)) + rng.randint(0, 8))
        common: dict[str, Any] = {"model": SERVED, "temperature": 0, "max_tokens": rng.choice(self.budgets),
                                  "ignore_eos": rng.random() < 0.75, "stream": True,
                                  "stream_options": {"include_usage": True}}
        if chat:
            msgs = ([{"role": "system", "content": prefix}] if prefix else []) + [{"role": "user", "content": text}]
            body = {**common, "messages": msgs}
        else:
            body = {**common, "prompt": f"{prefix} {text}" if prefix else text}
        return f"{'chat' if chat else 'completions'}/{'shared' if prefix else 'unique'}", body


# ------------------------------------------------------------------------------------------------
# One streamed request


@dataclass
class Outcome:
    kind: str
    t_end: float
    ok: bool
    error: str | None = None
    status: int | None = None
    ttft_s: float | None = None
    e2e_s: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int = 0


async def sse_lines(resp: httpx.Response) -> Any:
    """The lines of an SSE stream, split at SSE's line ends only (``\\n``, ``\\r\\n``).

    Not ``resp.aiter_lines()``: httpx splits like ``str.splitlines``, also at U+0085, U+2028,
    U+2029 and \\x1c-\\x1e, which JSON leaves unescaped in a chunk's text (a random-weight model
    emits them), and the chunk then reads as truncated.
    """
    buf = ""
    async for text in resp.aiter_text():
        buf += text
        *lines, buf = buf.split("\n")
        for line in lines:
            yield line.removesuffix("\r")
    if buf:
        yield buf.removesuffix("\r")


async def one_request(client: httpx.AsyncClient, url: str, kind: str, body: dict[str, Any]) -> Outcome:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    t0 = time.monotonic()
    ttft = usage = None
    done = False
    error: str | None = None
    status: int | None = None
    try:
        async with client.stream("POST", url + path, json=body) as resp:
            status = resp.status_code
            if status != 200:
                text = (await resp.aread()).decode(errors="replace")
                error = f"http {status}: {text[:300]}"
            else:
                async for line in sse_lines(resp):
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    try:
                        msg = json.loads(data)
                    except json.JSONDecodeError as e:
                        error = f"bad chunk ({e}): {data[:300]!r}"
                        continue
                    if "error" in msg:
                        error = f"in-band error: {json.dumps(msg)[:300]}"
                        continue  # keep reading: [DONE] should still come
                    if msg.get("choices") and ttft is None:
                        ttft = time.monotonic() - t0
                    if msg.get("usage"):
                        usage = msg["usage"]
                if error is None and not done:
                    error = "stream ended without [DONE]"
    except Exception as e:  # noqa: BLE001 - whatever breaks a request is that request's error
        error = f"{type(e).__name__}: {str(e)[:200]}"
    t1 = time.monotonic()
    out = Outcome(kind, t1, error is None, error, status, ttft, t1 - t0)
    if usage:
        out.prompt_tokens = usage.get("prompt_tokens")
        out.completion_tokens = int(usage.get("completion_tokens") or 0)
    if out.ok and usage is None:
        out.ok, out.error = False, "no usage chunk (include_usage was set)"
    elif out.ok and body["ignore_eos"] and out.completion_tokens != body["max_tokens"]:
        out.ok, out.error = False, f"ignore_eos: {out.completion_tokens} tokens, budget {body['max_tokens']}"
    return out


# ------------------------------------------------------------------------------------------------
# Processes of the app and their RSS


def _title(p: psutil.Process) -> str:
    """A process's name: its title (Ray and vLLM set one), else its executable or script."""
    cmd = p.cmdline()
    first = cmd[0] if cmd else ""
    if first.startswith(("ray::", "VLLM::")):
        title = " ".join(cmd).split()[0]  # Ray pads its titles with spaces
        # While a Ray actor runs a task its title is ray::Actor.method (or .method()): keep the actor.
        return re.sub(r"\.\w+(\(\))?$", "", title)
    for i, a in enumerate(cmd[1:], 1):
        if a in ("-m", "-c") and i + 1 < len(cmd):  # -c: e.g. multiprocessing's resource tracker
            return f"python {a} {cmd[i + 1][:48]}"
        if a.endswith(".py"):
            return f"python {'/'.join(Path(a).parts[-2:])}"
    return p.name()


def rss_parts(pid: int) -> list[int] | None:
    """[RssAnon, RssFile, RssShmem] in bytes from /proc/PID/status (Linux), or None.

    Says what grew: the heap (anon), mapped files (file) or shared memory such as a transfer
    buffer in /dev/shm (shmem)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if line.startswith("Rss"))
        return [int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile", "RssShmem")]
    except (OSError, KeyError, ValueError):
        return None


class ProcessTree:
    """The processes below ``root_pid``, named once when first seen, with their RSS per sample."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self.procs: dict[int, dict[str, Any]] = {}  # pid -> {label, title, first_t, last_t}
        self.parts: dict[int, list[int] | None] = {}  # pid -> [anon, file, shmem] bytes, last sample

    def _label(self, p: psutil.Process, title: str, titles: dict[int, str]) -> str:
        if p.pid == self.root_pid:
            return SELF_LABEL
        if title.startswith("VLLM::"):  # name the tier: the Serve replica above the engine
            with contextlib.suppress(psutil.Error):
                for a in p.parents():
                    t = titles.get(a.pid, "")
                    if t.startswith("ray::ServeReplica:"):
                        return f"{title} [{t.rsplit(':', 1)[-1]}]"
        return title

    def sample(self, t: float) -> dict[int, int]:
        """RSS in bytes of every live process in the tree, by pid; its parts go to ``self.parts``."""
        rss: dict[int, int] = {}
        self.parts = {}
        titles: dict[int, str] = {}
        try:
            tree = [psutil.Process(self.root_pid), *psutil.Process(self.root_pid).children(recursive=True)]
        except psutil.Error:
            return rss
        for p in tree:  # parents come before their children
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                title = _title(p)
                titles[p.pid] = title
                rss[p.pid] = p.memory_info().rss
                self.parts[p.pid] = rss_parts(p.pid)
                info = self.procs.get(p.pid)
                if info is None or info["title"] != title:  # new, or a Ray worker that became an actor
                    self.procs[p.pid] = info = {"label": self._label(p, title, titles), "title": title,
                                                "first_t": t, **({"renamed_from": info["label"]} if info else {})}
                info["last_t"] = t
            except psutil.Error:
                continue
        return rss

    def names(self) -> dict[str, str]:
        """pid (as a string) -> a unique display name (label, plus ``#pid`` where labels repeat)."""
        count: dict[str, int] = {}
        for info in self.procs.values():
            count[info["label"]] = count.get(info["label"], 0) + 1
        return {str(pid): info["label"] + (f" #{pid}" if count[info["label"]] > 1 else "")
                for pid, info in self.procs.items()}


# ------------------------------------------------------------------------------------------------
# Metrics


def gauges(s: Scrape) -> dict[str, Any]:
    return {g: s.values(g) for g in IDLE_GAUGES}


def counters(s: Scrape) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, labels, v in s.samples:
        if name.endswith("_total") and name.startswith(COUNTER_PREFIXES):
            lab = ",".join(f"{k}={labels[k]}" for k in sorted(labels) if k not in ("replica", "engine",
                                                                                    "model_name", "pid"))
            key = f"{name}{{{lab}}}" if lab else name
            out[key] = out.get(key, 0.0) + v
    return out


async def wait_idle(url: str, timeout: float) -> dict[str, Any]:
    """Poll until the engines are idle (every IDLE_GAUGES sample 0, both engines reporting)."""
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    last: dict[str, Any] = {}
    while True:
        try:
            s = await asyncio.to_thread(Scrape.get, url)
            last = gauges(s)
            busy = sum(sum(v) for v in last.values())
            if busy == 0 and len(last["vllm:kv_cache_usage_perc"]) >= ENGINES:
                return {"idle": True, "after_s": round(time.monotonic() - t0, 1), "gauges": last}
        except (httpx.HTTPError, ValueError) as e:
            last = {"scrape_error": f"{type(e).__name__}: {e}"}
        if time.monotonic() > deadline:
            return {"idle": False, "after_s": round(time.monotonic() - t0, 1), "gauges": last}
        await asyncio.sleep(0.5)


# ------------------------------------------------------------------------------------------------
# The soak


def _p(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)


class Soak:
    def __init__(self, a: argparse.Namespace, url: str, report: dict[str, Any], log: Any) -> None:
        self.a, self.url, self.report, self.log = a, url, report, log
        self.mix = Mix(a.seed, tuple(a.max_tokens))
        self.tree = ProcessTree(os.getpid())
        self.pending: list[Outcome] = []  # finished since the last sample
        self.kinds: dict[str, dict[str, int]] = {}
        self.errors_sample: list[dict[str, Any]] = []
        self.prompt_tokens: list[int] = []
        self.totals = {"requests": 0, "errors": 0, "output_tokens": 0}
        self.stop_at = 0.0

    async def stream_loop(self, client: httpx.AsyncClient, i: int) -> None:
        rng = random.Random(self.a.seed * 1000 + i)
        while time.monotonic() < self.stop_at:
            kind, body = self.mix.body(rng)
            o = await one_request(client, self.url, kind, body)
            self.pending.append(o)
            k = self.kinds.setdefault(kind, {"requests": 0, "errors": 0})
            k["requests"] += 1
            if o.prompt_tokens:
                self.prompt_tokens.append(o.prompt_tokens)
            if not o.ok:
                k["errors"] += 1
                if len(self.errors_sample) < 20:
                    self.errors_sample.append({"t_s": round(o.t_end - self.t0, 1), "kind": kind,
                                               "status": o.status, "error": o.error})
                if len(self.errors_sample) <= 5:
                    self.log(f"error ({kind}): {o.error}")

    async def take_sample(self, t_prev: float) -> tuple[dict[str, Any], float]:
        """Record the interval since ``t_prev``; returns the sample and its time."""
        now = time.monotonic()
        done, self.pending = self.pending, []
        ok = [o for o in done if o.ok]
        toks = sum(o.completion_tokens for o in done)
        self.totals["requests"] += len(done)
        self.totals["errors"] += len(done) - len(ok)
        self.totals["output_tokens"] += toks
        rss = await asyncio.to_thread(self.tree.sample, round(now - self.t0, 1))
        try:
            g = gauges(await asyncio.to_thread(Scrape.get, self.url))
        except (httpx.HTTPError, ValueError) as e:
            g = {"scrape_error": f"{type(e).__name__}: {e}"}
        ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
        e2es = [o.e2e_s for o in ok]
        s = {"t_s": round(now - self.t0, 1), "interval_s": round(now - t_prev, 2), "requests": len(done),
             "errors": len(done) - len(ok), "output_tokens": toks,
             "output_tok_s": round(toks / max(now - t_prev, 1e-9), 1),
             "requests_total": self.totals["requests"], "errors_total": self.totals["errors"],
             "ttft_p50_s": _p(ttfts, 0.5), "ttft_max_s": _p(ttfts, 1.0),
             "e2e_p50_s": _p(e2es, 0.5), "e2e_max_s": _p(e2es, 1.0),
             "gauges": g, "rss_bytes": {str(pid): v for pid, v in rss.items()},
             "rss_parts": {str(pid): v for pid, v in self.tree.parts.items() if v is not None}}
        self.report["samples"].append(s)
        self.log(progress_line(s, self.tree))
        return s, now

    async def run(self) -> None:
        a = self.a
        limits = httpx.Limits(max_connections=a.streams + 4, max_keepalive_connections=a.streams + 4)
        async with httpx.AsyncClient(timeout=httpx.Timeout(a.request_timeout), limits=limits) as client:
            before = counters(await asyncio.to_thread(Scrape.get, self.url))
            self.t0 = time.monotonic()
            self.stop_at = self.t0 + 60 * a.minutes
            await self.take_sample(self.t0)  # t = 0: the idle app, before any load
            tasks = [asyncio.create_task(self.stream_loop(client, i)) for i in range(a.streams)]
            t_prev = self.t0
            k = 1
            try:
                while True:
                    next_t = min(self.t0 + k * a.sample_s, self.stop_at)
                    await asyncio.sleep(max(0.0, next_t - time.monotonic()))
                    _, t_prev = await self.take_sample(t_prev)
                    k += 1
                    if t_prev >= self.stop_at:
                        break
                # The load has ended: let the requests in flight finish (they belong to the run).
                drain_t0 = time.monotonic()
                await asyncio.wait_for(asyncio.gather(*tasks), timeout=a.request_timeout + 30)
                self.report["drain_s"] = round(time.monotonic() - drain_t0, 1)
                if self.pending:
                    last, _ = await self.take_sample(t_prev)
                    last["drain"] = True  # after the deadline: not a full interval, not in the verdict
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            self.report["load_s"] = round(time.monotonic() - self.t0, 1)
            self.report["idle_check"] = idle = await wait_idle(self.url, a.idle_timeout)
            self.log(f"leak check: {'idle' if idle['idle'] else 'NOT IDLE'} after {idle['after_s']} s: "
                     f"{idle['gauges']}")
            rss_idle = await asyncio.to_thread(self.tree.sample, round(time.monotonic() - self.t0, 1))
            self.report["rss_after_idle_bytes"] = {str(pid): v for pid, v in rss_idle.items()}
            after = counters(await asyncio.to_thread(Scrape.get, self.url))
            self.report["counters_delta"] = {key: round(v - before.get(key, 0.0), 3) for key, v in sorted(after.items())
                                             if v - before.get(key, 0.0)}
        self.report["totals"] = self.totals
        self.report["by_kind"] = self.kinds
        self.report["errors_sample"] = self.errors_sample
        self.report["prompt_tokens"] = ({"min": min(self.prompt_tokens), "max": max(self.prompt_tokens),
                                         "mean": round(statistics.fmean(self.prompt_tokens), 1)}
                                        if self.prompt_tokens else None)
        self.report["processes"] = {str(pid): info for pid, info in self.tree.procs.items()}
        self.report["names"] = self.tree.names()


def progress_line(s: dict[str, Any], tree: ProcessTree) -> str:
    names = tree.names()
    rss = s["rss_bytes"]
    short = []
    for pid, v in sorted(rss.items(), key=lambda kv: -kv[1])[:6]:
        n = names.get(pid, pid).replace("ray::ServeReplica:pd_serve:", "").replace("VLLM::", "")
        short.append(f"{n} {v / 2**20:.0f}")
    total = sum(rss.values()) / 2**20
    return (f"t={s['t_s']:6.0f}s  done {s['requests_total']:5d} (+{s['requests']:3d})  "
            f"err {s['errors_total']} (+{s['errors']})  {s['output_tok_s']:6.1f} tok/s  "
            f"e2e p50 {s['e2e_p50_s'] or 0:.2f}s  RSS MiB total {total:.0f}: " + ", ".join(short))


# ------------------------------------------------------------------------------------------------
# Verdict, table, plot


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """RSS growth per process from the first sample at or after the warm-up to the last under load."""
    cfg = report["config"]
    samples = [s for s in report["samples"] if not s.get("drain")]
    names = report.get("names", {})
    out: dict[str, Any] = {"warmup_s": cfg["warmup_s"], "max_growth_pct": cfg["max_growth_pct"],
                           "processes": [], "flagged": [], "gone": []}
    after = [s for s in samples if s["t_s"] >= cfg["warmup_s"]]
    if len(after) < 2:
        out["error"] = f"fewer than 2 samples after the {cfg['warmup_s']} s warm-up: no growth verdict"
        return out
    first, last = after[0], after[-1]
    out["from_t_s"], out["to_t_s"] = first["t_s"], last["t_s"]
    for pid in sorted(set(first["rss_bytes"]) | set(last["rss_bytes"]), key=lambda p: names.get(p, p)):
        name = names.get(pid, pid)
        r0, r1 = first["rss_bytes"].get(pid), last["rss_bytes"].get(pid)
        row: dict[str, Any] = {"pid": int(pid), "process": name, "rss_first_mib": _mib(r0),
                               "rss_last_mib": _mib(r1), "in_verdict": name != SELF_LABEL}
        series = [s["rss_bytes"][pid] for s in after if pid in s["rss_bytes"]]
        row["rss_max_mib"] = _mib(max(series)) if series else None
        p0, p1 = first.get("rss_parts", {}).get(pid), last.get("rss_parts", {}).get(pid)
        if p0 and p1:  # which part grew: anon (heap), file, shmem
            row["growth_mib"] = {k: _mib(b - a) for k, a, b in zip(("anon", "file", "shmem"), p0, p1)}
        mid = next((s for s in after if s["t_s"] >= (first["t_s"] + last["t_s"]) / 2), None)
        rm = mid["rss_bytes"].get(pid) if mid else None
        if rm is not None and r1 is not None:
            # A leak grows at a steady rate (about half its growth in each half of the window); a
            # cache filling up to a bound slows down (see benchmarks/onednn_cache_rss.py).
            row["growth_second_half_pct"] = round(100 * (r1 - rm) / rm, 2)
        if r0 is not None and r1 is not None:
            row["growth_pct"] = round(100 * (r1 - r0) / r0, 2)
            row["flag"] = row["growth_pct"] > cfg["max_growth_pct"]
        elif r0 is not None:
            row["flag"], row["note"] = True, "gone before the last sample"
            if not name.startswith("ray::IDLE"):
                out["gone"].append(name)
            else:
                row["flag"] = False
        else:
            row["flag"], row["note"] = False, "started after the first sample"
        if row["flag"] and row["in_verdict"]:
            out["flagged"].append(name)
        out["processes"].append(row)
    return out


def _mib(b: int | None) -> float | None:
    return None if b is None else round(b / 2**20, 1)


def table(report: dict[str, Any]) -> str:
    v = report.get("verdict") or {}
    tot = report.get("totals") or {}
    rates = [s["output_tok_s"] for s in report["samples"][1:] if not s.get("drain")]
    lines = [f"soak: {report['config']['streams']} streams, {report['config']['minutes']} min "
             f"(load {report.get('load_s')} s): {tot.get('requests')} requests, {tot.get('errors')} errors, "
             f"{tot.get('output_tokens')} output tokens"]
    if rates:
        lines.append(f"output tok/s per {report['config']['sample_s']} s interval: mean {statistics.fmean(rates):.1f}, "
                     f"min {min(rates):.1f}, max {max(rates):.1f}")
    idle = report.get("idle_check")
    if idle:
        lines.append(f"leak check: {'PASS (idle after ' + str(idle['after_s']) + ' s)' if idle['idle'] else 'FAIL'}: "
                     f"{idle['gauges']}")
    if v.get("error"):
        lines.append("RSS verdict: " + v["error"])
    elif v:
        lines.append(f"RSS from t={v['from_t_s']} s to t={v['to_t_s']} s (flag > {v['max_growth_pct']} %):")
        lines.append(f"  {'process':<58} {'pid':>7} {'first MiB':>10} {'last MiB':>9} {'max MiB':>8} {'growth':>8}")
        for r in v["processes"]:
            g = f"{r['growth_pct']:+.1f}%" if "growth_pct" in r else r.get("note", "")
            mark = " FLAG" if r["flag"] and r["in_verdict"] else (" (not judged)" if not r["in_verdict"] else "")
            lines.append(f"  {r['process'][:58]:<58} {r['pid']:>7} {r['rss_first_mib'] or '-':>10} "
                         f"{r['rss_last_mib'] or '-':>9} {r['rss_max_mib'] or '-':>8} {g:>8}{mark}"
                         + (" (MiB anon {anon:+}, file {file:+}, shmem {shmem:+})".format(**r["growth_mib"])
                            if r.get("flag") and r.get("growth_mib") else "")
                         + (f"; second half {r['growth_second_half_pct']:+.1f}%"
                            if r.get("flag") and "growth_second_half_pct" in r else ""))
    for reason in report.get("failures", []):
        lines.append("FAIL: " + reason)
    return "\n".join(lines)


def plot(report: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = report["config"]
    samples = [s for s in report["samples"] if not s.get("drain")]
    names = report.get("names", {})
    t = [s["t_s"] / 60 for s in samples]
    fig, (ax1, ax2, ax3, ax4) = plt.subplots(4, 1, figsize=(12, 13), sharex=True,
                                             gridspec_kw={"height_ratios": [3, 2, 1.2, 1]})
    pids = {pid for s in samples for pid in s["rss_bytes"]}
    peak = {pid: max(s["rss_bytes"].get(pid, 0) for s in samples) for pid in pids}
    shown = [p for p in sorted(pids, key=lambda p: -peak[p]) if peak[p] >= 20 * 2**20]  # the rest: JSON
    colors = plt.get_cmap("tab20").colors
    base = next((s for s in samples if s["t_s"] >= cfg["warmup_s"]), None)
    for i, pid in enumerate(shown):
        c, ls = colors[i % 20], "-" if i < 20 else "--"
        ys = [s["rss_bytes"].get(pid, float("nan")) / 2**20 for s in samples]
        ax1.plot(t, ys, marker=".", color=c, ls=ls, label=names.get(pid, pid)[:60])
        if base is not None and pid in base["rss_bytes"]:
            r0 = base["rss_bytes"][pid]
            ax2.plot(t, [100 * (s["rss_bytes"][pid] - r0) / r0 if pid in s["rss_bytes"] else float("nan")
                         for s in samples], marker=".", color=c, ls=ls)
    for ax in (ax1, ax2):
        ax.axvline(cfg["warmup_s"] / 60, color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3)
    ax1.set_ylabel("RSS (MiB)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax1.set_title(f"pd_serve soak: {cfg['streams']} streams, {cfg['minutes']} min, configs/tiny-cpu.yaml "
                  f"({report['git']['sha'][:8]}); processes >= 20 MiB")
    ax2.axhline(cfg["max_growth_pct"], color="tab:red", ls="--", lw=1)
    ax2.set_ylabel(f"RSS change (%)\nvs t={base['t_s'] if base else '?'} s")
    ax3.plot(t[1:], [s["output_tok_s"] for s in samples[1:]], marker="o")
    ax3.set_ylabel("output tok/s\n(per interval)")
    ax3.set_ylim(bottom=0)
    ax3.grid(alpha=0.3)
    ax4.bar(t[1:], [s["errors"] for s in samples[1:]], width=0.6 * cfg["sample_s"] / 60, color="tab:red")
    ax4b = ax4.twinx()
    ax4b.plot(t[1:], [s["requests"] for s in samples[1:]], marker=".", color="tab:green")
    ax4.set_ylabel("errors (red)")
    ax4b.set_ylabel("requests done\n(green)")
    ax4.set_xlabel("minutes since the load started")
    ax4.set_ylim(bottom=0, top=max(1, *[s["errors"] for s in samples]))
    ax4b.set_ylim(bottom=0)
    ax4.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=16, help="concurrent closed-loop streams (default 16)")
    p.add_argument("--minutes", type=float, default=10, help="how long new requests are sent (default 10)")
    p.add_argument("--sample-s", type=float, default=30, help="seconds between samples (default 30)")
    p.add_argument("--warmup-s", type=float, default=60,
                   help="RSS growth is measured from the first sample at or after this (default 60)")
    p.add_argument("--max-growth-pct", type=float, default=10, help="flag RSS growth above this (default 10)")
    p.add_argument("--max-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 64, 128],
                   help="token budgets to draw from (default 16,32,64,128)")
    p.add_argument("--request-timeout", type=float, default=300, help="per-request timeout in s (default 300)")
    p.add_argument("--idle-timeout", type=float, default=30, help="leak check: seconds to become idle (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=PORT)
    p.add_argument("--out-dir", type=Path, default=harness.RESULTS_DIR)
    p.add_argument("--report", type=Path, metavar="JSON", help="only re-render a saved result; starts nothing")
    return p.parse_args(argv)


def judge(report: dict[str, Any]) -> list[str]:
    out = []
    tot = report.get("totals")
    if not tot:
        out.append("no load ran")
    elif tot["errors"]:
        out.append(f"{tot['errors']} of {tot['requests']} requests failed")
    idle = report.get("idle_check")
    if idle is not None and not idle["idle"]:
        out.append("leak check: engines not idle after the load")
    v = report.get("verdict") or {}
    if v.get("error"):
        out.append(v["error"])
    if v.get("flagged"):
        out.append(f"RSS grew > {v['max_growth_pct']} % (or the process went away): {v['flagged']}")
    out += [n for n in report["notes"] if n == "interrupted" or n.startswith("failed:")]
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.report:
        report = json.loads(a.report.read_text())
        plot(report, a.report.with_suffix(".png"))
        print(table(report))
        return 0
    from pd_serve.tiny_model import resolve_model

    args = load_app_args(CONFIG)
    resolve_model(args["model"])  # fails early, with the command to build it
    stamp = harness.utc_stamp()
    json_path = a.out_dir / f"soak_{stamp}.json"

    def _sigterm(*_: Any) -> None:  # SIGTERM behaves like Ctrl-C: the finally-blocks stop the app
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _sigterm)
    report = harness.envelope("soak", stamp, {
        "app_config": harness.rel(CONFIG), "app_args": args, "streams": a.streams, "minutes": a.minutes,
        "sample_s": a.sample_s, "warmup_s": a.warmup_s, "max_growth_pct": a.max_growth_pct,
        "max_tokens": a.max_tokens, "request_timeout_s": a.request_timeout, "idle_timeout_s": a.idle_timeout,
        "seed": a.seed,
        "client": "httpx async, closed loop; streamed /v1/completions and /v1/chat/completions, temperature 0, "
                  "include_usage; tokens/s from usage.completion_tokens of the requests finished in the interval",
    }, git_paths=["benchmarks/soak.py", "pd_serve"], samples=[], notes=[])
    t_run = time.monotonic()
    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    try:
        with engines_to_myself(log, report):
            t0 = time.monotonic()
            try:
                with pd_serve_app(args, a.port, name="pd_serve", timeout=600) as url:
                    report["start_s"] = round(time.monotonic() - t0, 1)
                    log(f"pd_serve up in {report['start_s']} s at {url}; {a.streams} streams for {a.minutes} min, "
                        f"a sample every {a.sample_s:.0f} s")
                    asyncio.run(Soak(a, url, report, log).run())
            finally:
                report["leftovers_after_stop"] = harness.clean_up_leftovers(log, mine=set())
    except KeyboardInterrupt:
        report["notes"].append("interrupted")
        log("interrupted")
    except Exception as e:  # noqa: BLE001 - still write what was measured, and fail
        report["notes"].append(f"failed: {type(e).__name__}: {e}")
        log(f"failed: {type(e).__name__}: {e}")
    finally:
        report["wall_s"] = round(time.monotonic() - t_run, 1)
        if report["samples"]:
            report["verdict"] = verdict(report)
        report["failures"] = judge(report)
        png = harness.write_result(report, json_path, plot if report["samples"] else None)
    print(table(report))
    print(f"wrote {harness.rel(json_path)}" + (f" and {png.name}" if png else "") + f" ({report['wall_s']} s)")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
