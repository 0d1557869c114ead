#!/usr/bin/env python
"""NIXL host-to-host READ bandwidth between two processes, against memcpy on the same machine.

What it measures (no vLLM, no Ray): a "prefill" process registers DRAM pools with a NIXL agent
(UCX backend) and publishes its agent metadata; a "decode" process registers its own pools,
adds the remote agent and pulls (``READ``) many descriptors at once, the way vLLM's NIXL worker
does: both sides' block lists are prepared once with ``prep_xfer_dlist`` and every transfer is
``make_prepped_xfer`` (indices of the blocks) → ``transfer`` → ``check_xfer_state`` until DONE →
``release``. Metadata goes through the orchestrating process over ``multiprocessing`` pipes.

Descriptor sizes follow the project's KV blocks. Both model presets (``tiny://llama`` and
``tiny://llama-large``) have 2 KV heads of head_dim 64 in fp32 with block_size 32, so one block of
one layer's K (or V) is 32*2*64*4 = 16 KiB. Rows:

* ``4 KiB`` … ``1 MiB``: 256 descriptors of that size per transfer;
* ``tiny req``: a 1,024-token prompt of the tiny model: 32 blocks * 2 layers * K/V = 128 x 16 KiB;
* ``large req``: the same prompt on llama-large: 32 blocks * 6 layers * K/V = 384 x 16 KiB.

Blocks are picked at random (no repeats) from a pool twice the size on both sides, so NIXL
cannot merge neighbouring descriptors into one big copy (a fresh vLLM cache would often hand out
contiguous block ids, which only makes NIXL's job easier).

memcpy baseline, single thread, same sizes, same random layout, measured in the orchestrating
process while no NIXL process runs, once before and once after the NIXL runs (samples pooled;
the machine is shared, load drifts). Two copies of the same descriptors are timed: libc
``memmove`` per descriptor through ctypes (slot to slot, as NIXL does; it pays ~0.3 µs of Python
per descriptor, which shows at 4 KiB) and ``np.take`` of the same source slots (a C loop, fast
for small rows but ~4 GB/s for rows of 256 KiB and more here). The baseline is the faster of the
two per size, and the table's fraction is NIXL / that. The JSON also records both copies, a
contiguous ``np.copyto`` of the same bytes, bytes per thread-CPU second (an estimate free of
preemption), the best iteration, and the load average.

NIXL agent configurations (``--configs``):

* ``default``: what ``nixl_agent_config()`` gives: progress thread on, its delay hard-coded to
  0 µs by the Python API (it busy-waits);
* ``pthr1000``: progress thread with a 1,000 µs delay, set the way ``kv_transfer/cpu_plugin.py``
  does it (a shim on the bindings module that sets ``pthrDelay`` when the agent is created);
* ``noprog``: ``enable_prog_thread=False`` (progress only when the initiator polls).

GB/s are 10^9 bytes per second, the median over ``--iters`` timed transfers after ``--warmup``
untimed ones. The decode side verifies every pulled byte after timing.

    .venv/bin/python -m benchmarks.nixl_bandwidth            # 20 iterations, 3 configs
    .venv/bin/python -m benchmarks.nixl_bandwidth --quick    # 10 iterations, default + pthr1000

Writes ``benchmarks/results/nixl_bandwidth_<UTC>.json`` and ``.png``. UCX picks its transports
itself (shared memory / CMA here); ``--ucx-tls`` sets ``UCX_TLS`` for the two NIXL processes
(keep ``tcp`` in it: without it NIXL's default error handling fails with "no peer failure
handler").
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from benchmarks import harness

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
KIB = 1024

# KV geometry of the project's tiny models (pd_serve/tiny_model.py PRESETS, fp32, block 32).
KV_HEADS, HEAD_DIM, DTYPE_BYTES, BLOCK_TOKENS = 2, 64, 4, 32
KV_BLOCK_BYTES = BLOCK_TOKENS * KV_HEADS * HEAD_DIM * DTYPE_BYTES  # 16 KiB per layer per K/V
PROMPT_BLOCKS = 1024 // BLOCK_TOKENS  # a max-model-len (1,024-token) prompt
MODEL_LAYERS = {"tiny": 2, "large": 6}

CONFIGS = {
    "default": dict(enable_prog_thread=True, pthr_delay_us=None),
    "pthr1000": dict(enable_prog_thread=True, pthr_delay_us=1000),
    "noprog": dict(enable_prog_thread=False, pthr_delay_us=None),
}


def build_cases(n_desc: int, layout: str = "random") -> list[dict[str, Any]]:
    cases = [dict(label=f"{s // KIB} KiB" if s < 1024 * KIB else f"{s // (1024 * KIB)} MiB",
                  desc_bytes=s, n_desc=n_desc)
             for s in (4 * KIB, KV_BLOCK_BYTES, 64 * KIB, 256 * KIB, 1024 * KIB)]
    for name, layers in MODEL_LAYERS.items():
        cases.append(dict(label=f"{name} req", desc_bytes=KV_BLOCK_BYTES,
                          n_desc=PROMPT_BLOCKS * layers * 2))
    for i, c in enumerate(cases):
        c["index"] = i
        c["layout"] = layout
        c["n_slots"] = 2 * c["n_desc"]
        c["total_bytes"] = c["desc_bytes"] * c["n_desc"]
    return cases


def pick_slots(case: dict[str, Any], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(source slots on prefill, destination slots on decode), random, no repeats.

    With ``--layout sequential`` both are 0..n-1 (adjacent blocks, which NIXL may merge)."""
    if case.get("layout") == "sequential":
        seq = np.arange(case["n_desc"], dtype=np.int32)
        return seq, seq.copy()
    rng = np.random.default_rng(seed + case["index"])
    src = rng.choice(case["n_slots"], case["n_desc"], replace=False).astype(np.int32)
    dst = rng.choice(case["n_slots"], case["n_desc"], replace=False).astype(np.int32)
    return src, dst


def fill_pattern(pool: np.ndarray, case_index: int) -> None:
    """Deterministic content: uint64 word i of the pool holds i + (case_index << 48)."""
    words = pool.view(np.uint64)
    words[:] = np.arange(words.size, dtype=np.uint64)
    words += np.uint64(case_index << 48)


# ------------------------------------------------------------------------------------------------
# child processes


def _watchdog(deadline_s: float, parent_pid: int) -> None:
    """Exit hard if the orchestrator goes away or the deadline passes (never leave orphans)."""
    def run() -> None:
        end = time.monotonic() + deadline_s
        while True:
            if os.getppid() != parent_pid or time.monotonic() > end:
                os._exit(3)
            time.sleep(0.5)
    threading.Thread(target=run, daemon=True, name="watchdog").start()


def _make_agent(name: str, cfg: dict[str, Any]):
    import nixl._api as api
    from nixl._api import nixl_agent, nixl_agent_config

    delay = cfg.get("pthr_delay_us")
    if delay is not None:
        # Same mechanism as kv_transfer/cpu_plugin.py: the Python API hard-codes pthrDelay = 0
        # when it builds the bindings' config, so wrap the bindings' nixlAgent constructor.
        binds = api.nixlBind
        real = binds.nixlAgent

        def nixlAgent(agent_name, agent_config):  # noqa: N802, ANN001
            agent_config.pthrDelay = int(delay)
            return real(agent_name, agent_config)

        shim = types.ModuleType(binds.__name__)
        shim.__dict__.update(binds.__dict__)
        shim.nixlAgent = nixlAgent
        api.nixlBind = shim
    conf = nixl_agent_config(enable_prog_thread=cfg["enable_prog_thread"], backends=["UCX"],
                             num_threads=int(cfg.get("num_threads", 0)))
    return nixl_agent(name, conf)


def _pool_descs(pool: np.ndarray, case: dict[str, Any]) -> np.ndarray:
    base = pool.ctypes.data
    d = np.zeros((case["n_slots"], 3), dtype=np.uint64)
    d[:, 0] = base + np.arange(case["n_slots"], dtype=np.uint64) * np.uint64(case["desc_bytes"])
    d[:, 1] = case["desc_bytes"]
    return d


def _alloc_pools(cases: list[dict[str, Any]], fill: bool) -> list[np.ndarray]:
    pools = []
    for c in cases:
        p = np.empty(c["n_slots"] * c["desc_bytes"], dtype=np.uint8)
        if fill:
            fill_pattern(p, c["index"])
        else:
            p.fill(0xFF)  # fault every page in before registration
        pools.append(p)
    return pools


def prefill_main(conn, cfg: dict[str, Any], cases: list[dict[str, Any]], env: dict[str, str],
                 deadline_s: float, parent_pid: int) -> None:
    _watchdog(deadline_s, parent_pid)
    os.environ.update(env)
    try:
        agent = _make_agent(f"prefill-{os.getpid()}", cfg)
        pools = _alloc_pools(cases, fill=True)
        regs = [agent.register_memory(_pool_descs(p, c), "DRAM") for p, c in zip(pools, cases)]
        conn.send(dict(kind="ready", name=agent.name, metadata=agent.get_agent_metadata(),
                       pools=[dict(addr=p.ctypes.data) for p in pools]))
        # Serve until told to stop (or the orchestrator's pipe closes). Without a progress
        # thread nothing drives this agent's UCX worker (connection wire-up needs it), so poll
        # get_new_notifs every millisecond, as a vLLM engine's step loop would.
        poll_s = 1.0 if cfg["enable_prog_thread"] else 0.001
        while True:
            if conn.poll(poll_s):
                msg = conn.recv()
                if msg.get("kind") == "stop":
                    break
            if not cfg["enable_prog_thread"]:
                agent.get_new_notifs()
        for r in regs:
            agent.deregister_memory(r)
        conn.send(dict(kind="stopped"))
    except EOFError:
        pass
    except BaseException as e:  # report, then exit non-zero
        try:
            conn.send(dict(kind="error", where="prefill", error=repr(e)))
        except Exception:
            pass
        raise


def decode_main(conn, cfg: dict[str, Any], cases: list[dict[str, Any]], env: dict[str, str],
                deadline_s: float, parent_pid: int, iters: int, warmup: int, seed: int) -> None:
    _watchdog(deadline_s, parent_pid)
    os.environ.update(env)
    try:
        agent = _make_agent(f"decode-{os.getpid()}", cfg)
        pools = _alloc_pools(cases, fill=False)
        regs = [agent.register_memory(_pool_descs(p, c), "DRAM") for p, c in zip(pools, cases)]
        remote = conn.recv()  # {"name", "metadata", "pools"} from prefill, via the orchestrator
        t0 = time.perf_counter()
        peer = agent.add_remote_agent(remote["metadata"])
        add_remote_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        agent.make_connection(peer)
        connect_s = time.perf_counter() - t0
        conn.send(dict(kind="connected", add_remote_s=add_remote_s, connect_s=connect_s))

        for case, pool, rinfo in zip(cases, pools, remote["pools"]):
            src, dst = pick_slots(case, seed)
            local_h = agent.prep_xfer_dlist("NIXL_INIT_AGENT", _pool_descs(pool, case), "DRAM")
            rpool = np.zeros((case["n_slots"], 3), dtype=np.uint64)
            rpool[:, 0] = rinfo["addr"] + np.arange(case["n_slots"], dtype=np.uint64) * \
                np.uint64(case["desc_bytes"])
            rpool[:, 1] = case["desc_bytes"]
            remote_h = agent.prep_xfer_dlist(peer, rpool, "DRAM")
            total, make_s, post_s, polls = [], [], [], []
            first_s = None
            for it in range(warmup + iters):
                t_a = time.perf_counter()
                h = agent.make_prepped_xfer("READ", local_h, dst, remote_h, src)
                t_b = time.perf_counter()
                state = agent.transfer(h)
                n = 0
                while state == "PROC":
                    state = agent.check_xfer_state(h)
                    n += 1
                t_c = time.perf_counter()
                if state != "DONE":
                    raise RuntimeError(f"transfer {case['label']} ended in state {state}")
                h.release()
                if it == 0:
                    first_s = t_c - t_a
                if it >= warmup:
                    total.append(t_c - t_a)
                    make_s.append(t_b - t_a)
                    post_s.append(t_c - t_b)
                    polls.append(n)
            # verify every pulled byte: local slot dst[i] must hold remote slot src[i]
            words_per = case["desc_bytes"] // 8
            got = pool.view(np.uint64).reshape(case["n_slots"], words_per)[dst]
            want = (src.astype(np.uint64)[:, None] * np.uint64(words_per)
                    + np.arange(words_per, dtype=np.uint64)[None, :]
                    + np.uint64(case["index"] << 48))
            verified = bool(np.array_equal(got, want))
            del got, want
            agent.release_dlist_handle(local_h)
            agent.release_dlist_handle(remote_h)
            conn.send(dict(kind="case", index=case["index"], total_s=total, make_s=make_s,
                           post_s=post_s, polls=polls, first_s=first_s, verified=verified))
        agent.remove_remote_agent(peer)
        for r in regs:
            agent.deregister_memory(r)
        conn.send(dict(kind="done"))
    except EOFError:
        pass
    except BaseException as e:
        try:
            conn.send(dict(kind="error", where="decode", error=repr(e)))
        except Exception:
            pass
        raise


# ------------------------------------------------------------------------------------------------
# orchestrator


def _recv(conn, timeout_s: float, procs: list) -> dict[str, Any]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if conn.poll(0.2):
            msg = conn.recv()
            if msg.get("kind") == "error":
                raise RuntimeError(f"{msg['where']} process failed: {msg['error']}")
            return msg
        for p in procs:
            if not p.is_alive():
                raise RuntimeError(f"{p.name} exited with code {p.exitcode}")
    raise TimeoutError(f"no message within {timeout_s:.0f} s")


def _stop(procs: list, graceful: bool) -> None:
    if graceful:  # they were told to stop and are exiting on their own
        for p in procs:
            p.join(timeout=5)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def run_config(name: str, cases: list[dict[str, Any]], args, env: dict[str, str],
               bar: tqdm) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    cfg = dict(CONFIGS[name], num_threads=args.num_threads)
    p_conn, p_child = ctx.Pipe()
    d_conn, d_child = ctx.Pipe()
    deadline = float(args.timeout_s)
    prefill = ctx.Process(target=prefill_main, name=f"prefill[{name}]", daemon=True,
                          args=(p_child, cfg, cases, env, deadline, os.getpid()))
    decode = ctx.Process(target=decode_main, name=f"decode[{name}]", daemon=True,
                         args=(d_child, cfg, cases, env, deadline, os.getpid(), args.iters,
                               args.warmup, args.seed))
    procs = [prefill, decode]
    out: dict[str, Any] = dict(config=name, agent_config=cfg, cases={})
    ok = False
    try:
        t0 = time.perf_counter()
        prefill.start()
        decode.start()
        ready = _recv(p_conn, deadline, procs)
        out["prefill_ready_s"] = time.perf_counter() - t0
        d_conn.send(dict(name=ready["name"], metadata=ready["metadata"], pools=ready["pools"]))
        conn_msg = _recv(d_conn, deadline, procs)
        out["add_remote_s"], out["connect_s"] = conn_msg["add_remote_s"], conn_msg["connect_s"]
        for _ in cases:
            msg = _recv(d_conn, deadline, procs)
            c = cases[msg["index"]]
            tot = np.array(msg["total_s"])
            post = np.array(msg["post_s"])
            res = dict(
                label=c["label"], desc_bytes=c["desc_bytes"], n_desc=c["n_desc"],
                total_bytes=c["total_bytes"], verified=msg["verified"],
                gbps_median=float(np.median(c["total_bytes"] / tot) / 1e9),
                gbps_best=float(np.max(c["total_bytes"] / tot) / 1e9),
                gbps_p10=float(np.percentile(c["total_bytes"] / tot, 10) / 1e9),
                gbps_p90=float(np.percentile(c["total_bytes"] / tot, 90) / 1e9),
                gbps_post_only_median=float(np.median(c["total_bytes"] / post) / 1e9),
                xfer_ms_median=float(np.median(tot) * 1e3),
                make_prepped_ms_median=float(np.median(msg["make_s"]) * 1e3),
                first_xfer_ms=float(msg["first_s"] * 1e3),
                polls_median=float(np.median(msg["polls"])),
                samples_s=msg["total_s"],
            )
            out["cases"][c["label"]] = res
            bar.set_postfix_str(f"{name} {c['label']}: {res['gbps_median']:.2f} GB/s")
            bar.update(1)
        if _recv(d_conn, deadline, procs).get("kind") != "done":
            raise RuntimeError("decode did not finish cleanly")
        p_conn.send(dict(kind="stop"))
        _recv(p_conn, 30, [prefill])
        ok = True
    finally:
        _stop(procs, graceful=ok)
        for c in (p_conn, d_conn, p_child, d_child):
            c.close()
    out["exit_codes"] = {p.name: p.exitcode for p in procs}
    return out


def memcpy_bench(cases: list[dict[str, Any]], iters: int, warmup: int, seed: int,
                 bar: tqdm, tag: str) -> dict[str, Any]:
    """Single-threaded copies of the same descriptors: wall and thread-CPU time per copy.

    ``memmove``: libc memmove per descriptor (ctypes), source slot -> destination slot in pools
    laid out as NIXL's (includes ~0.3 µs of Python per call). ``take``: ``np.take`` of the same
    source slots into a contiguous buffer (C loop; fast for small rows, slow for large ones).
    ``contiguous``: one ``np.copyto`` of the same number of bytes.
    """
    import ctypes

    memmove = ctypes.memmove
    out = {}
    for c in cases:
        src_idx, dst_idx = pick_slots(c, seed)
        size = c["desc_bytes"]
        pool = np.empty(c["n_slots"] * size, dtype=np.uint8)
        fill_pattern(pool, c["index"])
        src2d = pool.reshape(c["n_slots"], size)
        dpool = np.empty(c["n_slots"] * size, dtype=np.uint8)
        dpool.fill(0xFF)
        dst = np.empty((c["n_desc"], size), dtype=np.uint8)
        dst.fill(0xFF)
        pairs = [(dpool.ctypes.data + int(d) * size, pool.ctypes.data + int(s_) * size)
                 for s_, d in zip(src_idx, dst_idx)]
        flat_src = pool[: c["total_bytes"]]
        flat_dst = dst.reshape(-1)
        res: dict[str, list[float]] = {k: [] for k in ("memmove_s", "memmove_cpu_s", "take_s",
                                                       "take_cpu_s", "contiguous_s")}
        for it in range(warmup + iters):
            c0, t0 = time.thread_time(), time.perf_counter()
            for d, s_ in pairs:
                memmove(d, s_, size)
            t1, c1 = time.perf_counter(), time.thread_time()
            np.take(src2d, src_idx, axis=0, out=dst)
            t2, c2 = time.perf_counter(), time.thread_time()
            np.copyto(flat_dst, flat_src)
            t3 = time.perf_counter()
            if it >= warmup:
                res["memmove_s"].append(t1 - t0)
                res["memmove_cpu_s"].append(c1 - c0)
                res["take_s"].append(t2 - t1)
                res["take_cpu_s"].append(c2 - c1)
                res["contiguous_s"].append(t3 - t2)
        np.take(src2d, src_idx, axis=0, out=dst)  # copyto overwrote it
        assert np.array_equal(dst[-1], src2d[src_idx[-1]])
        assert np.array_equal(dpool.reshape(c["n_slots"], size)[dst_idx[-1]], src2d[src_idx[-1]])
        out[c["label"]] = res
        del pool, src2d, dpool, dst, flat_src, flat_dst, pairs
        gb = c["total_bytes"] / min(np.median(res["memmove_s"]), np.median(res["take_s"])) / 1e9
        bar.set_postfix_str(f"memcpy ({tag}) {c['label']}: {gb:.2f} GB/s")
        bar.update(1)
    return out


def summarize_memcpy(cases: list[dict[str, Any]], passes: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the passes; the baseline (``gbps_median``) is the faster of memmove and take."""
    out = {}
    for c in cases:
        lab, b = c["label"], c["total_bytes"]

        def pooled(key: str) -> np.ndarray:
            return np.array([s for p in passes for s in p[lab][key]])

        r: dict[str, Any] = {}
        for m in ("memmove", "take"):
            t, cpu = pooled(f"{m}_s"), pooled(f"{m}_cpu_s")
            r[m] = dict(gbps_median=float(np.median(b / t) / 1e9),
                        gbps_best=float(np.max(b / t) / 1e9),
                        gbps_thread_cpu_median=float(np.median(b / np.maximum(cpu, 1e-9)) / 1e9),
                        gbps_per_pass_median=[float(np.median(b / np.array(p[lab][f"{m}_s"]))
                                                    / 1e9) for p in passes],
                        samples_s=t.tolist())
        r["contiguous_gbps_median"] = float(np.median(b / pooled("contiguous_s")) / 1e9)
        r["method"] = max(("memmove", "take"), key=lambda m: r[m]["gbps_median"])
        r["gbps_median"] = r[r["method"]]["gbps_median"]
        r["gbps_best"] = r[r["method"]]["gbps_best"]
        out[lab] = r
    return out


def print_table(result: dict[str, Any]) -> str:
    cfgs = list(result["nixl"])
    head = ["case", "desc", "n", "MiB"] + [f"NIXL {c} GB/s" for c in cfgs] + \
        ["memcpy GB/s", "memcpy via"] + [f"{c} / memcpy" for c in cfgs]
    rows = []
    for case in result["cases"]:
        lab = case["label"]
        mc = result["memcpy"][lab]["gbps_median"]
        nx = [result["nixl"][c]["cases"][lab]["gbps_median"] for c in cfgs]
        desc = f"{case['desc_bytes'] // KIB} KiB"
        rows.append([lab, desc, str(case["n_desc"]), f"{case['total_bytes'] / 2**20:g}"]
                    + [f"{v:.2f}" for v in nx]
                    + [f"{mc:.2f}", result["memcpy"][lab]["method"]] + [f"{v / mc:.0%}" for v in nx])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    return text


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [c["label"] for c in result["cases"]]
    cfgs = list(result["nixl"])
    x = np.arange(len(labels))
    w = 0.8 / (len(cfgs) + 1)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for i, c in enumerate(cfgs):
        a1.bar(x + i * w, [result["nixl"][c]["cases"][l]["gbps_median"] for l in labels], w,
               label=f"NIXL READ ({c})")
        a2.bar(x + i * w, [result["nixl"][c]["cases"][l]["gbps_median"]
                           / result["memcpy"][l]["gbps_median"] for l in labels], w, label=c)
    a1.bar(x + len(cfgs) * w, [result["memcpy"][l]["gbps_median"] for l in labels], w,
           label="memcpy (1 thread, faster of memmove/np.take)", color="gray")
    a1.set_ylabel("GB/s (median)")
    a1.legend(fontsize=8)
    a1.set_title(f"NIXL UCX host-to-host READ vs memcpy, {result['machine']['nproc']} cores, "
                 f"{result['config']['iters']} iters")
    a2.axhline(0.5, color="red", ls="--", lw=1, label="target 50%")
    a2.set_ylabel("NIXL / memcpy")
    a2.legend(fontsize=8)
    a2.set_xticks(x + w * len(cfgs) / 2)
    a2.set_xticklabels([f"{c['label']}\n{c['n_desc']}x{c['desc_bytes'] // KIB}K"
                        for c in result["cases"]], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="10 iterations, configs default+pthr1000 (unless given)")
    ap.add_argument("--iters", type=int, default=None, help="timed transfers per case (20)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed transfers per case (3)")
    ap.add_argument("--n-desc", type=int, default=256, help="descriptors per transfer")
    ap.add_argument("--configs", default=None,
                    help=f"comma list of {','.join(CONFIGS)} (default: all; --quick: "
                         "default,pthr1000)")
    ap.add_argument("--ucx-tls", default=None, help="UCX_TLS for the NIXL processes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layout", choices=("random", "sequential"), default="random",
                    help="block slots: random from a 2x pool (default), or adjacent (NIXL may "
                         "merge them into large copies)")
    ap.add_argument("--num-threads", type=int, default=0,
                    help="nixl_agent_config(num_threads=...) for UCX (0 = NIXL's default; "
                         "vLLM asks for 4)")
    ap.add_argument("--timeout-s", type=float, default=120,
                    help="per NIXL process (it is killed after that)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)
    args.iters = args.iters or (10 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    configs = (args.configs or ("default,pthr1000" if args.quick else ",".join(CONFIGS))).split(",")
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"unknown config {c!r}")
    if args.ucx_tls and "tcp" not in args.ucx_tls.split(","):
        print("warning: UCX_TLS without tcp: NIXL's default error handling may fail "
              "('no peer failure handler')", file=sys.stderr)

    # A SIGTERM becomes SystemExit so that run_config's finally stops the children.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    env = {"NIXL_LOG_LEVEL": os.environ.get("NIXL_LOG_LEVEL", "WARN")}
    if args.ucx_tls:
        env["UCX_TLS"] = args.ucx_tls
    cases = build_cases(args.n_desc, args.layout)
    stamp = harness.utc_stamp()
    result = harness.envelope(
        "nixl_bandwidth", stamp,
        loadavg_start=list(os.getloadavg()),
        config=dict(iters=args.iters, warmup=args.warmup, n_desc=args.n_desc, seed=args.seed,
                    configs={c: CONFIGS[c] for c in configs}, quick=args.quick,
                    child_env=env, ucx_env={k: v for k, v in os.environ.items()
                                            if k.startswith("UCX_")},
                    kv_block_bytes=KV_BLOCK_BYTES, prompt_blocks=PROMPT_BLOCKS,
                    model_layers=MODEL_LAYERS, num_threads=args.num_threads,
                    layout=("random slots from a pool of 2x n_desc" if args.layout == "random"
                            else "sequential slots 0..n_desc-1 on both sides"),
                    gbps="1e9 bytes/s, median over iters; NIXL time = make_prepped_xfer + "
                         "transfer + check_xfer_state polling until DONE"),
        cases=[{k: c[k] for k in ("label", "desc_bytes", "n_desc", "total_bytes")} for c in cases],
    )
    try:
        from importlib.metadata import version
        result["config"]["nixl_version"] = version("nixl-cu12")
    except Exception:
        pass

    t_start = time.perf_counter()
    with tqdm(total=len(cases) * (len(configs) + 2), desc="nixl_bandwidth", unit="case",
              file=sys.stderr) as bar:
        # memcpy before and after the NIXL runs (the machine is shared: load drifts)
        passes = [memcpy_bench(cases, args.iters, args.warmup, args.seed, bar, "before")]
        result["nixl"] = {}
        result["failed"] = {}
        for c in configs:
            done_before = bar.n
            try:
                result["nixl"][c] = run_config(c, cases, args, env, bar)
            except Exception as e:  # keep the other configurations' results
                result["failed"][c] = repr(e)
                tqdm.write(f"config {c} failed: {e!r}", file=sys.stderr)
                bar.update(len(cases) - (bar.n - done_before))
        passes.append(memcpy_bench(cases, args.iters, args.warmup, args.seed, bar, "after"))
        result["memcpy"] = summarize_memcpy(cases, passes)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    result["loadavg_end"] = list(os.getloadavg())
    if not result["nixl"]:
        print(f"no NIXL configuration finished: {result['failed']}", file=sys.stderr)
        return 2
    bad = [(c, l) for c, r in result["nixl"].items() for l, v in r["cases"].items()
           if not v["verified"]]
    result["all_verified"] = not bad

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print()
    result["table_md"] = print_table(result)
    for c, r in result["nixl"].items():
        print(f"{c}: prefill process ready {r['prefill_ready_s']:.1f} s, add_remote_agent "
              f"{r['add_remote_s'] * 1e3:.1f} ms, make_connection {r['connect_s'] * 1e3:.1f} ms")
    print(f"data verified: {'all' if not bad else 'FAILED ' + str(bad)}; "
          f"loadavg {result['loadavg_start'][0]:.1f} -> {result['loadavg_end'][0]:.1f}; "
          f"wall {result['wall_s']} s")
    jpath = out_dir / f"nixl_bandwidth_{stamp}.json"
    ppath = harness.write_result(result, jpath, plot)
    print(f"wrote {harness.rel(jpath)}" + (f"\n      {harness.rel(ppath)}" if ppath else ""))
    for c, e in result["failed"].items():
        print(f"FAILED config {c}: {e}")
    return 0 if not bad and not result["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
