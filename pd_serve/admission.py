"""Admission control at the ingress: tenants and API keys, token budgets with reservations,
per-tenant concurrency caps, priority classes with bounded queues, overload shedding and early
rejection. Pure Python and asyncio; the budgets shared across ingress replicas live in
``pd_serve.budget``. docs/admission.md is the user's guide.

What the ingress calls (one ``Admission`` per ingress replica, built from the config)::

    adm = Admission.from_config(cfg, replica_id=..., ledger=...)   # in __init__
    await adm.start()                                              # once the loop runs (leases)
    tenant = adm.authenticate(request.headers.get("authorization"))   # raises Unauthorized (401)
    ticket = await adm.admit_tenant(tenant, prompt_tokens, max_tokens)  # raises RateLimited (429),
                                                                        # Unavailable (503), BadRequest (400)
    try:
        ... response with ticket.headers() ...
        ticket.first_token()                       # when the first byte goes out (feeds the TTFT average)
        ticket.settle(prompt_tokens, completion_tokens, "finished" | "aborted" | "failed")
    finally:
        ticket.release()                           # no-op after settle; else charges the whole reservation
    await adm.close()                              # on shutdown: hands unspent leases back

``admit(key_header, prompt_tokens, max_tokens)`` does ``authenticate`` and ``admit_tenant`` in one.
Every error raised is a ``pd_serve.errors.PDServeError`` whose ``headers`` (Retry-After,
``x-ratelimit-*``) belong on the response.

Keys: the config holds only sha256 hashes (or ``env:VAR`` / ``file:PATH``, read and hashed at
start-up). A presented key is hashed and looked up in a dict of digests, then confirmed with
``hmac.compare_digest``; what a lookup's timing could reveal is about the digest, which does not
help guess a key. Keys are never logged: a digest's first 8 hex digits at most.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import os
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from pd_serve.errors import BadRequest, PDServeError, RateLimited, Unauthorized, Unavailable

if TYPE_CHECKING:
    from pd_serve.budget import LeaseClient
    from pd_serve.config import AdmissionSection, AppConfig

logger = logging.getLogger(__name__)
OUTCOMES = ("finished", "aborted", "failed")
_EWMA_ALPHA = 0.1


class KeyConfigError(ValueError):
    """A key reference that cannot be read at start-up (an unset variable, a missing file)."""


def key_digest(key: str) -> bytes:
    """sha256 of a key (whitespace around it stripped), the form the config and lookups use."""
    return hashlib.sha256(key.strip().encode()).digest()


def hash_key(key: str) -> str:
    """The config's ``sha256:<hex>`` for a plaintext key."""
    return "sha256:" + key_digest(key).hex()


def resolve_key_ref(ref: str, environ: Mapping[str, str] | None = None) -> bytes:
    """A config key reference as a sha256 digest: ``sha256:<hex>`` as written, ``env:VAR`` and
    ``file:PATH`` read now and hashed. Raises KeyConfigError naming the variable or file (never
    a key)."""
    environ = os.environ if environ is None else environ
    kind, _, rest = ref.partition(":")
    if kind.lower() == "sha256":
        return bytes.fromhex(rest.strip())
    if kind == "env":
        value = environ.get(rest, "")
        if not value.strip():
            raise KeyConfigError(f"`env:{rest}`: the environment variable {rest} is not set or empty")
        return key_digest(value)
    if kind == "file":
        try:
            value = Path(rest).expanduser().read_text()
        except OSError as e:
            raise KeyConfigError(f"`file:{rest}`: cannot read the key file: {e.strerror or e}") from None
        if not value.strip():
            raise KeyConfigError(f"`file:{rest}`: the key file is empty")
        return key_digest(value)
    raise KeyConfigError(f"not a key reference (`sha256:`, `env:` or `file:`): a {len(ref)}-character value")


def short(digest: bytes) -> str:
    """What may be logged of a key: its digest's first 8 hex digits."""
    return digest.hex()[:8]


def duration(seconds: float) -> str:
    """A duration as OpenAI writes ``x-ratelimit-reset-*``: ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    minutes, sec = divmod(round(seconds, 3), 60)
    s = f"{sec:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{s}s" if minutes else f"{s}s"


def retry_headers(seconds: float, floor: float = 0.05) -> dict[str, str]:
    """``Retry-After`` (whole seconds, at least 1) and ``retry-after-ms`` (the OpenAI clients
    read it first), for a retry in ``seconds`` (at least ``floor``)."""
    seconds = max(seconds, floor)
    return {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(math.ceil(seconds * 1000))}


# ------------------------------------------------------------------------------------------------
# Budgets


class Budget(Protocol):
    """A tenant's token budget as admission uses it: ``TokenBucket`` (one process) or
    ``pd_serve.budget.LeasedBudget`` (shared by the ingress replicas through a ledger)."""

    capacity: float
    rate: float

    def try_reserve(self, n: float, now: float) -> bool: ...
    def refund(self, n: float, now: float) -> None: ...
    def available(self, now: float) -> float: ...
    def reset_s(self, now: float) -> float: ...
    def retry_after(self, n: float, now: float) -> float: ...
    def can_top_up(self, n: float, now: float) -> bool: ...


class TokenBucket:
    """A token bucket with reservations: ``capacity`` tokens, refilled continuously at ``rate``
    per second (tokens_per_minute / 60).

    ``try_reserve(n)`` takes ``n`` only if the bucket holds ``n`` now, so concurrent admissions
    never take more than the bucket holds. ``refund(n)`` gives back what a request did not use
    (negative: charges what it used beyond its reservation; the level may then go below 0 and
    refills from there). The level never exceeds ``capacity``."""

    __slots__ = ("capacity", "rate", "level", "stamp")

    def __init__(self, capacity: float, now: float, rate: float | None = None) -> None:
        self.capacity = float(capacity)
        self.rate = self.capacity / 60.0 if rate is None else float(rate)
        self.level = self.capacity
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            level = self.level + (now - self.stamp) * self.rate
            self.level = level if level < self.capacity else self.capacity
            self.stamp = now

    def try_reserve(self, n: float, now: float) -> bool:
        self._refill(now)
        if n <= self.level:
            self.level -= n
            return True
        return False

    def refund(self, n: float, now: float) -> None:
        self._refill(now)
        level = self.level + n
        self.level = level if level < self.capacity else self.capacity

    def available(self, now: float) -> float:
        self._refill(now)
        return self.level

    def reset_s(self, now: float) -> float:
        """Seconds until the bucket is full again."""
        self._refill(now)
        return max(0.0, (self.capacity - self.level) / self.rate)

    def retry_after(self, n: float, now: float) -> float:
        """Seconds until ``n`` tokens can be reserved (refunds of requests in flight aside)."""
        self._refill(now)
        return max(0.0, (n - self.level) / self.rate)

    def can_top_up(self, n: float, now: float) -> bool:
        """Whether waiting for more tokens could help (leases only)."""
        return False


# ------------------------------------------------------------------------------------------------
# Tenants, classes, tickets


class _Null:
    """A metric child that does nothing (``metrics=False``)."""

    def inc(self, *_: Any) -> None: ...
    def dec(self, *_: Any) -> None: ...
    def set(self, *_: Any) -> None: ...


_NULL = _Null()


class Tenant:
    """A tenant at run time: its class, limits, budget, what it has open, its metric children."""

    __slots__ = ("name", "cls", "cap", "budget", "active", "m_ok", "m_queued", "m_reserved", "m_used",
                 "m_refunded")

    def __init__(self, name: str, cls: "_Class", cap: int | None, budget: Budget | None, metrics: bool) -> None:
        self.name, self.cls, self.cap, self.budget = name, cls, cap, budget
        self.active = 0  # admitted (queued or holding a slot) and not yet settled, at this replica
        if metrics:
            from pd_serve import metrics as m

            self.m_ok = m.ADMISSIONS.labels(name, "admitted", "ok")
            self.m_queued = m.ADMISSIONS.labels(name, "admitted", "queued")
            self.m_reserved = m.ADMISSION_TOKENS_RESERVED.labels(name)
            self.m_used = m.ADMISSION_TOKENS_USED.labels(name)
            self.m_refunded = m.ADMISSION_TOKENS_REFUNDED.labels(name)
        else:
            self.m_ok = self.m_queued = self.m_reserved = self.m_used = self.m_refunded = _NULL

    def __repr__(self) -> str:
        return f"Tenant({self.name!r}, {self.cls.name})"


class _Class:
    """A priority class at run time: its queue of waiters and its slots in use."""

    __slots__ = ("name", "index", "max_queue", "deadline_s", "max_wait_s", "queue", "in_flight", "m_depth",
                 "m_in_flight")

    def __init__(self, name: str, index: int, max_queue: int, deadline_s: float | None, max_wait_s: float,
                 metrics: bool) -> None:
        self.name, self.index, self.max_queue = name, index, max_queue
        self.deadline_s, self.max_wait_s = deadline_s, max_wait_s
        self.queue: deque[_Waiter] = deque()
        self.in_flight = 0
        if metrics:
            from pd_serve import metrics as m

            self.m_depth = m.ADMISSION_QUEUE_DEPTH.labels(name)
            self.m_in_flight = m.ADMISSION_IN_FLIGHT.labels(name)
        else:
            self.m_depth = self.m_in_flight = _NULL


class _Shed(Unavailable):
    """A queued request shed to make room for a higher class (a 503 like any overload)."""


class _Waiter:
    __slots__ = ("fut", "timer")

    def __init__(self, fut: asyncio.Future) -> None:
        self.fut = fut
        self.timer: asyncio.TimerHandle | None = None


class Ticket:
    """One admitted request. ``settle`` and ``release`` are idempotent and safe in ``finally``;
    the first of them to run ends the ticket: the tenant's reservation is settled, its
    concurrency count and (if it held one) its slot are freed."""

    __slots__ = ("_adm", "tenant", "reserved", "prompt_tokens", "max_tokens", "slot_at", "first_at",
                 "waited_s", "_slot", "_done")

    def __init__(self, adm: "Admission", tenant: Tenant, reserved: int, prompt_tokens: int, max_tokens: int) -> None:
        self._adm, self.tenant = adm, tenant
        self.reserved, self.prompt_tokens, self.max_tokens = reserved, prompt_tokens, max_tokens
        self.slot_at = 0.0      # when it got its slot (or was admitted, without slots)
        self.first_at = 0.0     # when first_token() was called
        self.waited_s = 0.0     # time spent in the queue
        self._slot = False
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def headers(self) -> dict[str, str]:
        """``x-ratelimit-*`` of the tenant, now (after this request's reservation)."""
        return self._adm.headers(self.tenant)

    def first_token(self) -> None:
        """The first byte went to the client: feeds the time-to-first-token average that early
        rejection adds to the predicted queue wait."""
        if not self.first_at and not self._done:
            self.first_at = self._adm._clock()
            self._adm.observe(ttft_s=self.first_at - self.slot_at)

    def settle(self, prompt_tokens: int, completion_tokens: int, outcome: str = "finished") -> None:
        """The request ended (``finished``, ``aborted`` or ``failed``) having used these tokens:
        refunds the rest of the reservation (charges the excess if it used more)."""
        if not self._done:
            self._adm._end(self, prompt_tokens + completion_tokens)

    def release(self) -> None:
        """End without known usage (the ``finally`` guard): charges the whole reservation.
        A no-op after ``settle``."""
        if not self._done:
            self._adm._end(self, None)


# ------------------------------------------------------------------------------------------------


class Admission:
    """Admission for one ingress replica. See the module docstring for the calls; every method
    runs on the replica's event loop (none is thread-safe)."""

    def __init__(self, section: "AdmissionSection", legacy_keys: list[str] | tuple[str, ...] = (), *,
                 replicas: int = 1, leases: "LeaseClient | None" = None,
                 clock: Callable[[], float] = time.monotonic, metrics: bool = True,
                 environ: Mapping[str, str] | None = None) -> None:
        self._clock = clock
        self._metrics = metrics
        self._leases = leases
        now = clock()
        self.classes = [_Class(c.name, i, c.max_queue,
                               c.ttft_deadline_s if c.ttft_deadline_s is not None else section.ttft_deadline_s,
                               c.max_queue_wait_s, metrics) for i, c in enumerate(section.classes)]
        by_name = {c.name: c for c in self.classes}
        self.max_in_flight = section.max_in_flight
        self.max_queued = section.max_queued
        self.in_flight = 0
        self.queued = 0
        self.service_s: float | None = None   # moving average: slot held, admission to settlement
        self.ttft_s: float | None = None      # moving average: slot to first byte
        self._keys: dict[bytes, tuple[bytes, Tenant]] = {}  # digest -> (digest, tenant)
        self._revoked: dict[bytes, Tenant] = {}
        self.tenants: dict[str, Tenant] = {}

        def budget(name: str, tpm: int | None) -> Budget | None:
            if tpm is None:
                return None
            if leases is not None:
                return leases.budget(name, tpm)
            return TokenBucket(tpm, now)

        def cap(n: int | None) -> int | None:
            return None if n is None else max(1, math.ceil(n / max(1, replicas)))

        described = []
        for t in section.tenants:
            tenant = Tenant(t.name, by_name[t.priority], cap(t.max_concurrent_requests),
                            budget(t.name, t.tokens_per_minute), metrics)
            self.tenants[t.name] = tenant
            digests = [resolve_key_ref(r, environ) for r in t.api_keys]
            for d in digests:
                self._keys[d] = (d, tenant)
            for r in t.revoked_keys:
                self._revoked[resolve_key_ref(r, environ)] = tenant
            described.append(f"{t.name} ({t.priority}, keys {', '.join(short(d) for d in digests) or 'none'})")
        if legacy_keys:
            tenant = Tenant("default", by_name[section.default_priority], None, None, metrics)
            self.tenants["default"] = tenant
            for k in legacy_keys:
                try:
                    d = resolve_key_ref(k, environ) if k.partition(":")[0] in ("sha256", "env", "file") else None
                except (KeyConfigError, ValueError):
                    d = None
                d = d if d is not None else key_digest(k)
                if d in self._keys:
                    raise KeyConfigError(f"ingress.api_keys: key {short(d)}... is also a key of tenant "
                                         f"{self._keys[d][1].name}; a key belongs to one tenant")
                self._keys[d] = (d, tenant)
            described.append(f"default (ingress.api_keys, deprecated: {len(legacy_keys)} key(s))")
        self.auth_required = bool(self._keys or self._revoked)
        self._anonymous = None
        if not self.auth_required:
            self._anonymous = Tenant("anonymous", by_name[section.default_priority], None, None, metrics)
            self.tenants["anonymous"] = self._anonymous
        if metrics:
            from pd_serve import metrics as m

            m.init_admission_series(list(self.tenants), [c.name for c in self.classes])
            self._m_unauthorized = m.ADMISSIONS.labels("none", "rejected", "unauthorized")
        else:
            self._m_unauthorized = _NULL
        logger.info("admission: %s; slots %s, classes %s", "; ".join(described) or "auth off",
                    self.max_in_flight or "unlimited", [c.name for c in self.classes])

    @classmethod
    def from_config(cls, cfg: "AppConfig", *, replica_id: str = "", ledger: Any = None,
                    **kw: Any) -> "Admission":
        """The ingress's admission. With ``ledger`` (a ``BudgetLedger`` actor handle, or a
        ``sync(replica, reports)`` coroutine function), token budgets are leased from it and
        shared by all ingress replicas; without, each replica enforces them alone (right for one
        ingress replica)."""
        leases = None
        limited = any(t.tokens_per_minute for t in cfg.admission.tenants)
        if ledger is not None and limited:
            from pd_serve.budget import LeaseClient

            leases = LeaseClient.for_ledger(ledger, replica_id, cfg.admission.lease, clock=kw.get("clock"))
        return cls(cfg.admission, cfg.ingress.api_keys, replicas=cfg.ingress.replicas, leases=leases, **kw)

    async def start(self) -> None:
        """Start the lease client's background sync (no-op without leases)."""
        if self._leases is not None:
            await self._leases.start()

    async def close(self) -> None:
        """Hand unspent leases back to the ledger (no-op without leases)."""
        if self._leases is not None:
            await self._leases.close()

    # -- keys ----------------------------------------------------------------------------------
    def authenticate(self, key_header: str | None) -> Tenant:
        """The tenant of an ``Authorization: Bearer <key>`` header value; raises Unauthorized."""
        if self._anonymous is not None:
            return self._anonymous
        if not key_header:
            self._m_unauthorized.inc()
            raise Unauthorized("missing API key: send it as `Authorization: Bearer <key>`")
        scheme, _, key = key_header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            self._m_unauthorized.inc()
            raise Unauthorized("malformed Authorization header: send `Authorization: Bearer <key>`")
        d = key_digest(key)
        entry = self._keys.get(d)
        if entry is not None and hmac.compare_digest(entry[0], d):
            return entry[1]
        revoked = self._revoked.get(d)
        if revoked is not None:
            self._count(revoked.name, "rejected", "revoked")
            raise Unauthorized("this API key has been revoked")
        self._m_unauthorized.inc()
        raise Unauthorized("invalid API key")

    def revoke(self, digest_hex: str) -> bool:
        """Revoke a key at run time (its sha256 hex digest); True if it was a live key."""
        d = bytes.fromhex(digest_hex.removeprefix("sha256:"))
        entry = self._keys.pop(d, None)
        if entry is not None:
            self._revoked[d] = entry[1]
        return entry is not None

    # -- admission -----------------------------------------------------------------------------
    async def admit(self, key_header: str | None, prompt_tokens: int, max_tokens: int) -> Ticket:
        """``authenticate`` then ``admit_tenant``."""
        return await self.admit_tenant(self.authenticate(key_header), prompt_tokens, max_tokens)

    async def admit_tenant(self, tenant: Tenant, prompt_tokens: int, max_tokens: int) -> Ticket:
        """Admit a request of ``prompt_tokens`` that may generate up to ``max_tokens`` (times
        ``n`` choices: pass the product), or raise the error to answer.

        Order: the tenant's concurrency cap (429), a request larger than its whole budget (400),
        the token reservation (429; with leases, a short wait for a top-up when the tenant's
        budget has tokens), then a slot: at once if one is free, else its class's queue, unless
        the queue is full (503, a lower class shed first when only the overall bound is hit) or
        the predicted wait exceeds the class's deadline (503). A queued request waits at most
        its class's ``max_queue_wait_s`` (then 503). Every 429/503 carries Retry-After."""
        now = self._clock()
        need = prompt_tokens + max_tokens
        if tenant.cap is not None and tenant.active >= tenant.cap:
            self._count(tenant.name, "rejected", "concurrency")
            retry = self.service_s if self.service_s is not None else 1.0
            raise RateLimited(
                f"tenant {tenant.name} has {tenant.active} requests in flight, its limit at this ingress "
                f"replica; retry when one ends", headers={**self.headers(tenant, now), **retry_headers(retry, 1.0)})
        b = tenant.budget
        if b is not None:
            if need > b.capacity:
                self._count(tenant.name, "rejected", "too_large")
                raise BadRequest(
                    f"this request needs {need} tokens (prompt {prompt_tokens} + max_tokens {max_tokens}), "
                    f"more than tenant {tenant.name}'s whole budget of {int(b.capacity)} tokens per minute; "
                    "lower max_tokens or shorten the prompt", "max_tokens", headers=self.headers(tenant, now))
            if not b.try_reserve(need, now):
                if b.can_top_up(need, now) and self._leases is not None:
                    tenant.active += 1  # it is open while it waits for a top-up
                    try:
                        got = await self._leases.wait_reserve(b, need)
                    finally:
                        tenant.active -= 1
                    now = self._clock()
                else:
                    got = False
                if not got:
                    self._count(tenant.name, "rejected", "tokens")
                    retry = b.retry_after(need, now)
                    raise RateLimited(
                        f"tenant {tenant.name} is over its token budget: this request needs {need} tokens "
                        f"(prompt {prompt_tokens} + max_tokens {max_tokens}), {max(0, int(b.available(now)))} "
                        f"of {int(b.capacity)} per minute are left; retry in {retry:.1f} s or lower max_tokens",
                        headers={**self.headers(tenant, now), **retry_headers(retry)})
            tenant.m_reserved.inc(need)
        ticket = Ticket(self, tenant, need if b is not None else 0, prompt_tokens, max_tokens)
        tenant.active += 1
        cls = tenant.cls
        if self.max_in_flight is None or self.in_flight < self.max_in_flight:
            self.in_flight += 1
            cls.in_flight += 1
            cls.m_in_flight.inc()
            ticket._slot = True
            ticket.slot_at = now
            tenant.m_ok.inc()
            return ticket
        try:
            await self._wait_for_slot(ticket, cls, now)
        except BaseException:
            ticket._done = True
            tenant.active -= 1
            if b is not None:
                b.refund(ticket.reserved, self._clock())
                tenant.m_refunded.inc(ticket.reserved)
            raise
        tenant.m_queued.inc()
        return ticket

    async def _wait_for_slot(self, ticket: Ticket, cls: _Class, now: float) -> None:
        tenant = ticket.tenant
        if len(cls.queue) >= cls.max_queue:
            self._reject_overload(tenant, "queue_full", f"the {cls.name} queue is full ({cls.max_queue} waiting)",
                                  self._predicted_wait(cls), now)
        if cls.deadline_s is not None and self.service_s is not None:
            predicted = self._predicted_wait(cls)
            if predicted > cls.deadline_s:
                self._reject_overload(tenant, "deadline", f"the predicted wait of {predicted:.1f} s exceeds the "
                                      f"{cls.name} deadline of {cls.deadline_s:g} s", predicted, now)
        if self.queued >= self.max_queued and not self._shed_below(cls):
            self._reject_overload(tenant, "queue_full", f"the admission queues are full ({self.queued} waiting)",
                                  self._predicted_wait(cls), now)
        loop = asyncio.get_running_loop()
        w = _Waiter(loop.create_future())
        w.timer = loop.call_later(cls.max_wait_s, self._expire, cls, w)
        cls.queue.append(w)
        self.queued += 1
        cls.m_depth.set(len(cls.queue))
        try:
            await w.fut
        except asyncio.CancelledError:
            w.timer.cancel()
            if w.fut.done() and not w.fut.cancelled() and w.fut.exception() is None:
                self._free_slot(cls)  # granted just as the client went away: pass it on
            else:
                self._unqueue(cls, w)
            self._count(tenant.name, "cancelled", "client")
            raise
        except PDServeError as e:
            self._count(tenant.name, "rejected", "shed" if isinstance(e, _Shed) else "queue_timeout")
            e.headers = {**self.headers(tenant), **(e.headers or {})}
            raise
        t = self._clock()
        ticket._slot = True
        ticket.slot_at = t
        ticket.waited_s = t - now

    def _predicted_wait(self, cls: _Class) -> float:
        """Seconds a new request of ``cls`` would wait for a slot: the requests queued ahead of it
        (its class and higher) plus itself, one slot release each, at the mean service time over
        the slots; plus the mean time from slot to first byte."""
        if self.service_s is None or not self.max_in_flight:
            return 0.0
        ahead = 0
        for c in self.classes[:cls.index + 1]:
            ahead += len(c.queue)
        return (ahead + 1) * self.service_s / self.max_in_flight + (self.ttft_s or 0.0)

    def _reject_overload(self, tenant: Tenant, reason: str, why: str, retry: float, now: float) -> None:
        self._count(tenant.name, "rejected", reason)
        raise Unavailable(f"overloaded: {why}; retry later",
                          headers={**self.headers(tenant, now), **retry_headers(retry, 1.0)})

    def _shed_below(self, cls: _Class) -> bool:
        """Make room by shedding the newest waiter of the lowest class below ``cls``; False if
        none waits there."""
        for c in reversed(self.classes[cls.index + 1:]):
            while c.queue:
                w = c.queue.pop()
                self.queued -= 1
                c.m_depth.set(len(c.queue))
                if w.fut.done():
                    continue
                w.timer.cancel()
                err = _Shed(f"overloaded: shed for a request of a higher priority class than {c.name}; "
                            "retry later", headers=retry_headers(self._predicted_wait(c), 1.0))
                w.fut.set_exception(err)
                return True
        return False

    def _expire(self, cls: _Class, w: _Waiter) -> None:
        if w.fut.done():
            return
        self._unqueue(cls, w)
        w.fut.set_exception(Unavailable(
            f"overloaded: waited {cls.max_wait_s:g} s for a slot ({cls.name} class); retry later",
            headers=retry_headers(self._predicted_wait(cls), 1.0)))

    def _unqueue(self, cls: _Class, w: _Waiter) -> None:
        try:
            cls.queue.remove(w)
        except ValueError:
            return
        self.queued -= 1
        cls.m_depth.set(len(cls.queue))

    def _free_slot(self, cls: _Class) -> None:
        """A slot of ``cls`` ends: it goes to the oldest waiter of the highest class waiting."""
        cls.in_flight -= 1
        cls.m_in_flight.dec()
        for c in self.classes:
            q = c.queue
            while q:
                w = q.popleft()
                self.queued -= 1
                c.m_depth.set(len(q))
                if w.fut.done():
                    continue
                w.timer.cancel()
                c.in_flight += 1
                c.m_in_flight.inc()
                w.fut.set_result(None)
                return
        self.in_flight -= 1

    def _end(self, ticket: Ticket, used: int | None) -> None:
        ticket._done = True
        tenant = ticket.tenant
        tenant.active -= 1
        now = self._clock()
        b = tenant.budget
        if b is not None:
            reserved = ticket.reserved
            if used is None:
                used = reserved
            if used != reserved:
                b.refund(reserved - used, now)
            tenant.m_used.inc(used)
            if used < reserved:
                tenant.m_refunded.inc(reserved - used)
        if ticket._slot:
            ticket._slot = False
            self._free_slot(tenant.cls)
            self.observe(service_s=now - ticket.slot_at)

    # -- observations, headers -----------------------------------------------------------------
    def observe(self, service_s: float | None = None, ttft_s: float | None = None) -> None:
        """Feed the moving averages early rejection predicts from: ``service_s``, how long a
        request holds its slot (settlement does this itself), and ``ttft_s``, slot to first byte
        (``Ticket.first_token`` does this). The ingress may feed its own measurements."""
        if service_s is not None:
            s = self.service_s
            self.service_s = service_s if s is None else s + _EWMA_ALPHA * (service_s - s)
        if ttft_s is not None:
            s = self.ttft_s
            self.ttft_s = ttft_s if s is None else s + _EWMA_ALPHA * (ttft_s - s)

    def headers(self, tenant: Tenant | str, now: float | None = None) -> dict[str, str]:
        """OpenAI's rate-limit headers for any answer to ``tenant`` (200s too):

        - ``x-ratelimit-limit-tokens``: tokens per minute; ``x-ratelimit-remaining-tokens``: what
          its bucket holds now (with leases: this replica's lease plus the tenant's global level
          as of the last sync); ``x-ratelimit-reset-tokens``: time until the bucket is full;
        - with a concurrency cap, ``x-ratelimit-limit-requests`` (the cap at this ingress
          replica) and ``x-ratelimit-remaining-requests`` (how many more may be open now).

        Empty for a tenant without limits."""
        if isinstance(tenant, str):
            tenant = self.tenants[tenant]
        h: dict[str, str] = {}
        b = tenant.budget
        if b is not None:
            now = self._clock() if now is None else now
            h["x-ratelimit-limit-tokens"] = str(int(b.capacity))
            h["x-ratelimit-remaining-tokens"] = str(max(0, int(b.available(now))))
            h["x-ratelimit-reset-tokens"] = duration(b.reset_s(now))
        if tenant.cap is not None:
            h["x-ratelimit-limit-requests"] = str(tenant.cap)
            h["x-ratelimit-remaining-requests"] = str(max(0, tenant.cap - tenant.active))
        return h

    def _count(self, tenant: str, outcome: str, reason: str) -> None:
        if self._metrics:
            from pd_serve import metrics as m

            m.ADMISSIONS.labels(tenant, outcome, reason).inc()

    def snapshot(self) -> dict[str, Any]:
        """State for tests and debugging (no keys)."""
        now = self._clock()
        return {"in_flight": self.in_flight, "queued": self.queued,
                "queues": {c.name: len(c.queue) for c in self.classes},
                "service_s": self.service_s, "ttft_s": self.ttft_s,
                "tenants": {t.name: {"active": t.active, "class": t.cls.name,
                                     "available": None if t.budget is None else t.budget.available(now)}
                            for t in self.tenants.values()}}


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse
    import getpass
    import secrets
    import sys

    ap = argparse.ArgumentParser(prog="python -m pd_serve.admission",
                                 description="API keys for admission.tenants[].api_keys")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("hash-key", help="read a key from stdin (or a prompt), print its `sha256:<hex>` for the config")
    sub.add_parser("new-key", help="print a new random key and its `sha256:<hex>` for the config")
    a = ap.parse_args(argv)
    if a.cmd == "new-key":
        key = "sk-" + secrets.token_urlsafe(32)
        print(f"key (give it to the tenant; it is not stored): {key}")
        print(f"config (admission.tenants[].api_keys):         {hash_key(key)}")
        return 0
    key = getpass.getpass("key: ") if sys.stdin.isatty() else sys.stdin.read()
    if not key.strip():
        print("no key read", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
