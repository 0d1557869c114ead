"""Token budgets shared by the ingress replicas: a ledger that owns each tenant's bucket, and
leases that the replicas spend locally.

**The ledger** (``BudgetLedger``, one Ray actor per app, by name, ``get_if_exists``) holds each
tenant's global bucket: ``capacity`` = tokens_per_minute, refilled at capacity/60 per second,
level ``L``. It also knows each replica's *balance* ``B_i``: the tokens it holds as a lease, as the
replica last reported it. The refill stops at ``L + sum(B_i) = capacity``: tokens parked in
leases count against the bucket exactly as if they were still in it.

**A replica** (``LeaseClient``, one per ingress replica, with a ``LeasedBudget`` per tenant)
reserves from its own balance, synchronously and without any remote call: a reservation of
``n`` succeeds only if the balance holds ``n``. Refunds at settlement go back to the balance. In
the background, every ``sync_period_s`` (and at once when a balance runs low or a request waits),
one call to the ledger carries, for every tenant, the replica's balance, the tokens it hands back
and the tokens it wants; the answer is a grant, the tenant's global level, and the debt the
ledger took over (a balance below 0: a request that used more than it reserved). A balance is
capped at the lease cap ``max_fraction x capacity`` (or what a waiting request needs, if more);
refunds above the cap are handed back at the next sync.

**Expiry.** A lease not renewed within ``ttl_s`` of the sync that granted it (measured from when
the replica *sent* that sync) is void: the replica stops spending it. The ledger forgets a
replica not heard from for ``2 x ttl_s`` and drops its balance without crediting it, so a
replica that died takes its lease with it (under-use, never overshoot). If the ledger cannot be
reached, leases lapse and the replica answers 429 until it can (fail closed).

**How far the global budget can be overshot.** With one bucket, the tokens charged (reserved
minus refunded) over any interval of length T are at most ``capacity + rate x T``. With leases,
the ledger's count ``L + sum(B_i) <= capacity`` holds at each sync; between two syncs of a
replica its balance grows only by refunds (grants are counted by the ledger as it makes them),
and only up to its lease cap. So over any interval the tenant is charged at most

    capacity + rate x T + sum over ingress replicas of (max_fraction x capacity)

and ``lease.max_fraction`` is the knob: 0.1 with 2 ingress replicas allows 20 % of a minute's
budget on top. A request that used more than it reserved (a prompt longer than announced) adds
its excess once, as debt that the ledger takes from the bucket at the next sync. The test
``tests/unit/test_budget.py`` checks the bound on random schedules, and
``benchmarks/admission_bench.py`` measures the overshoot reached.

Everything here is plain Python: the tests run ``BudgetLedger`` in-process; ``ledger_actor``
makes it a Ray actor (Ray is imported only there).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Awaitable, Callable

logger = logging.getLogger(__name__)
LEDGER_NAME = "pd_serve_budget_ledger"
# (capacity, balance, returned, want) per tenant; the answer: (grant, global level, debt absorbed)
Report = tuple[float, float, float, float]
Reply = tuple[float, float, float]
SyncCall = Callable[[str, dict[str, Report]], Awaitable[dict[str, Reply]]]


class _Holder:
    __slots__ = ("balance", "seen")

    def __init__(self, now: float) -> None:
        self.balance = 0.0
        self.seen = now


class _Global:
    __slots__ = ("capacity", "rate", "level", "stamp", "holders")

    def __init__(self, capacity: float, now: float) -> None:
        self.capacity = float(capacity)
        self.rate = self.capacity / 60.0
        self.level = self.capacity
        self.stamp = now
        self.holders: dict[str, _Holder] = {}


class BudgetLedger:
    """Each tenant's global token bucket and the replicas' leases (module docstring). A plain
    class: ``ledger_actor`` runs it as a Ray actor, tests call it directly."""

    def __init__(self, ttl_s: float = 10.0, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or time.monotonic
        self._forget_s = 2.0 * ttl_s
        self._tenants: dict[str, _Global] = {}

    def _refill(self, g: _Global, now: float) -> None:
        """Refill up to ``now``, never past ``capacity - sum(B_i)``. A replica silent for
        ``2 x ttl_s`` is forgotten at that moment: its lease is void and its balance is not
        credited (the bucket refills from there)."""
        while True:
            due = min((h.seen + self._forget_s for h in g.holders.values()), default=math.inf)
            t = now if now < due else due
            if t > g.stamp:
                g.level += (t - g.stamp) * g.rate
                g.stamp = t
            self._trim(g)
            if due > now:
                return
            for replica in [r for r, h in g.holders.items() if h.seen + self._forget_s <= t]:
                del g.holders[replica]

    @staticmethod
    def _trim(g: _Global) -> None:
        room = g.capacity - sum(h.balance for h in g.holders.values())
        if g.level > room:
            g.level = room

    def sync(self, replica: str, reports: dict[str, Report]) -> dict[str, Reply]:
        """One replica's report for each tenant: ``(capacity, balance, returned, want)``; the
        answer per tenant: ``(grant, level, debt)``. ``returned`` tokens go back to the bucket; a
        negative ``balance`` is debt the bucket takes over (``debt`` = its size, which the replica
        adds back to its balance); the grant is at most ``want`` and what the bucket holds."""
        now = self._clock()
        out: dict[str, Reply] = {}
        for name, (capacity, balance, returned, want) in reports.items():
            g = self._tenants.get(name)
            if g is None:
                g = self._tenants[name] = _Global(capacity, now)
            elif g.capacity != capacity:  # the config changed: the last replica to report wins
                g.capacity, g.rate = float(capacity), capacity / 60.0
            self._refill(g, now)
            h = g.holders.get(replica)
            if h is None:
                h = g.holders[replica] = _Holder(now)
            g.level += returned
            debt = 0.0
            if balance < 0:
                debt = -balance
                g.level -= debt
                balance = 0.0
            h.balance = balance
            h.seen = now
            self._trim(g)
            grant = float(math.floor(min(want, g.level))) if want > 0 and g.level >= 1 else 0.0
            g.level -= grant
            h.balance += grant
            out[name] = (grant, g.level, debt)
        return out

    def snapshot(self) -> dict[str, Any]:
        now = self._clock()
        out = {}
        for name, g in self._tenants.items():
            self._refill(g, now)
            out[name] = {"capacity": g.capacity, "level": g.level,
                         "held": {r: h.balance for r, h in g.holders.items()}}
        return out


def ledger_actor(name: str = LEDGER_NAME, *, ttl_s: float = 10.0, namespace: str | None = None,
                 detached: bool = True) -> Any:
    """The app's ledger as a named Ray actor, created by the first replica that asks
    (``get_if_exists``). Detached (default): it outlives the replica that created it and is
    restarted if it dies (with fresh buckets: full, as at start); it stays until Ray stops or
    someone kills it (``ray.kill(ray.get_actor(name, namespace))``)."""
    import ray

    opts: dict[str, Any] = {"name": name, "get_if_exists": True, "num_cpus": 0}
    if namespace is not None:
        opts["namespace"] = namespace
    if detached:
        opts.update(lifetime="detached", max_restarts=-1)
    return ray.remote(BudgetLedger).options(**opts).remote(ttl_s)



def overshoot(events: list[tuple[float, float]], capacity: float, rate: float) -> float:
    """How far a schedule of charges overshoots one token bucket: the most tokens charged
    (reserved minus refunded) over any interval beyond what one bucket of ``capacity`` refilled
    at ``rate`` allows there (capacity + rate x length), or 0. ``events``: (time, tokens) in
    time order, tokens > 0 for a reservation, < 0 for a refund. One pass: for the interval from
    event i+1 to event j the excess is S_j - S_i - rate (t_j - t_{i+1}) - capacity, with S the
    running sum."""
    worst = -math.inf
    best_start = math.inf      # min over i of S_i - rate * t_{i+1}
    s = 0.0
    for t, n in events:
        best_start = min(best_start, s - rate * t)
        s += n
        worst = max(worst, s - rate * t - best_start - capacity)
    return max(worst, 0.0)


# ------------------------------------------------------------------------------------------------
# The replica side


def _resolve(fut: asyncio.Future | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


class LeasedBudget:
    """A tenant's budget at one replica: the ``pd_serve.admission.Budget`` calls, served from
    the replica's lease. Created by ``LeaseClient.budget``."""

    __slots__ = ("name", "capacity", "rate", "lease_max", "balance", "returned", "pending", "hint",
                 "hint_at", "deadline", "spent", "demand", "_client")

    def __init__(self, client: "LeaseClient", name: str, capacity: float, max_fraction: float, now: float) -> None:
        self._client = client
        self.name = name
        self.capacity = float(capacity)
        self.rate = self.capacity / 60.0
        self.lease_max = max(1.0, math.floor(self.capacity * max_fraction))
        self.balance = 0.0          # tokens of the lease not reserved
        self.returned = 0.0         # to hand back at the next sync
        self.pending = 0.0          # tokens that waiting requests need
        self.hint = self.capacity   # the tenant's global level at the last sync (optimistic before it)
        self.hint_at = now
        self.deadline = -math.inf   # the lease is void after this (local clock)
        self.spent = 0.0            # net reserved since the last sync (for the adaptive lease size)
        self.demand = 0.0           # moving average of that, per sync

    def try_reserve(self, n: float, now: float) -> bool:
        if n <= self.balance and now <= self.deadline:
            self.balance -= n
            self.spent += n
            if self.balance < self.lease_max / 2:
                self._client.wake()
            return True
        self._lapse(now)
        self._client.wake()
        return False

    def refund(self, n: float, now: float) -> None:
        self.balance += n
        self.spent -= n
        self.trim()

    def trim(self) -> None:
        """Keep the balance within the lease cap (or what waiting requests need); the rest is
        handed back at the next sync."""
        cap = self.lease_max if self.pending < self.lease_max else self.pending
        if self.balance > cap:
            self.returned += self.balance - cap
            self.balance = cap

    def _lapse(self, now: float) -> None:
        if now > self.deadline and self.balance > 0:
            self.balance = 0.0  # a void lease: the ledger will forget it, not credit it

    def _global(self, now: float) -> float:
        return min(self.capacity, self.hint + (now - self.hint_at) * self.rate)

    def available(self, now: float) -> float:
        """This replica's lease (and what it is about to hand back) plus the tenant's global
        level as of the last sync, refilled since: the tenant's remaining tokens as far as this
        replica knows (other replicas' leases excluded)."""
        own = self.balance if now <= self.deadline else min(self.balance, 0.0)
        return own + self.returned + max(0.0, self._global(now))

    def reset_s(self, now: float) -> float:
        return max(0.0, (self.capacity - self.available(now)) / self.rate)

    def retry_after(self, n: float, now: float) -> float:
        return max(0.0, (n - self.available(now)) / self.rate)

    def can_top_up(self, n: float, now: float) -> bool:
        """Worth waiting for the next sync: the tenant's budget (as last seen) holds ``n``."""
        return self._client.wait_s > 0 and n <= max(self.balance, 0.0) + max(0.0, self._global(now))

    def target(self) -> float:
        """The balance to keep: twice the demand of a sync period, between a quarter of the lease
        cap and the cap, or what waiting requests need."""
        return max(min(self.lease_max, max(self.lease_max / 4, 2.0 * self.demand)), self.pending)


class LeaseClient:
    """One ingress replica's side of the ledger: a ``LeasedBudget`` per tenant and the one
    background task that syncs them all. ``call(replica_id, reports)`` reaches the ledger."""

    def __init__(self, call: SyncCall, replica_id: str, *, max_fraction: float = 0.1, sync_period_s: float = 0.5,
                 ttl_s: float = 10.0, wait_s: float = 0.25, clock: Callable[[], float] | None = None) -> None:
        self._call = call
        self.replica_id = replica_id
        self.max_fraction, self.sync_period_s, self.ttl_s, self.wait_s = max_fraction, sync_period_s, ttl_s, wait_s
        self._clock = clock or time.monotonic
        self.budgets: dict[str, LeasedBudget] = {}
        self._woken = False
        self._wake_fut: asyncio.Future | None = None
        self._synced: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._last_sync = -math.inf
        self._failures = 0
        self.syncs = 0

    @classmethod
    def for_ledger(cls, ledger: Any, replica_id: str, lease: Any, clock: Callable[[], float] | None = None
                   ) -> "LeaseClient":
        """A client of ``ledger``: a Ray actor handle of ``BudgetLedger``, an in-process
        ``BudgetLedger``, or a ``sync``-shaped coroutine function. ``lease``: the config's
        ``admission.lease``."""
        if hasattr(getattr(ledger, "sync", None), "remote"):
            async def call(replica: str, reports: dict[str, Report]) -> dict[str, Reply]:
                return await ledger.sync.remote(replica, reports)
        elif isinstance(ledger, BudgetLedger):
            async def call(replica: str, reports: dict[str, Report]) -> dict[str, Reply]:
                return ledger.sync(replica, reports)
        else:
            call = ledger
        return cls(call, replica_id, max_fraction=lease.max_fraction, sync_period_s=lease.sync_period_s,
                   ttl_s=lease.ttl_s, wait_s=lease.wait_s, clock=clock)

    def budget(self, name: str, capacity: float) -> LeasedBudget:
        b = self.budgets.get(name)
        if b is None:
            b = self.budgets[name] = LeasedBudget(self, name, capacity, self.max_fraction, self._clock())
        return b

    # -- the protocol, one step at a time (the tests drive these directly) -----------------------
    def prepare(self, now: float) -> dict[str, Report]:
        """This replica's reports; moves the tokens to hand back out of the balances."""
        reports = {}
        for name, b in self.budgets.items():
            b._lapse(now)
            b.demand += 0.3 * (max(b.spent, 0.0) - b.demand)
            b.spent = 0.0
            target = b.target()
            if b.balance > target:  # demand fell: what it no longer needs goes back to the others
                b.returned += b.balance - target
                b.balance = target
            ret, b.returned = b.returned, 0.0
            reports[name] = (b.capacity, b.balance, ret, max(0.0, target - b.balance))
        return reports

    def apply(self, reports: dict[str, Report], replies: dict[str, Reply], sent_at: float) -> None:
        """The ledger's answer to ``reports`` sent at ``sent_at`` (local clock)."""
        now = self._clock()
        for name, (grant, level, debt) in replies.items():
            b = self.budgets.get(name)
            if b is None:
                continue
            b.balance += grant + debt
            b.hint, b.hint_at = level, now
            b.deadline = sent_at + self.ttl_s

    def failed(self, reports: dict[str, Report]) -> None:
        """The sync did not reach the ledger: keep what was to be handed back for the next one."""
        for name, (_, _, ret, _) in reports.items():
            if name in self.budgets:
                self.budgets[name].returned += ret

    async def sync_once(self) -> bool:
        sent_at = self._clock()
        reports = self.prepare(sent_at)
        self._last_sync = sent_at
        try:
            replies = await self._call(self.replica_id, reports)
        except asyncio.CancelledError:
            self.failed(reports)
            raise
        except Exception as e:  # noqa: BLE001 - the ledger is away: leases lapse after ttl_s
            self.failed(reports)
            self._failures += 1
            if self._failures in (1, 10) or self._failures % 100 == 0:
                logger.warning("budget ledger unreachable (%d failed syncs): %r; leases lapse %g s after "
                               "the last good one", self._failures, e, self.ttl_s)
            ok = False
        else:
            self.apply(reports, replies, sent_at)
            self._failures = 0
            self.syncs += 1
            ok = True
        fut, self._synced = self._synced, None
        if fut is not None and not fut.done():
            fut.set_result(ok)
        return ok

    # -- the background task ---------------------------------------------------------------------
    async def start(self) -> None:
        """First leases now (a failure is logged, not raised), then a sync every period."""
        await self.sync_once()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="pd-serve-budget-leases")

    async def _loop(self) -> None:
        # plain futures, not asyncio.wait_for: in Python 3.11 wait_for can swallow a cancel
        loop = asyncio.get_running_loop()
        min_gap = min(0.05, self.sync_period_s / 4)
        while True:
            if not self._woken:
                fut = self._wake_fut = loop.create_future()
                timer = loop.call_later(self.sync_period_s, _resolve, fut)
                try:
                    await fut
                finally:
                    timer.cancel()
                    self._wake_fut = None
            self._woken = False
            gap = self._last_sync + min_gap - self._clock()
            if gap > 0:
                await asyncio.sleep(gap)
            await self.sync_once()

    def wake(self) -> None:
        """Sync soon (a balance ran low, or a request waits)."""
        self._woken = True
        _resolve(self._wake_fut)

    async def wait_sync(self, timeout: float) -> bool:
        """Wait for the next sync to end (at most ``timeout``); False on timeout or failure."""
        if self._synced is None:
            self._synced = asyncio.get_running_loop().create_future()
        fut = self._synced
        self.wake()
        done, _ = await asyncio.wait((fut,), timeout=timeout)
        return bool(done) and fut.result()

    async def wait_reserve(self, b: LeasedBudget, n: float) -> bool:
        """Reserve ``n`` from ``b`` once a sync brings tokens, within ``wait_s``. True if reserved."""
        deadline = self._clock() + self.wait_s
        b.pending += n
        try:
            while True:
                left = deadline - self._clock()
                if left <= 0:
                    return False
                await self.wait_sync(left)
                now = self._clock()
                if b.try_reserve(n, now):
                    return True
                if not b.can_top_up(n, now):
                    return False
        finally:
            b.pending -= n
            b.trim()

    async def close(self) -> None:
        """Stop syncing and hand every unspent token back."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
            self._task = None
        for b in self.budgets.values():
            if b.balance > 0:
                b.returned += b.balance
                b.balance = 0.0
            b.deadline = -math.inf
            b.demand = b.spent = 0.0
        reports = {name: (b.capacity, min(b.balance, 0.0), b.returned, 0.0) for name, b in self.budgets.items()}
        for b in self.budgets.values():
            b.returned = 0.0
        try:
            await self._call(self.replica_id, reports)
        except Exception as e:  # noqa: BLE001
            logger.warning("could not hand leases back to the budget ledger: %r", e)
