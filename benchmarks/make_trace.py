#!/usr/bin/env python
"""Generate a Mooncake-format trace (``timestamp`` ms, ``input_length``, ``output_length``,
``hash_ids`` of 512-token blocks) with chosen statistics, to replay with
``benchmarks/routing_bench.py --scenario replay --trace FILE``.

The shipped trace (benchmarks/results/routing_traces/mooncake_synthetic.jsonl.gz, 3,993 requests) is multi-turn conversations with long
prompts, no hot shared prefix and a light load. A router tuned on it can hide what other
workloads do to it, so this makes workloads that differ on purpose:

* ``--preset chat_hot``: chat with a few *hot* system prompts (Zipf popularity), several turns
  per conversation, short user messages, a high request rate. Prefix affinity alone piles the hot
  prefixes onto a few engines.
* ``--preset docs_bursty``: questions over shared documents (long prefixes, Zipf popularity,
  mostly one turn), arriving in bursts (on/off: a Markov-modulated Poisson process).
* ``--preset agents_hot``: a few very hot, long system prompts (4 prompts of 8k-16k tokens, flat
  popularity) behind half of the conversations, the other half with no shared prefix at all;
  long multi-turn conversations (6 turns on average) whose context grows with every answer.
  Each hot prompt alone is worth more than one engine's queue, and the unique conversations fill
  the caches with blocks only their own next turn reuses.

Every knob of a preset can be overridden (``--requests``, ``--zipf``, ...). The output is
deterministic for a given seed. Semantics follow the Mooncake release: equal ids at the same
position mean an equal block of tokens *and everything before it*; a prompt's ids cover
``ceil(input_length / 512)`` blocks, the last one possibly partial (a partial block never
matches). Turn k's prompt is turn k-1's prompt, its answer and a new user message, so it keeps
the ids of turn k-1's full blocks. A ``.gz`` output is gzipped (routing_bench reads both).

The two traces the routing figures in docs/scheduler.md use were made with the default seed and
are committed under benchmarks/results/routing_traces/.

    .venv/bin/python benchmarks/make_trace.py --preset chat_hot --out benchmarks/results/routing_traces/chat_hot.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import heapq
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

BLOCK = 512

PRESETS: dict[str, dict[str, Any]] = {
    "chat_hot": dict(
        requests=12000,
        prefixes=30,
        zipf=1.2,
        prefix_tokens=(1000, 6000),  # uniform range of the shared system prompt
        mean_turns=3.0,
        user_median=400,
        user_sigma=1.0,
        output_median=250,
        output_sigma=0.8,
        think_s=30.0,
        request_rate=25.0,
        burst=None,
    ),
    "docs_bursty": dict(
        requests=6000,
        prefixes=200,
        zipf=0.9,
        prefix_tokens=(2000, 32000),  # log-uniform: a few long documents
        mean_turns=1.4,
        user_median=120,
        user_sigma=0.7,
        output_median=100,
        output_sigma=0.8,
        think_s=20.0,
        request_rate=10.0,
        burst=(4.0, 20.0, 60.0),  # on-period rate multiplier, mean on seconds, mean off seconds
    ),
    "agents_hot": dict(
        requests=8000,
        prefixes=4,
        zipf=0.3,
        prefix_tokens=(8000, 16000),
        unique_frac=0.5,  # conversations that share no prefix with any other
        mean_turns=6.0,
        user_median=300,
        user_sigma=1.0,
        output_median=300,
        output_sigma=0.7,
        think_s=15.0,
        request_rate=12.0,
        burst=None,
    ),
}


def _lognormal(rng: np.random.Generator, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(np.clip(rng.lognormal(np.log(median), sigma), lo, hi))


def _arrivals(rng: np.random.Generator, rate: float, n: int, burst: tuple[float, float, float] | None) -> list[float]:
    """Start times of ``n`` conversations: Poisson at ``rate``, or on/off modulated so the long-run
    mean stays ``rate`` (on: ``rate * mult_on``, off: the rest)."""
    if burst is None:
        return list(np.cumsum(rng.exponential(1.0 / rate, size=n)))
    mult, on_s, off_s = burst
    on_rate = rate * mult
    off_rate = max(1e-3, (rate * (on_s + off_s) - on_rate * on_s) / off_s)
    out: list[float] = []
    t, on = 0.0, True
    while len(out) < n:
        period = rng.exponential(on_s if on else off_s)
        r = on_rate if on else off_rate
        k = rng.poisson(r * period)
        out.extend(sorted(t + rng.uniform(0, period, size=k)))
        t += period
        on = not on
    return out[:n]


def generate(p: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    next_id = 0

    def new_ids(k: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + k))
        next_id += k
        return ids

    lo, hi = p["prefix_tokens"]
    if p["burst"] is None:
        prefix_len = rng.integers(lo, hi + 1, size=p["prefixes"])
    else:
        prefix_len = np.exp(rng.uniform(np.log(lo), np.log(hi), size=p["prefixes"])).astype(int)
    prefix_ids = [new_ids(int(n) // BLOCK) for n in prefix_len]
    weights = 1.0 / np.arange(1, p["prefixes"] + 1) ** p["zipf"]
    weights /= weights.sum()
    mean_turns = p["mean_turns"]
    # conversations start at rate / mean_turns, so requests arrive at about `request_rate`
    starts = _arrivals(rng, p["request_rate"] / mean_turns, p["requests"], p["burst"])
    heap: list[tuple[float, int, int]] = []  # (time, conversation, turn)
    convs: list[dict[str, Any]] = []
    unique_frac = p.get("unique_frac", 0.0)
    for c, t in enumerate(starts):
        s = int(rng.choice(p["prefixes"], p=weights))
        turns = int(rng.geometric(1.0 / mean_turns))
        if unique_frac and rng.random() < unique_frac:  # no shared prefix: the user message only
            convs.append({"prefix": -1, "turns": turns, "len": 0, "ids": []})
        else:
            convs.append({"prefix": s, "turns": turns, "len": int(prefix_len[s]), "ids": list(prefix_ids[s])})
        heapq.heappush(heap, (t, c, 0))
    out: list[dict[str, Any]] = []
    while heap and len(out) < p["requests"]:
        t, c, turn = heapq.heappop(heap)
        conv = convs[c]
        user = _lognormal(rng, p["user_median"], p["user_sigma"], 8, 16000)
        output = _lognormal(rng, p["output_median"], p["output_sigma"], 1, 4000)
        length = conv["len"] + user
        full = conv["len"] // BLOCK  # blocks of what came before that are full: they keep their ids
        ids = conv["ids"][:full] + new_ids(-(-length // BLOCK) - full)
        out.append({"timestamp": int(t * 1000), "input_length": length, "output_length": output, "hash_ids": ids})
        conv["len"] = length + output
        conv["ids"] = ids
        if turn + 1 < conv["turns"]:
            # the next turn comes after the answer (about 30 ms a token) and the user's think time
            heapq.heappush(heap, (t + output * 0.03 + rng.exponential(p["think_s"]), c, turn + 1))
    out.sort(key=lambda r: r["timestamp"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    for key in ("requests", "prefixes"):
        ap.add_argument(f"--{key}", type=int)
    for key in ("zipf", "mean_turns", "think_s", "request_rate", "unique_frac"):
        ap.add_argument(f"--{key.replace('_', '-')}", dest=key, type=float)
    args = ap.parse_args(argv)
    p = dict(PRESETS[args.preset])
    p.update({k: v for k in p if (v := getattr(args, k, None)) is not None})
    reqs = generate(p, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same trace gives the same bytes
    with gzip.GzipFile(args.out, "wb", mtime=0) if args.out.suffix == ".gz" else args.out.open("wb") as f:
        for r in reqs:
            f.write((json.dumps(r) + "\n").encode())
    lengths = np.array([r["input_length"] for r in reqs])
    span = reqs[-1]["timestamp"] / 1000 or 1.0
    print(
        f"{len(reqs)} requests over {span:.0f} s ({len(reqs) / span:.1f}/s), input mean {lengths.mean():.0f} "
        f"p99 {np.percentile(lengths, 99):.0f} tokens, {max(max(r['hash_ids']) for r in reqs) + 1} distinct blocks "
        f"-> {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
