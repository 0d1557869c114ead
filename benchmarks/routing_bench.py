#!/usr/bin/env python
"""Routing benchmark of `scheduler/`: decision cost, and prefix-cache hit rate on a trace replay.

Scenario ``throughput`` (a): one process, one core. For 16, 256 and 1,024 workers, pre-populate
the index through the real event path (msgpack ``KVEventBatch`` → ``apply_batch``), then route
8k-token prompts (block size 32 = 256 blocks) arriving at ``--rate`` per simulated second: half
continue a cached conversation, 30 % start a new one on a shared system prompt, 20 % share
nothing. Each decision is followed by ``on_routed`` (speculative entries), one worker stats
report, and ``--confirm-delay-s`` later the chosen engine's KV events (stored blocks, and one
``BlockRemoved`` per evicted block so every engine stays at its size). Reports route() p50/p99
latency and decisions/s, and separately the per-request cost of hashing, feedback and events.

Scenario ``replay`` (b): replays a Mooncake-format trace (``hash_ids``, 512 tokens a block)
against N simulated engines with finite KV caches (LRU, in 512-token blocks) and a simple time
model (sequential prefill at ``--prefill-tps``, decode ``--tpot-s`` per output token). Policies:

* ``scheduler``: the real `Scheduler` (default profile), fed by KV events that the simulated
  engines publish as msgpack ``KVEventBatch`` through `KVEventSubscriber.handle`;
* ``scheduler_approx``: the real `Scheduler` in approximate mode (no events, routing history);
* ``round_robin`` and ``least_loaded`` (fewest queued + running; Ray Serve's default is a
  power-of-two-choices version of it);
* ``oracle``: full knowledge of every engine's real cache; picks the longest cached prefix,
  ties to the least loaded: the best choice one request at a time;
* ``upper_bound``: an infinite cache shared by all engines (no policy can beat it).

Hit rate = prompt tokens served from cache / prompt tokens (a prompt's last token is always
computed, as in vLLM). The replay runs at every ``--capacities`` value, plus once "loaded"
(``--loaded-prefill-tps``: queues of tens of seconds) to check that affinity survives queueing.
Writes ``benchmarks/results/routing_<UTC>.json`` (the harness envelope) and ``.png``.

    .venv/bin/python benchmarks/routing_bench.py                 # both scenarios
    .venv/bin/python benchmarks/routing_bench.py --scenario replay --capacities 1000
"""

from __future__ import annotations

import argparse
import gc
import gzip
import heapq
import json
import random
import resource
import sys
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import harness  # noqa: E402
from scheduler import (  # noqa: E402
    WEIGHTED_CONFIG,
    Decision,
    KVEventSubscriber,
    NoEligibleWorker,
    RequestContext,
    Scheduler,
    block_keys,
    load_profiles,
    make_scheduler,
)
from scheduler.events import (  # noqa: E402
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    apply_batch,
    decode_batch,
    encode_batch,
)

DEFAULT_TRACE = harness.ROOT / "benchmarks" / "results" / "routing_traces" / "mooncake_synthetic.jsonl.gz"
TRACE_BLOCK = 512
VOCAB = 32000


# ---------------------------------------------------------------------- (a) throughput


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def bench_throughput(n_workers: int, args: argparse.Namespace) -> dict[str, Any]:
    """Decision cost at ``n_workers`` workers (see module docstring).

    Per request, timed separately: hashing the prompt; ``route()``; feedback (``on_routed`` +
    one worker stats report); and, ``--confirm-delay-s`` of simulated time later, the engine's
    KV events for it (msgpack decode + apply: ``BlockStored`` for the blocks the engine had to
    compute, ``BlockRemoved`` for what it evicted to stay at its populated size).
    """
    rng = np.random.default_rng(args.seed)
    prng = random.Random(args.seed)
    bs = args.block_size
    n_blocks = args.prompt_tokens // bs
    sys_blocks = max(1, n_blocks // 8)
    conv_blocks = n_blocks - sys_blocks - max(1, n_blocks // 8)  # room for a new turn
    clock = [0.0]  # simulated time: requests arrive at --rate per second
    sched = make_scheduler("decode", bs, rng=args.seed, clock=lambda: clock[0])
    index = sched.index
    assert index is not None
    ids = [f"decode-{i}" for i in range(n_workers)]
    sched.registry.sync(ids)
    for w in ids:
        sched.registry.update(
            w,
            kv_usage=float(rng.uniform(0.1, 0.9)),
            num_running=int(rng.integers(0, 32)),
            num_waiting=int(rng.integers(0, 4)),
        )

    def toks(n: int) -> np.ndarray:
        return rng.integers(0, VOCAB, size=n, dtype=np.uint32)

    # Each engine's real cache (its block hashes) and the order it evicts in (FIFO of stores).
    cached: dict[str, set[int]] = {w: set() for w in ids}
    stored_fifo: dict[str, deque[list[int]]] = {w: deque() for w in ids}

    def store(w: str, prompt: np.ndarray | list[int], keys: list[int]) -> bytes | None:
        """The engine computes what it does not cache and reports it, evicting to stay in size."""
        have = cached[w]
        first = 0
        while first < len(keys) and keys[first] ^ ENGINE_SALT in have:
            first += 1
        if first == len(keys):
            return None
        hashes = [k ^ ENGINE_SALT for k in keys[first:]]
        have.update(hashes)
        stored_fifo[w].append(hashes)
        events: list[Any] = [
            BlockStored(
                block_hashes=hashes,
                parent_block_hash=keys[first - 1] ^ ENGINE_SALT if first else None,
                token_ids=list(prompt[first * bs : len(keys) * bs]),
                block_size=bs,
                lora_id=None,
                medium="GPU",
                lora_name=None,
            )
        ]
        while len(have) > capacity[w] and len(stored_fifo[w]) > 1:
            old = [h for h in stored_fifo[w].popleft() if h in have]
            have.difference_update(old)
            events.extend(BlockRemoved(block_hashes=[h], medium="GPU") for h in old)  # one per block, as vLLM
        return encode_batch(KVEventBatch(ts=clock[0], events=events))

    system_prompts = [toks(sys_blocks * bs) for _ in range(8)]
    n_convs = n_workers * args.convs_per_worker
    conv_prompts: list[np.ndarray] = []
    capacity = dict.fromkeys(ids, 10**12)
    t0 = time.perf_counter()
    for c in tqdm(range(n_convs), desc=f"populate {n_workers:>4} workers", leave=False):
        prompt = np.concatenate([system_prompts[c % len(system_prompts)], toks(conv_blocks * bs)])
        conv_prompts.append(prompt)
        keys = block_keys(prompt, bs)
        owners = [ids[c % n_workers]]
        if prng.random() < 0.25:
            owners.append(ids[prng.randrange(n_workers)])
        for w in owners:
            payload = store(w, prompt.tolist(), keys)
            if payload is not None:
                apply_batch(index, w, decode_batch(payload))
    populate_s = time.perf_counter() - t0
    capacity = {w: len(have) + n_blocks for w, have in cached.items()}  # engines stay at their populated size
    for w in ids:  # engines report their KV size and measured prefill rate, as in the replay
        sched.registry.update(w, capacity_blocks=capacity[w], prefill_tps=float(rng.uniform(5000, 20000)))

    def query() -> np.ndarray:
        u = prng.random()
        if u < 0.5:
            base = conv_prompts[prng.randrange(n_convs)]
        elif u < 0.8:
            base = system_prompts[prng.randrange(len(system_prompts))]
        else:
            return toks(args.prompt_tokens)
        return np.concatenate([base, toks(args.prompt_tokens - len(base))])

    # Warm up past the confirmation delay, so events arrive as fast as requests (steady state).
    warmup = int(args.confirm_delay_s * args.rate) + args.warmup
    populated_keys = len(index)
    hash_s: list[float] = []
    route_s: list[float] = []
    feedback_s: list[float] = []
    events_s: list[float] = []
    reasons: Counter[str] = Counter()
    matched = 0
    pending: deque[tuple[float, str, bytes]] = deque()
    gc.collect()
    perf = time.perf_counter
    for i in tqdm(range(warmup + args.decisions), desc=f"route    {n_workers:>4} workers", leave=False):
        clock[0] += 1.0 / args.rate
        q = query()
        if i == warmup:
            for timings in (hash_s, route_s, feedback_s, events_s):
                timings.clear()
            reasons.clear()
            matched = 0
        token_ids = q.tolist()  # token ids arrive as a list of ints from the tokenizer
        w = ids[prng.randrange(n_workers)]
        stats = {"kv_usage": prng.random() * 0.9, "num_running": prng.randrange(32), "num_waiting": prng.randrange(4)}
        t_a = perf()
        ctx = RequestContext.from_tokens(f"r{i}", token_ids, bs)
        t_b = perf()
        d = sched.route(ctx)
        t_c = perf()
        sched.on_routed(ctx, d.worker)  # speculative index entries + in-flight count
        sched.registry.update(w, **stats)  # one stats report per decision
        t_d = perf()
        payload = store(d.worker, token_ids, list(ctx.block_keys))
        if payload is not None:
            pending.append((clock[0] + args.confirm_delay_s, d.worker, payload))
        t_e = perf()
        while pending and pending[0][0] <= clock[0]:
            _, ew, payload = pending.popleft()
            apply_batch(index, ew, decode_batch(payload))
        t_f = perf()
        hash_s.append(t_b - t_a)
        route_s.append(t_c - t_b)
        feedback_s.append(t_d - t_c)
        events_s.append(t_f - t_e)
        reasons[d.reason.value] += 1
        matched += d.matched_blocks
    n = len(route_s)
    loop_s = sum(hash_s) + sum(route_s) + sum(feedback_s) + sum(events_s)
    return {
        "workers": n_workers,
        "decisions": n,
        "index_keys": populated_keys,
        "index_keys_after": len(index),
        "index_stats": vars(index.stats).copy(),
        "populate_s": round(populate_s, 3),
        "route_p50_us": round(_pct(route_s, 50) * 1e6, 1),
        "route_p99_us": round(_pct(route_s, 99) * 1e6, 1),
        "route_mean_us": round(float(np.mean(route_s)) * 1e6, 1),
        "decisions_per_s": round(n / sum(route_s)),
        "hash_p50_us": round(_pct(hash_s, 50) * 1e6, 1),
        "feedback_p50_us": round(_pct(feedback_s, 50) * 1e6, 1),
        "events_mean_us": round(float(np.mean(events_s)) * 1e6, 1),
        "loop_per_s": round(n / loop_s),
        "mean_matched_blocks": round(matched / n, 1),
        "reasons": dict(reasons),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


# ---------------------------------------------------------------------- (b) trace replay


@dataclass
class TraceRequest:
    t: float
    input_length: int
    output_length: int
    hash_ids: list[int]


def load_trace(path: Path, limit: int | None) -> list[TraceRequest]:
    """Read a Mooncake-format trace (JSON lines; ``.gz`` is decompressed)."""
    out = []
    with gzip.open(path, "rt") if path.suffix == ".gz" else path.open() as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            out.append(TraceRequest(r["timestamp"] / 1000.0, r["input_length"], r["output_length"], r["hash_ids"]))
            if limit and len(out) >= limit:
                break
    return out


def cacheable_blocks(r: TraceRequest) -> int:
    """Blocks that may hit: full blocks, never the one holding the prompt's last token."""
    return min(len(r.hash_ids), (r.input_length - 1) // TRACE_BLOCK)


def upper_bound_hit_rate(reqs: list[TraceRequest]) -> float:
    """Hit rate of one infinite cache shared by every engine."""
    seen: set[tuple[int, ...]] = set()
    hit = total = 0
    for r in reqs:
        keys = [tuple(r.hash_ids[: i + 1]) for i in range(len(r.hash_ids))]
        n = 0
        for k in keys[: cacheable_blocks(r)]:
            if k not in seen:
                break
            n += 1
        hit += n * TRACE_BLOCK
        total += r.input_length
        seen.update(keys[: r.input_length // TRACE_BLOCK])
    return hit / total


ENGINE_SALT = 0x9E3779B97F4A7C15


@dataclass
class SimWorker:
    wid: str
    capacity: int
    prefill_tps: float = 20000.0
    cache: OrderedDict[int, int] = field(default_factory=OrderedDict)  # our key -> engine hash
    queue: list[int] = field(default_factory=list)
    busy: bool = False
    busy_until: float = 0.0
    running: int = 0
    held_blocks: int = 0
    seq: int = 0
    requests: int = 0  # routed here
    prefill_tokens: int = 0  # computed here (uncached prompt tokens)
    prefill_busy_s: float = 0.0

    def prefix_len(self, keys: list[int]) -> int:
        n = 0
        for k in keys:
            if k not in self.cache:
                break
            n += 1
        return n


class Replay:
    """One policy over the whole trace with ``n`` workers of ``capacity`` blocks each."""

    def __init__(
        self,
        policy: str,
        reqs: list[TraceRequest],
        tokens: np.ndarray,
        args: argparse.Namespace,
        capacity: int,
        prefill_tps: float,
    ):
        self.policy = policy
        self.prefill_tps = prefill_tps
        self.reqs = reqs
        self.tokens = tokens
        self.args = args
        self.now = 0.0
        self.rng = random.Random(args.seed)
        speeds = args.speeds or [1.0]
        self.workers = [
            SimWorker(f"engine-{i}", capacity, prefill_tps * speeds[i % len(speeds)]) for i in range(args.sim_workers)
        ]
        self.by_id = {w.wid: w for w in self.workers}
        self.rr = 0
        self.sched: Scheduler | None = None
        self.sub: KVEventSubscriber | None = None
        if policy.startswith("scheduler"):
            approx = policy == "scheduler_approx"
            profile = load_profiles(WEIGHTED_CONFIG)["decode"] if policy == "scheduler_weighted" else None
            self.sched = make_scheduler(
                "decode", TRACE_BLOCK, profile=profile, approximate=approx, rng=args.seed, clock=lambda: self.now
            )
            self.sched.registry.sync(w.wid for w in self.workers)
            for w in self.workers:
                self.sched.registry.update(w.wid, capacity_blocks=capacity)
            if not approx:
                assert self.sched.index is not None
                self.sub = KVEventSubscriber(self.sched.index, "inproc://sim", lambda topic: topic.decode())
        self.hit_tokens = 0
        self.prompt_tokens = 0
        self.ttft: dict[int, float] = {}  # by request index
        self.queue_wait: dict[int, float] = {}  # arrival to start of prefill
        self.reasons: Counter[str] = Counter()
        self.index_misses = 0  # scheduler believed more blocks than the engine had

    # -- events the simulated engine publishes
    def publish(self, w: SimWorker, events: list[Any]) -> None:
        if self.sub is None or not events:
            return
        payload = encode_batch(KVEventBatch(ts=self.now, events=events))
        self.sub.handle([w.wid.encode(), w.seq.to_bytes(8, "big"), payload])
        w.seq += 1

    def route(self, ctx: RequestContext, keys: list[int]) -> tuple[str, Decision | None]:
        if self.sched is not None:
            try:
                d = self.sched.route(ctx)
            except NoEligibleWorker:  # everyone saturated: fall back to the least loaded
                w = min(self.workers, key=lambda w: len(w.queue) + w.running)
                self.reasons["no_eligible"] += 1
                return w.wid, None
            self.reasons[d.reason.value] += 1
            real = self.by_id[d.worker].prefix_len(keys)
            if d.matched_blocks > real:
                self.index_misses += 1
            return d.worker, d
        return self._baseline(keys), None

    def _baseline(self, keys: list[int]) -> str:
        if self.policy == "round_robin":
            self.rr = (self.rr + 1) % len(self.workers)
            return self.workers[self.rr].wid
        if self.policy == "least_loaded":
            loads = [len(w.queue) + w.running for w in self.workers]
            best = min(loads)
            return self.rng.choice([w.wid for w, load in zip(self.workers, loads) if load == best])
        if self.policy == "oracle":
            scored = [(w.prefix_len(keys), -(len(w.queue) + w.running)) for w in self.workers]
            best = max(scored)
            return self.rng.choice([w.wid for w, s in zip(self.workers, scored) if s == best])
        raise ValueError(self.policy)

    def queued_prefill_tokens(self, w: SimWorker) -> float:
        """What the engine would report: uncached tokens of its queue, plus the rest of the running prefill."""
        q = sum(
            self.reqs[i].input_length - min(w.prefix_len(self.ctxs[i][1]), cacheable_blocks(self.reqs[i])) * TRACE_BLOCK
            for i in w.queue
        )
        return q + max(0.0, w.busy_until - self.now) * w.prefill_tps

    def report_stats(self) -> None:
        if self.sched is None:
            return
        full = self.args.engine_reports == "full"
        for w in self.workers:
            self.sched.registry.update(
                w.wid,
                kv_usage=min(1.0, w.held_blocks / w.capacity),
                num_running=w.running,
                num_waiting=len(w.queue),
                # measured by the engine: tokens computed / seconds spent computing them
                prefill_tps=w.prefill_tokens / w.prefill_busy_s if full and w.prefill_busy_s > 0 else None,
                queued_prefill_tokens=self.queued_prefill_tokens(w) if full else None,
            )

    def run(self) -> dict[str, Any]:
        args = self.args
        heap: list[tuple[float, int, str, Any]] = []
        seq = 0

        def push(t: float, kind: str, payload: Any) -> None:
            nonlocal seq
            heapq.heappush(heap, (t, seq, kind, payload))
            seq += 1

        for i, r in enumerate(self.reqs):
            push(r.t, "arrive", i)
        if self.sched is not None:
            push(0.0, "stats", None)
        self.ctxs = ctxs = {}
        arrivals: dict[int, float] = {}
        pending = len(self.reqs)
        while heap and pending:
            self.now, _, kind, payload = heapq.heappop(heap)
            if kind == "stats":
                self.report_stats()
                push(self.now + args.stats_period_s, "stats", None)
            elif kind == "arrive":
                i = payload
                r = self.reqs[i]
                toks = self.tokens[r.hash_ids].ravel()[: r.input_length]
                ctx = RequestContext.from_tokens(f"r{i}", toks, TRACE_BLOCK)
                keys = list(ctx.block_keys)
                wid, decision = self.route(ctx, keys)
                if self.sched is not None:
                    self.sched.on_routed(ctx, wid, decision)
                w = self.by_id[wid]
                w.requests += 1
                ctxs[i] = (ctx, keys)
                arrivals[i] = self.now
                w.queue.append(i)
                if not w.busy:
                    push(self.now, "start", wid)
            elif kind == "start":
                w = self.by_id[payload]
                if w.busy or not w.queue:
                    continue
                r = self.reqs[w.queue[0]]
                blocks = -(-(r.input_length + r.output_length) // TRACE_BLOCK)
                if args.kv_admission and w.running and w.held_blocks + blocks > w.capacity:
                    continue  # KV full: wait until a running request ends ("done" retries)
                i = w.queue.pop(0)
                ctx, keys = ctxs.pop(i)
                self.queue_wait[i] = self.now - arrivals[i]
                hit = min(w.prefix_len(keys), cacheable_blocks(r))
                self.hit_tokens += hit * TRACE_BLOCK
                self.prompt_tokens += r.input_length
                # allocate: touch cached blocks, insert the rest, evict LRU
                removed: list[int] = []
                for k in keys[:hit]:
                    w.cache.move_to_end(k)
                new_hashes = []
                for k in keys[hit:]:
                    if k in w.cache:
                        w.cache.move_to_end(k)
                    else:
                        w.cache[k] = k ^ ENGINE_SALT
                    new_hashes.append(w.cache[k])
                while len(w.cache) > w.capacity:
                    _, h = w.cache.popitem(last=False)
                    removed.append(h)
                if removed:  # vLLM publishes one BlockRemoved per evicted block
                    self.publish(w, [BlockRemoved(block_hashes=[h], medium="GPU") for h in removed])
                uncached = r.input_length - hit * TRACE_BLOCK
                prefill_s = uncached / w.prefill_tps
                w.prefill_tokens += uncached
                w.prefill_busy_s += prefill_s
                w.busy_until = self.now + prefill_s
                w.busy = True
                w.running += 1
                w.held_blocks += blocks
                stored = None
                if new_hashes:
                    parent = keys[hit - 1] ^ ENGINE_SALT if hit else None
                    stored = BlockStored(
                        block_hashes=new_hashes,
                        parent_block_hash=parent,
                        token_ids=ctx_tokens(self.tokens, r, hit, len(keys)),
                        block_size=TRACE_BLOCK,
                        lora_id=None,
                        medium="GPU",
                        lora_name=None,
                    )
                push(self.now + prefill_s, "prefilled", (w.wid, i, stored, blocks))
            elif kind == "prefilled":
                wid, i, stored, blocks = payload
                w = self.by_id[wid]
                if stored is not None:
                    # evicted since start? the engine would not report blocks it no longer holds
                    self.publish(w, [stored])
                self.ttft[i] = self.now - arrivals.pop(i)
                w.busy = False
                if w.queue:
                    push(self.now, "start", wid)
                push(self.now + self.reqs[i].output_length * args.tpot_s, "done", (wid, blocks))
            elif kind == "done":
                wid, blocks = payload
                w = self.by_id[wid]
                w.running -= 1
                w.held_blocks -= blocks
                pending -= 1
                if w.queue and not w.busy:
                    push(self.now, "start", wid)
                if self.sched is not None:
                    self.sched.on_completed(wid)
        reqs_per = [w.requests for w in self.workers]
        toks_per = [w.prefill_tokens for w in self.workers]
        out: dict[str, Any] = {
            "policy": self.policy,
            "hit_rate": self.hit_tokens / self.prompt_tokens,
            "ttft_mean_s": float(np.mean(list(self.ttft.values()))),
            "ttft_p99_s": _pct(list(self.ttft.values()), 99),
            "queue_wait_mean_s": float(np.mean(list(self.queue_wait.values()))),
            "queue_wait_p99_s": _pct(list(self.queue_wait.values()), 99),
            "workers": {
                "requests": reqs_per,
                "prefill_tokens": toks_per,
                "requests_max": max(reqs_per),
                "requests_mean": float(np.mean(reqs_per)),
                "requests_max_over_mean": max(reqs_per) / float(np.mean(reqs_per)),
                "prefill_tokens_max": max(toks_per),
                "prefill_tokens_mean": float(np.mean(toks_per)),
                "prefill_tokens_max_over_mean": max(toks_per) / max(1e-9, float(np.mean(toks_per))),
            },
        }
        if self.sched is not None:
            out["reasons"] = dict(self.reasons)
            out["index_overestimates"] = self.index_misses
            assert self.sched.index is not None
            out["index_stats"] = vars(self.sched.index.stats).copy()
        if self.sub is not None:
            out["subscriber_stats"] = vars(self.sub.stats).copy()
        return out


def ctx_tokens(tokens: np.ndarray, r: TraceRequest, first_block: int, last_block: int) -> list[int]:
    """Token ids of blocks ``first_block..last_block-1`` of ``r``, as an engine event carries them."""
    return tokens[r.hash_ids[first_block:last_block]].ravel().tolist()


def bench_replay(args: argparse.Namespace) -> dict[str, Any]:
    """Every policy on every cell (capacity, load), once per seed of ``--seeds``.

    A seed draws the token ids behind the trace's hash ids and every tie-break. With a few
    hundred blocks per engine the hit rate of any one seed moves by several percent, so each
    ``runs[]`` entry is the mean over the seeds (``per_seed`` keeps each), and ``vs_oracle`` is
    the ratio of the means."""
    reqs = load_trace(args.trace, args.trace_limit)
    n_ids = max(max(r.hash_ids) for r in reqs) + 1
    ub = upper_bound_hit_rate(reqs)
    cells = [("normal", cap, args.prefill_tps) for cap in args.capacities]
    if args.loaded_prefill_tps:
        cells.append(("loaded", args.loaded_capacity, args.loaded_prefill_tps))
    seeds = list(range(args.seed, args.seed + args.seeds))
    per_seed: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    todo = [(s, c, p) for s in seeds for c in cells for p in args.policies]
    tokens = None
    for seed, (load, cap, tps), policy in tqdm(todo, desc="replay"):
        if tokens is None or tokens[0] != seed:
            rng = np.random.default_rng(seed)
            tokens = (seed, rng.integers(0, VOCAB, size=(n_ids, TRACE_BLOCK), dtype=np.uint32))
        t0 = time.perf_counter()
        res = Replay(policy, reqs, tokens[1], argparse.Namespace(**{**vars(args), "seed": seed}), cap, tps).run()
        res.update(seed=seed, wall_s=round(time.perf_counter() - t0, 2))
        per_seed.setdefault((load, cap, policy), []).append(res)
    results: list[dict[str, Any]] = []
    for (load, cap, policy), runs in per_seed.items():
        res = {
            "policy": policy,
            "load": load,
            "capacity_blocks": cap,
            "prefill_tps": next(t for lo, c, t in cells if (lo, c) == (load, cap)),
            "seeds": len(runs),
        }
        for key in ("hit_rate", "ttft_mean_s", "ttft_p99_s", "queue_wait_mean_s", "queue_wait_p99_s"):
            res[key] = float(np.mean([r[key] for r in runs]))
        res["workers"] = runs[0]["workers"] | {
            k: float(np.mean([r["workers"][k] for r in runs]))
            for k in ("requests_max_over_mean", "prefill_tokens_max_over_mean")
        }
        res["workers"]["first_seed_only"] = ["requests", "prefill_tokens", "requests_max", "prefill_tokens_max"]
        for key in ("reasons", "index_overestimates", "index_stats", "subscriber_stats"):
            if key in runs[0]:
                res[key] = runs[0][key]
        res["per_seed"] = [
            {k: r[k] for k in ("seed", "hit_rate", "ttft_mean_s", "ttft_p99_s", "wall_s")} for r in runs
        ]
        results.append(res)
    for res in results:
        oracle = next(
            x
            for x in results
            if (x["load"], x["capacity_blocks"], x["policy"]) == (res["load"], res["capacity_blocks"], "oracle")
        )
        res["vs_oracle"] = res["hit_rate"] / oracle["hit_rate"] if oracle["hit_rate"] else float("nan")
        res["vs_upper_bound"] = res["hit_rate"] / ub
    out = {
        "trace": harness.rel(args.trace),
        "requests": len(reqs),
        "unique_blocks": n_ids,
        "upper_bound_hit_rate": ub,
        "seeds": seeds,
        "runs": results,
    }
    out["targets"] = target_verdicts(out)
    return out


def target_verdicts(rep: dict[str, Any], policy: str = "scheduler") -> list[dict[str, Any]]:
    """Issue 10's replay targets per cell: ``policy``'s hit rate >= 0.95 of the oracle's, and its
    TTFT mean and p99 no worse than the better of round_robin and least_loaded (computed, per cell,
    from the runs of this one invocation)."""
    out = []
    cells = dict.fromkeys((r["load"], r["capacity_blocks"]) for r in rep["runs"])
    for load, cap in cells:
        runs = {r["policy"]: r for r in rep["runs"] if (r["load"], r["capacity_blocks"]) == (load, cap)}
        base = [runs[b] for b in ("round_robin", "least_loaded") if b in runs]
        if policy not in runs or not base:
            continue
        s = runs[policy]
        best_mean = min(b["ttft_mean_s"] for b in base)
        best_p99 = min(b["ttft_p99_s"] for b in base)
        out.append(
            {
                "load": load,
                "capacity_blocks": cap,
                "policy": policy,
                "vs_oracle": s["vs_oracle"],
                "hit_ok": s["vs_oracle"] >= 0.95,
                "ttft_mean_s": s["ttft_mean_s"],
                "best_mean_s": best_mean,
                "mean_ok": s["ttft_mean_s"] <= best_mean,
                "ttft_p99_s": s["ttft_p99_s"],
                "best_p99_s": best_p99,
                "p99_ok": s["ttft_p99_s"] <= best_p99,
            }
        )
    return out


# ---------------------------------------------------------------------- output


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("throughput", "replay") if k in result]
    if "replay" in result:
        panels.append("ttft")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, key in zip(axes[0], panels):
        if key == "throughput":
            rows = result["throughput"]
            x = [str(r["workers"]) for r in rows]
            ax.bar(x, [r["decisions_per_s"] for r in rows], color="tab:blue")
            for i, r in enumerate(rows):
                ax.annotate(
                    f"p50 {r['route_p50_us']:.0f} µs\np99 {r['route_p99_us']:.0f} µs",
                    (i, r["decisions_per_s"]),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
            ax.axhline(5000, color="tab:red", ls="--", lw=1, label="target 5,000/s")
            ax.set_xlabel("workers")
            ax.set_ylabel("route() decisions/s (one core)")
            ax.set_title(f"Decision cost, {result['config']['prompt_tokens']}-token prompts")
            ax.legend(loc="lower left")
            ax.margins(y=0.2)
        elif key == "ttft":
            rep = result["replay"]
            normal = [r for r in rep["runs"] if r["load"] == "normal"]
            caps = sorted({r["capacity_blocks"] for r in normal})
            for j, policy in enumerate(dict.fromkeys(r["policy"] for r in normal)):
                cell = {r["capacity_blocks"]: r for r in normal if r["policy"] == policy}
                color = f"C{j}"
                ax.plot(caps, [cell[c]["ttft_mean_s"] for c in caps], marker="o", color=color, label=f"{policy} mean")
                ax.plot(caps, [cell[c]["ttft_p99_s"] for c in caps], marker="x", ls="--", color=color, lw=1)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(f"KV capacity per engine (blocks of {TRACE_BLOCK} tokens)")
            ax.set_ylabel("simulated TTFT (s): mean (solid), p99 (dashed)")
            ax.set_title(f"TTFT, {Path(rep['trace']).name}")
            ax.legend(fontsize=7)
        else:
            rep = result["replay"]
            normal = [r for r in rep["runs"] if r["load"] == "normal"]
            caps = sorted({r["capacity_blocks"] for r in normal})
            for policy in dict.fromkeys(r["policy"] for r in normal):
                ys = [
                    next(r["hit_rate"] for r in normal if r["policy"] == policy and r["capacity_blocks"] == c)
                    for c in caps
                ]
                ax.plot(caps, ys, marker="o", label=policy)
            ax.axhline(rep["upper_bound_hit_rate"], color="k", ls=":", label="upper bound (infinite shared cache)")
            ax.set_xscale("log")
            ax.set_xlabel(f"KV capacity per engine (blocks of {TRACE_BLOCK} tokens)")
            ax.set_ylabel("prefix-cache hit rate (tokens)")
            ax.set_title(f"Hit rate, {result['config']['sim_workers']} engines, {rep['requests']} requests")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_tables(result: dict[str, Any]) -> None:
    if "throughput" in result:
        print("\n(a) decision cost, one core")
        print(
            f"{'workers':>8} {'index keys':>11} {'route/s':>9} {'p50 us':>8} {'p99 us':>8} {'hash us':>8} "
            f"{'feedback us':>11} {'events us':>9} {'loop/s':>8} {'RSS MB':>7}"
        )
        for r in result["throughput"]:
            print(
                f"{r['workers']:>8} {r['index_keys']:>11,} {r['decisions_per_s']:>9,} {r['route_p50_us']:>8} "
                f"{r['route_p99_us']:>8} {r['hash_p50_us']:>8} {r['feedback_p50_us']:>11} {r['events_mean_us']:>9} "
                f"{r['loop_per_s']:>8,} "
                f"{r['max_rss_mb']:>7}"
            )
    if "replay" in result:
        rep = result["replay"]
        print(f"\n(b) trace replay: {rep['requests']} requests, upper bound hit rate {rep['upper_bound_hit_rate']:.3f}")
        print(
            f"{'load':>6} {'capacity':>8} {'policy':>18} {'hit rate':>9} {'vs oracle':>10} {'vs UB':>7} "
            f"{'TTFT mean':>10} {'TTFT p99':>9}"
        )
        for r in rep["runs"]:
            print(
                f"{r['load']:>6} {r['capacity_blocks']:>8} {r['policy']:>18} {r['hit_rate']:>9.3f} "
                f"{r['vs_oracle']:>10.3f} {r['vs_upper_bound']:>7.3f} {r['ttft_mean_s']:>9.2f}s"
                f" {r['ttft_p99_s']:>8.2f}s"
            )
        print(
            "\nper worker: requests and prefill tokens (computed, not cached), max and mean over workers "
            "(counts: first seed; max/mean: mean over the seeds)"
        )
        print(
            f"{'load':>6} {'capacity':>8} {'policy':>18} {'req max':>8} {'req mean':>9} {'max/mean':>8} "
            f"{'tok max':>11} {'tok mean':>11} {'max/mean':>8}  requests per worker"
        )
        for r in rep["runs"]:
            w = r["workers"]
            print(
                f"{r['load']:>6} {r['capacity_blocks']:>8} {r['policy']:>18} {w['requests_max']:>8} "
                f"{w['requests_mean']:>9.1f} {w['requests_max_over_mean']:>8.2f} {w['prefill_tokens_max']:>11,} "
                f"{w['prefill_tokens_mean']:>11,.0f} {w['prefill_tokens_max_over_mean']:>8.2f}  "
                + " ".join(str(x) for x in w["requests"])
            )
        verdicts = target_verdicts(rep)
        if verdicts:
            print("\ntargets (scheduler vs the oracle's hit rate, and vs the better of round_robin and least_loaded)")
            for v in verdicts:
                print(
                    f"{v['load']:>6} {v['capacity_blocks']:>8} hit/oracle {v['vs_oracle']:.3f} "
                    f"{'ok' if v['hit_ok'] else 'MISSED'}; TTFT mean {v['ttft_mean_s']:.2f}s vs {v['best_mean_s']:.2f}s "
                    f"{'ok' if v['mean_ok'] else 'MISSED'}; p99 {v['ttft_p99_s']:.2f}s vs {v['best_p99_s']:.2f}s "
                    f"{'ok' if v['p99_ok'] else 'MISSED'}"
                )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=["all", "throughput", "replay"], default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--seeds", type=int, default=3, help="replay: repeat every cell with seeds seed..seed+N-1 and report means"
    )
    p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[16, 256, 1024])
    p.add_argument("--decisions", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=200, help="extra warm-up decisions after the speculative TTL")
    p.add_argument("--rate", type=float, default=5000.0, help="simulated request rate (s^-1)")
    p.add_argument(
        "--confirm-delay-s", type=float, default=0.5, help="simulated delay until an engine's KV events arrive"
    )
    p.add_argument("--prompt-tokens", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--convs-per-worker", type=int, default=8, help="cached 7k-token conversations per worker")
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    p.add_argument("--trace-limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument("--sim-workers", type=int, default=16)
    p.add_argument("--capacities", type=lambda s: [int(x) for x in s.split(",")], default=[250, 500, 1000, 2000, 4000])
    p.add_argument(
        "--policies",
        type=lambda s: s.split(","),
        default=["scheduler", "scheduler_approx", "scheduler_weighted", "round_robin", "least_loaded", "oracle"],
    )
    p.add_argument(
        "--engine-reports",
        choices=["full", "basic"],
        default="full",
        help="full: engines also report their measured prefill rate and queued prefill tokens; "
        "basic: only KV usage and queues (the router then relies on its own backlog estimate)",
    )
    p.add_argument(
        "--kv-admission",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="an engine starts a request only when its prompt + output blocks fit next to the running "
        "requests' (as vLLM admits); --no-kv-admission: unlimited running blocks",
    )
    p.add_argument(
        "--speeds",
        type=lambda s: [float(x) for x in s.split(",")],
        default=None,
        help="relative prefill speed per engine, cycled (e.g. 1,0.5: every other engine at half speed)",
    )
    p.add_argument("--prefill-tps", type=float, default=20000.0, help="simulated prefill tokens/s per engine")
    p.add_argument(
        "--loaded-prefill-tps",
        type=float,
        default=3000.0,
        help="also replay with engines this slow (queues build up); 0 = skip",
    )
    p.add_argument("--loaded-capacity", type=int, default=1000, help="KV capacity for the loaded replay")
    p.add_argument("--tpot-s", type=float, default=0.03, help="simulated seconds per output token")
    p.add_argument("--stats-period-s", type=float, default=1.0, help="simulated stats report period")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if "oracle" not in args.policies:
        args.policies.append("oracle")

    config = {k: (harness.rel(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}  # no machine paths
    stamp = harness.utc_stamp()
    # dirty: only when what this benchmark measures (scheduler/, the benchmark) differs from HEAD
    result = harness.envelope("routing", stamp, config, git_paths=["scheduler", "benchmarks/routing_bench.py"])
    if args.scenario in ("all", "throughput"):
        result["throughput"] = [bench_throughput(n, args) for n in args.workers]
    if args.scenario in ("all", "replay"):
        result["replay"] = bench_replay(args)
    print_tables(result)
    path = args.out_dir / f"routing_{stamp}.json"
    png = harness.write_result(result, path, None if args.no_plot else plot)
    print(f"\nwrote {harness.rel(path)}" + (f" and {png.name}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
