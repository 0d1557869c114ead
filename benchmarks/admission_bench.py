#!/usr/bin/env python
"""Admission benchmark (pd_serve/admission.py, pd_serve/budget.py): what admit + settle cost per
request, and how far token leases overshoot a tenant's budget.

**Cost** (one process, one asyncio loop, prometheus metrics on, as in the ingress). ``--tasks``
concurrent tasks each run requests in a loop: ``admit`` (key check, concurrency cap, token
reservation, slot), then ``--hold`` yields to the loop (other tasks' requests interleave, so many
tickets are open at once), then ``settle`` with a random usage (a refund). The time of each
``admit`` call and each ``settle`` call is measured (``perf_counter_ns``) and summed per request.
Scenarios, over ``--tenants`` tenants (one key each, requests spread uniformly):

- ``local``: token budgets (a bucket per tenant, never exhausted) and concurrency caps; no slots.
- ``slots``: the same plus ``max_in_flight`` slots, fewer than the tasks, so requests queue by
  priority class (three classes). A queued request's admit includes its wait: only the admits
  that did not wait are in the percentiles; the queued ones are counted, and the loop's CPU time
  per request is reported for the whole scenario next to ``baseline`` (the same loop with no
  admission at all).
- ``leases``: token budgets leased from an in-process ``BudgetLedger`` through a call that takes
  ``--ledger-latency-ms`` (a stand-in for the Ray actor call), synced every 0.5 s and on demand.
- ``over_budget``: every tenant's budget is exhausted: the cost of a 429 with its headers.

**Overshoot** (simulated time, no sleeping). ``--replicas`` ingress replicas on one tenant's
budget, each with Poisson arrivals at ``--overload`` x the budget's rate shared among them;
requests of 50-500 prompt tokens + 50-500 max_tokens that use a random part of it and last
1-30 s; every replica syncs each 0.5 s and when a request waits for a top-up. Two load patterns:
``steady`` (the whole time) and ``bursty`` (the same load on average, in bursts of 20 s every
90 s: requests still running settle while the bucket refills, the case where refunds can
overshoot). Over
``--sim-minutes``, the most tokens charged (reserved - refunded) in any interval beyond one
bucket's allowance (``pd_serve.budget.overshoot``) is compared with the bound, the sum of the
replicas' lease caps, for each ``--fractions`` value and seed. Plus the tight case from
tests/unit/test_budget.py.

Writes ``benchmarks/results/admission_<UTC>.json`` (harness envelope) and a PNG.

    .venv/bin/python -m benchmarks.admission_bench             # ~30 s
    .venv/bin/python -m benchmarks.admission_bench --requests 20000 --sim-minutes 5
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import heapq
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import harness
from pd_serve import errors
from pd_serve.admission import Admission, TokenBucket, hash_key
from pd_serve.budget import BudgetLedger, LeaseClient, overshoot
from pd_serve.config import AdmissionSection

# ------------------------------------------------------------------------------------------------
# Cost


def _section(tenants: int, *, tpm: int | None, cap: int | None, slots: int | None,
             sync_period_s: float = 0.5) -> AdmissionSection:
    classes = ("interactive", "standard", "batch")
    return AdmissionSection.model_validate({
        "tenants": [{"name": f"t{i:03d}", "api_keys": [hash_key(f"sk-bench-{i:03d}")], "priority": classes[i % 3],
                     "tokens_per_minute": tpm, "max_concurrent_requests": cap} for i in range(tenants)],
        "max_in_flight": slots, "max_queued": 100000,
        "classes": [{"name": c, "max_queue": 100000, "max_queue_wait_s": 600} for c in classes],
        "lease": {"max_fraction": 0.1, "sync_period_s": sync_period_s, "ttl_s": 10, "wait_s": 1.0}})


def _pct(xs: list[int], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] / 1000.0  # ns -> us


async def _run(adm: Admission | None, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    headers = [f"Bearer sk-bench-{i:03d}" for i in range(args.tenants)]
    per_task = args.requests // args.tasks
    admit_ns: list[int] = []
    settle_ns: list[int] = []
    total_ns: list[int] = []
    outcomes = {"ok": 0, "queued": 0, "429": 0, "503": 0, "400": 0}
    plan = [[(rng.randrange(args.tenants), rng.randint(50, 500), rng.randint(50, 500), rng.random())
             for _ in range(per_task)] for _ in range(args.tasks)]
    hold = args.hold
    clock = time.perf_counter_ns

    async def task(reqs: list[tuple[int, int, int, float]]) -> None:
        for tenant, prompt, max_tokens, frac in reqs:
            if adm is None:  # baseline: the loop alone
                for _ in range(hold):
                    await asyncio.sleep(0)
                continue
            t0 = clock()
            try:
                ticket = await adm.admit(headers[tenant], prompt, max_tokens)
            except errors.PDServeError as e:
                t1 = clock()
                outcomes[str(e.status)] += 1
                admit_ns.append(t1 - t0)
                total_ns.append(t1 - t0)
                continue
            t1 = clock()
            for _ in range(hold):
                await asyncio.sleep(0)
            t2 = clock()
            ticket.settle(prompt, int(frac * max_tokens), "finished")
            t3 = clock()
            settle_ns.append(t3 - t2)
            if ticket.waited_s:
                outcomes["queued"] += 1  # its admit time is mostly waiting: not a cost
                continue
            outcomes["ok"] += 1
            admit_ns.append(t1 - t0)
            total_ns.append(t1 - t0 + t3 - t2)

    if adm is not None:
        await adm.start()
    gc.collect()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(task(p) for p in plan))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    syncs = adm._leases.syncs if adm is not None and adm._leases is not None else None
    if adm is not None:
        await adm.close()
    n = per_task * args.tasks
    return {"requests": n, "outcomes": outcomes, "lease_syncs": syncs, "wall_s": round(wall, 3),
            "requests_per_s": round(n / wall), "cpu_us_per_request": round(cpu / n * 1e6, 2),
            "admit_us": {"p50": _pct(admit_ns, 0.5), "p90": _pct(admit_ns, 0.9), "p99": _pct(admit_ns, 0.99)},
            "settle_us": {"p50": _pct(settle_ns, 0.5), "p90": _pct(settle_ns, 0.9), "p99": _pct(settle_ns, 0.99)},
            "admit_settle_us": {"p50": _pct(total_ns, 0.5), "p90": _pct(total_ns, 0.9),
                                "p99": _pct(total_ns, 0.99), "max": _pct(total_ns, 1.0)},
            "cdf_us": _cdf(total_ns)}


def _cdf(xs: list[int], points: int = 200) -> list[float]:
    """Quantiles 0, 1/points, ..., 1 of ``xs`` (ns) in us: the distribution, small enough to keep."""
    if not xs:
        return []
    xs = sorted(xs)
    return [round(xs[min(len(xs) - 1, int(k / points * len(xs)))] / 1000.0, 2) for k in range(points + 1)]


def bench_cost(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    big = 10**9  # a budget that never runs out
    ledger = BudgetLedger()

    async def ledger_call(replica: str, reports: dict) -> dict:
        await asyncio.sleep(args.ledger_latency_ms / 1000)
        return ledger.sync(replica, reports)

    scenarios = {
        "baseline": lambda: None,
        "local": lambda: Admission(_section(args.tenants, tpm=big, cap=10**6, slots=None)),
        "slots": lambda: Admission(_section(args.tenants, tpm=big, cap=10**6, slots=args.slots)),
        "leases": lambda: Admission(
            _section(args.tenants, tpm=args.lease_tpm, cap=10**6, slots=None),
            leases=LeaseClient.for_ledger(ledger_call, "bench-replica", _section(1, tpm=1, cap=None, slots=None).lease)),
        "over_budget": lambda: _exhausted(args.tenants),
    }
    for name in args.scenarios:
        rng = random.Random(args.seed)
        res = asyncio.run(_run(scenarios[name](), args, rng))
        out[name] = res
        a = {k: float("nan") if v is None else v for k, v in res["admit_settle_us"].items()}
        print(f"  {name:12s} {res['requests']:7d} req  admit+settle p50 {a['p50']:7.1f} us  p99 {a['p99']:7.1f} us  "
              f"cpu/req {res['cpu_us_per_request']:6.1f} us  {res['outcomes']}", flush=True)
    return out


def _exhausted(tenants: int) -> Admission:
    adm = Admission(_section(tenants, tpm=1000, cap=10**6, slots=None))
    for t in adm.tenants.values():
        if t.budget is not None:
            t.budget.level = -10**9  # in debt for ages: every request is a 429
    return adm


# ------------------------------------------------------------------------------------------------
# Overshoot of leases, simulated


class _SimClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def simulate(fraction: float, seed: int, pattern: str, args: argparse.Namespace, ideal: bool = False) -> dict[str, Any]:
    """One run; ``ideal``: the replicas share one in-process bucket instead (the reference)."""
    rng = random.Random(seed)
    capacity = float(args.sim_tpm)
    rate = capacity / 60
    clock = _SimClock()
    ledger = BudgetLedger(ttl_s=10, clock=clock)
    clients = [LeaseClient(_never, f"r{i}", max_fraction=fraction, sync_period_s=0.5, ttl_s=10, wait_s=0.25,
                           clock=clock) for i in range(args.replicas)]
    budgets: list[Any] = [c.budget("t", capacity) for c in clients]
    if ideal:
        shared = TokenBucket(capacity, 0.0)
        budgets = [shared] * args.replicas

    def sync(i: int) -> None:
        if not ideal:
            sent = clock.t
            reports = clients[i].prepare(sent)
            clients[i].apply(reports, ledger.sync(clients[i].replica_id, reports), sent)

    mean_need = 550.0
    arrival_rate = args.overload * rate / mean_need / args.replicas  # requests/s per replica
    if pattern == "bursty":
        arrival_rate *= 90 / 20  # the same offered load on average, all of it in the bursts
    end = args.sim_minutes * 60.0
    heap: list[tuple[float, int, str, int, float]] = []
    seq = 0

    def push(t: float, kind: str, i: int, x: float = 0.0) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (t, seq, kind, i, x))

    for i in range(args.replicas):
        push(rng.expovariate(arrival_rate), "arrive", i)
        push(rng.uniform(0, 0.5), "sync", i)
    events: list[tuple[float, float]] = []
    admitted = rejected = 0
    while heap:
        t, _, kind, i, x = heapq.heappop(heap)
        if t > end:
            break
        clock.t = t
        if kind == "sync":
            sync(i)
            push(t + 0.5, "sync", i)
        elif kind == "arrive":
            nxt = t + rng.expovariate(arrival_rate)
            if pattern == "bursty" and nxt % 90.0 >= 20.0:  # 20 s on, 70 s off
                nxt = (nxt // 90.0 + 1) * 90.0 + rng.expovariate(arrival_rate)
            push(nxt, "arrive", i)
            need = rng.randint(50, 500) + rng.randint(50, 500)
            lasts, used = rng.uniform(1, 30), math.floor(rng.random() * 0.9 * need)
            b = budgets[i]
            ok = b.try_reserve(need, t)
            if not ok and b.can_top_up(need, t):  # waits for one on-demand sync (zero latency here)
                b.pending += need
                sync(i)
                b.pending -= need
                ok = b.try_reserve(need, t)
                b.trim()
            if ok:
                admitted += 1
                events.append((t, need))
                push(t + lasts, "settle", i, need - used)
            else:
                rejected += 1
        else:  # settle: refund x
            budgets[i].refund(x, t)
            events.append((t, -x))
    over = overshoot(events, capacity, rate)
    bound = sum(b.lease_max for b in budgets) if not ideal else 0.0
    charged = sum(n for _, n in events)
    return {"pattern": pattern, "fraction": None if ideal else fraction, "seed": seed,
            "overshoot_tokens": round(over, 1), "bound_tokens": bound,
            "overshoot_of_budget": round(over / capacity, 4), "bound_of_budget": round(bound / capacity, 4),
            "admitted": admitted, "rejected": rejected, "charged_tokens": charged,
            "charged_per_min_of_budget": round(charged / (end / 60) / capacity, 3)}


def _never(*_: Any) -> Any:
    raise AssertionError("the simulation syncs by hand")


def tight_case() -> dict[str, Any]:
    """tests/unit/test_budget.py's schedule that reaches one lease cap."""
    clock = _SimClock()
    ledger = BudgetLedger(ttl_s=100, clock=clock)
    a, b = (LeaseClient(_never, n, max_fraction=0.1, ttl_s=100, clock=clock) for n in "ab")
    ba, bb = a.budget("t", 1000), b.budget("t", 1000)

    def sync(c: LeaseClient, want: float = 0) -> None:
        bud = c.budgets["t"]
        bud.pending += want
        reports = c.prepare(clock.t)
        c.apply(reports, ledger.sync(c.replica_id, reports), clock.t)
        bud.pending -= want

    ev = []
    sync(a, 100)
    sync(b, 900)
    ba.try_reserve(100, clock.t)
    bb.try_reserve(900, clock.t)
    ev.append((clock.t, 1000))
    sync(a)
    sync(b)
    clock.t += 60
    ba.refund(100, clock.t)
    ev.append((clock.t, -100))
    sync(b, 1000)
    bb.try_reserve(1000, clock.t)
    ev.append((clock.t, 1000))
    ba.try_reserve(100, clock.t)
    ev.append((clock.t, 100))
    return {"capacity": 1000, "lease_cap": ba.lease_max, "overshoot_tokens": overshoot(ev, 1000, 1000 / 60)}


def bench_overshoot(args: argparse.Namespace) -> dict[str, Any]:
    runs = [simulate(f, s, pat, args) for pat in ("steady", "bursty") for f in args.fractions
            for s in range(args.seeds)]
    ideal = {(pat, s): simulate(0, s, pat, args, ideal=True) for pat in ("steady", "bursty") for s in range(args.seeds)}
    for r in runs:  # how much of what one bucket admits the leases admit (under-use is the price)
        r["charged_vs_one_bucket"] = round(r["charged_tokens"] / ideal[(r["pattern"], r["seed"])]["charged_tokens"], 4)
    for r in runs:
        print(f"  {r['pattern']:6s} fraction {r['fraction']:<5} seed {r['seed']}  overshoot {r['overshoot_tokens']:8.1f} tokens "
              f"({100 * r['overshoot_of_budget']:5.2f} % of the budget; bound {100 * r['bound_of_budget']:5.1f} %)  "
              f"admitted {r['admitted']}, rejected {r['rejected']}, charged {r['charged_vs_one_bucket']:.3f} x "
              "one bucket's", flush=True)
    tight = tight_case()
    print(f"  tight case: overshoot {tight['overshoot_tokens']:.0f} tokens = one lease cap ({tight['lease_cap']:.0f})")
    return {"runs": runs, "one_bucket": list(ideal.values()), "tight_case": tight}


# ------------------------------------------------------------------------------------------------


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, res in result.get("cost", {}).items():
        xs = res.get("cdf_us") or []
        if xs:
            ax1.plot(xs, [k / (len(xs) - 1) for k in range(len(xs))],
                     label=f"{name} (p50 {res['admit_settle_us']['p50']:.1f} us)")
    ax1.axvline(500, color="red", ls="--", lw=1, label="target p50 500 us")
    ax1.set_xscale("log")
    ax1.set_xlabel("admit + settle per request (us, log)")
    ax1.set_ylabel("fraction of requests")
    ax1.set_title("Admission cost, one process")
    ax1.legend(fontsize=8)
    runs = result.get("overshoot", {}).get("runs", [])
    fr = sorted({r["fraction"] for r in runs})
    for k, f in enumerate(fr):
        for j, pat in enumerate(("steady", "bursty")):
            ys = [100 * r["overshoot_of_budget"] for r in runs if r["fraction"] == f and r["pattern"] == pat]
            ax2.scatter([k - 0.1 + 0.2 * j] * len(ys), ys, color=f"C{j}",
                        label=f"measured, {pat} load (each seed)" if k == 0 else None)
        ax2.hlines(100 * runs[[r["fraction"] for r in runs].index(f)]["bound_of_budget"], k - 0.3, k + 0.3,
                   color="red", label="bound: sum of lease caps" if k == 0 else None)
    ax2.set_xticks(range(len(fr)), [f"max_fraction {f}" for f in fr])
    ax2.set_ylabel("overshoot, % of tokens_per_minute")
    ax2.set_title(f"Lease overshoot, {result['config']['replicas']} replicas, "
                  f"{result['config']['overload']}x overload (simulated)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=60000, help="requests per cost scenario")
    p.add_argument("--tasks", type=int, default=256, help="concurrent asyncio tasks")
    p.add_argument("--tenants", type=int, default=100)
    p.add_argument("--hold", type=int, default=2, help="loop yields between admit and settle")
    p.add_argument("--slots", type=int, default=64, help="max_in_flight of the `slots` scenario")
    p.add_argument("--lease-tpm", type=int, default=2_000_000, help="tokens_per_minute per tenant, `leases`")
    p.add_argument("--ledger-latency-ms", type=float, default=1.0)
    p.add_argument("--scenarios", nargs="+", default=["baseline", "local", "slots", "leases", "over_budget"])
    p.add_argument("--replicas", type=int, default=4, help="ingress replicas in the overshoot simulation")
    p.add_argument("--overload", type=float, default=3.0, help="offered tokens (reserved) / budget in the simulation")
    p.add_argument("--sim-tpm", type=int, default=100_000)
    p.add_argument("--sim-minutes", type=float, default=10.0)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.25])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=harness.RESULTS_DIR)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    config = {k: (harness.rel(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    stamp = harness.utc_stamp()
    result = harness.envelope("admission", stamp, config,
                              git_paths=["pd_serve/admission.py", "pd_serve/budget.py", "pd_serve/metrics.py",
                                         "benchmarks/admission_bench.py"])
    print("cost (admit + settle, us):", flush=True)
    result["cost"] = bench_cost(args)
    print("lease overshoot (simulated):", flush=True)
    result["overshoot"] = bench_overshoot(args)
    path = args.out_dir / f"admission_{stamp}.json"
    png = harness.write_result(result, path, None if args.no_plot else plot)
    print(f"\nwrote {harness.rel(path)}" + (f" and {png.name}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
