"""Prefix-aware routing vs round robin on real engines, side by side in one run.

    .venv/bin/python -m benchmarks.prefix_routing_bench [--quick]

pd_serve with two decode replicas (one per core; prefill at zero replicas, so every prompt is
prefilled on the decode engine it lands on) serves a shared-prefix load from vLLM's own
``bench serve`` (``prefix_repetition``: N distinct prefixes, each followed by a unique suffix).
Each replica's KV cache is capped (``num_gpu_blocks_override``) so that all prefixes fit in the
two caches together but not in one: the prefix-aware router keeps each prefix on one replica,
round robin makes both replicas cache everything and evict. The same load runs once per policy
(``router.policy``), in one process, one after the other; the report gives TTFT p50/p90/p99 and
the ratio, plus the engines' own prefix-cache hit rate (``vllm:prefix_cache_hits_total`` /
``queries``) measured around each run.

Writes ``benchmarks/results/prefix_routing_<UTC>.json`` (git sha, config, machine) and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks import harness
from benchmarks.harness import Scrape, load_app_args, machine_lock, pd_serve_app, run_load
from pd_serve.tiny_model import resolve_model

RESULTS = harness.RESULTS_DIR
PORT = 8200


def app_args(policy: str, blocks: int, model: str) -> dict[str, Any]:
    args = load_app_args(model=model, decode={"replicas": 2, "cpu_cores": [0, 1],
                                 "engine_args": {"num_gpu_blocks_override": blocks}},
                         kv_transfer={"backend": None}, router={"policy": policy})
    args["prefill"] = {"replicas": 0}
    return args


def load(num_prompts: int, rate: float, prefixes: int, prefix_len: int) -> dict[str, Any]:
    return {
        "description": f"{prefixes} prefixes x {prefix_len} tokens + 32 unique, 8 out, "
                       f"{num_prompts} prompts at {rate:g} req/s",
        "args": ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(prefix_len),
                 "--prefix-repetition-suffix-len", "32", "--prefix-repetition-num-prefixes", str(prefixes),
                 "--prefix-repetition-output-len", "8", "--num-prompts", str(num_prompts),
                 "--request-rate", str(rate)],
    }


def cache_hit_rate(before: Scrape, after: Scrape) -> float | None:
    q = after.sum("vllm:prefix_cache_queries_total") - before.sum("vllm:prefix_cache_queries_total")
    h = after.sum("vllm:prefix_cache_hits_total") - before.sum("vllm:prefix_cache_hits_total")
    return None if q <= 0 else h / q


def per_replica(before: Scrape, after: Scrape) -> dict[str, dict[str, float]]:
    """Per decode replica over the load: requests finished, prompt tokens, prompt tokens it
    computed (not prefix-cache hits), and its cache hit rate: how evenly a policy spread the work."""
    def delta(name: str) -> dict[str, float]:
        b = before.by(name, "replica")
        return {r: v - b.get(r, 0.0) for r, v in after.by(name, "replica").items()}

    done, prompt, hits = (delta(n) for n in ("vllm:request_success_total", "vllm:prompt_tokens_total",
                                             "vllm:prefix_cache_hits_total"))
    out = {r: {"requests": done.get(r, 0.0), "prompt_tokens": prompt.get(r, 0.0),
               "computed_tokens": prompt.get(r, 0.0) - hits.get(r, 0.0),
               "hit_rate": hits.get(r, 0.0) / prompt[r] if prompt.get(r) else None}
           for r in sorted(set(done) | set(prompt)) if r}
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pols = list(report["results"])
    stats = ["p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms"]
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.8 / len(pols)
    for i, p in enumerate(pols):
        vals = [report["results"][p].get(s) or 0 for s in stats]
        ax.bar([j + i * w for j in range(len(stats))], vals, w, label=p)
    ax.set_xticks([j + w * (len(pols) - 1) / 2 for j in range(len(stats))], ["TTFT p50", "TTFT p90", "TTFT p99"])
    ax.set_ylabel("ms")
    ax.set_title(f"2 decode replicas, shared-prefix load ({report['git']['sha'][:8]})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer prompts (smoke run)")
    ap.add_argument("--prompts", type=int, default=160)
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--prefixes", type=int, default=12)
    ap.add_argument("--prefix-len", type=int, default=704)
    ap.add_argument("--blocks", type=int, default=200, help="KV blocks (of 32 tokens) per decode engine")
    ap.add_argument("--policies", default="prefix_aware,round_robin")
    ap.add_argument("--model", default="tiny://llama-large",
                    help="tiny://llama-large (default: prefill costs real time on a CPU) or tiny://llama")
    a = ap.parse_args(argv)
    if a.quick:
        a.prompts = 48
    try:
        model = resolve_model(a.model)
    except FileNotFoundError:
        preset = a.model.removeprefix("tiny://")
        subprocess.run([sys.executable, "-m", "pd_serve.tiny_model", "--preset", preset], check=True)
        model = resolve_model(a.model)
    spec = load(a.prompts, a.rate, a.prefixes, a.prefix_len)
    policies = a.policies.split(",")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = harness.utc_stamp()
    log_path = RESULTS / f"prefix_routing_{stamp}.log"
    report = harness.envelope(
        "prefix_routing", stamp,
        {"load": spec, "blocks_per_engine": a.blocks, "block_size": 32, "decode_replicas": 2,
         "policies": policies, "model": a.model, "app_args": {p: app_args(p, a.blocks, a.model) for p in policies}},
        results={})
    with machine_lock(print) as how:
        print(f"machine lock {how}")
        for policy in tqdm(policies, desc="policies", file=sys.stdout):
            with pd_serve_app(app_args(policy, a.blocks, a.model), PORT) as url:
                for i in range(4):  # warm the path (first requests pay imports and allocations)
                    import httpx

                    httpx.post(url + "/v1/completions", json={"model": "tiny-llama", "prompt": f"warm {i}",
                                                              "max_tokens": 2}, timeout=120).raise_for_status()
                before = Scrape.get(url)
                res = run_load(url, model, spec, log_path, timeout=1200)
                time.sleep(1.5)
                after = Scrape.get(url)
                res["engine_prefix_cache_hit_rate"] = cache_hit_rate(before, after)
                res["routing_decisions"] = {
                    r: after.sum("pd_serve_routing_decisions_total", tier="decode", reason=r)
                    - before.sum("pd_serve_routing_decisions_total", tier="decode", reason=r)
                    for r in ("prefix_hit", "load", "single_candidate", "fallback", "no_eligible")}
                res["per_replica"] = per_replica(before, after)
                report["results"][policy] = res
                tqdm.write(f"{policy}: TTFT p50 {res.get('p50_ttft_ms'):.1f} ms, p90 {res.get('p90_ttft_ms'):.1f} ms, "
                           f"p99 {res.get('p99_ttft_ms'):.1f} ms, engine hit rate {res['engine_prefix_cache_hit_rate']}; "
                           "per replica (requests / computed prompt tokens): "
                           + ", ".join(f"{v['requests']:.0f} / {v['computed_tokens']:.0f}"
                                       for v in res["per_replica"].values()))
    r = report["results"]
    if "prefix_aware" in r and "round_robin" in r:
        report["ratios"] = {f"round_robin/prefix_aware {k}": r["round_robin"][k] / r["prefix_aware"][k]
                            for k in ("p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms")
                            if r["prefix_aware"].get(k) and r["round_robin"].get(k)}
        report["target"] = {"TTFT p90 round_robin/prefix_aware >= 3": report["ratios"].get(
            "round_robin/prefix_aware p90_ttft_ms", 0) >= 3}
        print(json.dumps(report["ratios"], indent=1), json.dumps(report["target"]))
    out = RESULTS / f"prefix_routing_{stamp}.json"
    png = harness.write_result(report, out, plot)
    print(f"wrote {harness.rel(out)}" + (f" and {png.name}" if png else ""))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
