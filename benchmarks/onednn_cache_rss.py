"""Why a CPU prefill worker's RSS grows for minutes: vLLM's oneDNN GEMM primitive caches.

    .venv/bin/python -m benchmarks.onednn_cache_rss [--calls 6000] [--layers 8]

On the CPU, vLLM runs each linear layer through a oneDNN handler (``ops.create_onednn_mm(weight,
32)``) that caches up to 32 compiled primitives, one per batch size M (tokens in the step). A
decode engine sees few distinct M (the running requests), a prefill engine many (the tokens of
whatever prompts share a step), so its caches keep filling and replacing entries, and its heap
grows until the allocator's high-water mark is reached. This reproduces that without an engine:
``--layers`` handlers of a 512x512 weight, called ``--calls`` times with M fixed (16) and with M
drawn from 1..1024, RSS sampled every ``--every`` calls. No vLLM engine is started; it needs only
vLLM's compiled ops. Writes ``benchmarks/results/onednn_cache_rss_<UTC>.json`` and a PNG.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

import psutil
from tqdm import tqdm

from benchmarks import harness


def run(mode: str, a: argparse.Namespace) -> list[tuple[int, float]]:
    import torch
    from vllm import _custom_ops as ops

    torch.set_num_threads(1)
    proc = psutil.Process()
    handlers = [ops.create_onednn_mm(torch.randn(512, 512).t(), 32) for _ in range(a.layers)]
    rng = random.Random(a.seed)
    out = [(0, proc.memory_info().rss / 2**20)]
    for i in tqdm(range(1, a.calls + 1), desc=f"M {mode}", leave=False):
        x = torch.randn(16 if mode == "fixed" else rng.randint(1, 1024), 512)
        for h in handlers:
            ops.onednn_mm(h, x, None)
        if i % a.every == 0:
            out.append((i, proc.memory_info().rss / 2**20))
    return out


def plot(report: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, pts in report["series"].items():
        base = pts[0][1]
        ax.plot([p[0] for p in pts], [p[1] - base for p in pts], marker="o", label=f"M {mode}")
    ax.set_xlabel("calls (each through every handler)")
    ax.set_ylabel("RSS growth (MiB)")
    ax.set_title(f"oneDNN GEMM handlers ({report['config']['layers']}, cache 32 each): RSS vs batch-size variety")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=6000)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    stamp = harness.utc_stamp()
    report = harness.envelope("onednn_cache_rss", stamp, vars(a), series={})
    for mode in ("fixed", "varied"):  # fixed first: the varied run's growth cannot be inherited
        report["series"][mode] = pts = run(mode, a)
        print(f"M {mode:<6}: RSS {pts[0][1]:.1f} -> {pts[-1][1]:.1f} MiB ({pts[-1][1] - pts[0][1]:+.1f}); "
              "growth per segment: " + ", ".join(f"{b[1] - p[1]:+.1f}" for p, b in zip(pts, pts[1:])))
    path = harness.RESULTS_DIR / f"onednn_cache_rss_{stamp}.json"
    png = harness.write_result(report, path, plot)
    print(f"wrote {harness.rel(path)}" + (f" and {harness.rel(png)}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
