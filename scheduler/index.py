"""The prefix index: which worker holds which prefix block.

One `PrefixIndex` per tier (decode, prefill). It is the "producer" of the scheduler: KV events and
routing history write to it, the ``prefix`` scorer reads `match_groups` once per decision.

Data layout (chosen for the decision hot path):

* every worker gets a small integer *bit*; ``owners[key]`` is an ``int`` bitmask of the workers
  that hold the block ``key``. `match_groups` walks the request's keys once, ANDing masks in C
  (``map`` / ``accumulate`` / ``takewhile``), and stops at the first key no surviving worker has;
  256 keys cost ~15 µs whatever the number of workers;
* per worker: engine hash → our key (to undo ``BlockRemoved``), the confirmed key set, and the
  *speculative* keys: key → stamp of the `record_routed` call that last touched it, plus a FIFO
  of those calls (expiry, stamp, keys). The FIFO is the LRU order; expiry and eviction pop it
  and drop the keys whose stamp still matches. Insertion, expiry, eviction and event application
  run as C-level passes over key lists (~0.5 µs a key in a large index, mostly cache misses),
  since every routed request inserts its keys and every computed block comes back as an event.

Entries come from two sources:

* **confirmed** (`apply_stored` / `apply_removed` / `apply_cleared`, from the engine's KV
  events): authoritative. A ``BlockStored`` for a key replaces a speculative entry for it;
* **speculative** (`record_routed`, when a request is routed): "this worker will soon hold
  these blocks". In precise mode they bridge the gap until the event arrives (a TTL longer than
  queueing + prefill; a confirming event ends them early). In approximate mode (engines
  without events) they are the only source (long TTL, LRU-bounded to the worker's KV capacity).

Thread safety: every public method takes ``self.lock``, so a `KVEventSubscriber` thread may
apply events while the router matches. Methods never call back into user code.
"""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate, compress, filterfalse, groupby, islice, repeat, takewhile
from operator import add, and_, eq, is_, not_, or_, sub
from typing import cast

import numpy as np

from scheduler.hashing import block_keys, lora_seed

__all__ = ["EngineHash", "IndexStats", "PrefixIndex"]

EngineHash = int | bytes
"""A block hash as the engine publishes it (vLLM's ``ExternalBlockHash``)."""

_MISSING = object()


@dataclass
class IndexStats:
    """Counters of one index since creation; read them for metrics, never reset them."""

    stored_blocks: int = 0
    removed_blocks: int = 0
    unknown_removals: int = 0
    """``BlockRemoved`` for a hash this index never saw (missed events, or started late)."""
    orphan_blocks: int = 0
    """``BlockStored`` blocks dropped because their parent hash is unknown to the index."""
    block_size_mismatch: int = 0
    """``BlockStored`` events dropped because their block size differs from the index's."""
    misaligned_events: int = 0
    """``BlockStored`` events dropped because ``len(token_ids) != len(block_hashes) * block_size``."""
    cleared: int = 0
    speculative_inserted: int = 0
    speculative_evicted: int = 0
    """Speculative keys dropped by the per-worker LRU capacity."""
    speculative_expired: int = 0
    evicted_blocks: int = 0
    """Keys a worker stopped holding because of a ``BlockRemoved`` (evictions)."""
    refetched_blocks: int = 0
    """Keys stored again (or routed again) after the tier's last copy of them was evicted, while
    the eviction history (one tier's worth of keys) still remembered them."""


class _Worker:
    __slots__ = ("batches", "bit", "capacity", "ekey", "emed", "kcount", "mask", "spec", "wake_at")

    def __init__(self, bit: int) -> None:
        self.bit = bit
        self.mask = 1 << bit
        self.ekey: dict[EngineHash, int] = {}  # engine hash -> our key
        # engine hash -> the medium holding it, or a set when several do (rare: offloading)
        self.emed: dict[EngineHash, str | set[str | None] | None] = {}
        self.kcount: dict[int, int] = {}  # confirmed key -> number of engine hashes mapping to it
        self.spec: dict[int, int] = {}  # speculative key -> stamp of its latest record_routed
        self.batches: deque[tuple[float, int, list[int]]] = deque()  # (expiry, stamp, keys), LRU first
        self.capacity: int | None = None
        self.wake_at: float | None = None  # when the expiry heap will look at this worker


class PrefixIndex:
    """Key → workers map of one tier, fed by KV events and/or by routing history.

    Args:
        block_size: tokens per block of the engines of this tier; ``BlockStored`` events with
            another size are dropped (and counted), since their keys could never match.
        clock: monotonic seconds; injectable for tests.
        speculative_capacity: default LRU bound on speculative keys per worker (``None`` =
            unbounded). `set_capacity` overrides it per worker (use the engine's KV blocks).
        groups: KV-cache group ids whose events count (``None`` = all). For hybrid models pass
            the full-attention group, e.g. ``{0}``; events without a group id always count.
        expiry_slack_s: expired speculative entries are collected by `record_routed` (after a
            decision, off its latency); `match_groups` collects them itself only once they are
            overdue by this much (an idle router). A TTL is a heuristic: a little late is fine.
    """

    def __init__(
        self,
        block_size: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        speculative_capacity: int | None = None,
        groups: Iterable[int] | None = None,
        expiry_slack_s: float = 1.0,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.lock = threading.Lock()
        self.stats = IndexStats()
        self.membership_version = 0
        """Incremented whenever a worker gets or loses its bit (readers cache bit mappings)."""
        self._clock = clock
        self._default_capacity = speculative_capacity
        self._groups = frozenset(groups) if groups is not None else None
        self._owners: dict[int, int] = {}
        self._workers: dict[str, _Worker] = {}
        self._by_bit: list[str | None] = []
        self._free_bits: list[int] = []
        self._wake: list[tuple[float, str]] = []  # heap of (time, worker) expiry checks
        # Keys per bit, confirmed or speculative (the blocks each worker's cache holds or is about
        # to, for the requests routed there), and a trailing 0 for "no bit": `held_blocks`
        # indexes it with -1 for rows unknown to the index.
        self._held = np.zeros(1, dtype=np.float64)
        # Eviction history: keys whose tier-wide last copy was evicted (FIFO, at most as many as
        # the tier holds), and decayed counts of evictions and of keys computed again from it.
        self._ghost: dict[int, None] = {}
        self._evicted_avg = 0.0
        self._refetched_avg = 0.0
        self._stamp = 0
        self._expiry_slack_s = expiry_slack_s

    # ------------------------------------------------------------------ membership

    def add_worker(self, worker: str) -> None:
        """Register ``worker`` (idempotent). Events and `record_routed` register implicitly."""
        with self.lock:
            self._ensure(worker)

    def remove_worker(self, worker: str) -> None:
        """Forget ``worker`` and everything it held; called when it leaves the tier (idempotent)."""
        with self.lock:
            w = self._workers.pop(worker, None)
            if w is None:
                return
            self._clear(w)
            self._by_bit[w.bit] = None
            heapq.heappush(self._free_bits, w.bit)
            self.membership_version += 1

    def set_capacity(self, worker: str, capacity_blocks: int | None) -> None:
        """Bound ``worker``'s speculative keys to ``capacity_blocks`` (its KV cache, in blocks)."""
        with self.lock:
            w = self._ensure(worker)
            w.capacity = capacity_blocks
            self._trim(w)

    def workers(self) -> list[str]:
        """Registered workers, in registration order."""
        with self.lock:
            return list(self._workers)

    def bit_of(self, worker: str) -> int | None:
        """The bit of ``worker`` in `match_groups` masks, or ``None`` if unknown."""
        w = self._workers.get(worker)
        return None if w is None else w.bit

    def worker_of_bit(self, bit: int) -> str | None:
        """Inverse of `bit_of`."""
        return self._by_bit[bit] if bit < len(self._by_bit) else None

    @property
    def num_bits(self) -> int:
        """Upper bound (exclusive) of the bits in use."""
        return len(self._by_bit)

    def __len__(self) -> int:
        return len(self._owners)

    def keys_of(self, worker: str) -> set[int]:
        """Keys ``worker`` holds (confirmed or speculative). For tests and debugging: O(keys)."""
        with self.lock:
            w = self._workers.get(worker)
            return set() if w is None else set(w.kcount) | set(w.spec)

    # ------------------------------------------------------------------ KV events

    def apply_stored(
        self,
        worker: str,
        block_hashes: Sequence[EngineHash],
        parent_block_hash: EngineHash | None,
        token_ids: Sequence[int],
        block_size: int,
        *,
        lora_name: str | None = None,
        medium: str | None = None,
        group_idx: int | None = None,
    ) -> int:
        """Apply one ``BlockStored`` event of ``worker``; return how many blocks were recorded.

        Called by the event decoder once per event, in publication order. Our keys are computed
        from ``token_ids`` chained from the parent's key (the root seed when ``parent_block_hash``
        is ``None``). Idempotent: re-storing a known hash (vLLM's "full" reuse reports, or a
        replayed batch) changes nothing. Unknown parents, another block size and malformed
        events are dropped and counted in `stats`, never raised: the index is a routing hint.
        """
        if self._groups is not None and group_idx is not None and group_idx not in self._groups:
            return 0
        with self.lock:
            if block_size != self.block_size:
                self.stats.block_size_mismatch += 1
                return 0
            if len(token_ids) != len(block_hashes) * block_size:
                self.stats.misaligned_events += 1
                return 0
            w = self._ensure(worker)
            if parent_block_hash is None:
                seed = lora_seed(lora_name)
            else:
                parent_key = w.ekey.get(parent_block_hash)
                if parent_key is None:
                    self.stats.orphan_blocks += len(block_hashes)
                    return 0
                seed = parent_key
            keys = block_keys(token_ids, block_size, seed)
            emed = w.emed
            if not any(map(emed.__contains__, block_hashes)):
                self._store_new(w, block_hashes, keys, medium)  # the common case, in C passes
                self.stats.stored_blocks += len(keys)
                return len(keys)
            owners = self._owners
            mask = w.mask
            for h, key in zip(block_hashes, keys, strict=True):
                media = emed.get(h, _MISSING)
                if media is not _MISSING:
                    if type(media) is set:
                        media.add(medium)
                    elif media != medium:
                        emed[h] = {cast("str | None", media), medium}
                    continue
                w.ekey[h] = key
                emed[h] = medium
                n = w.kcount.get(key, 0)
                w.kcount[key] = n + 1
                if n == 0 and w.spec.pop(key, None) is None:  # (a speculative key is counted)
                    self._held[w.bit] += 1
                    cur = owners.get(key)
                    if cur is None and key in self._ghost:
                        self._refetched([key])
                    owners[key] = mask if cur is None else cur | mask  # share the 1-bit int
            self.stats.stored_blocks += len(keys)
            return len(keys)

    def apply_removed(
        self,
        worker: str,
        block_hashes: Sequence[EngineHash],
        *,
        medium: str | None = None,
        group_idx: int | None = None,
    ) -> int:
        """Apply one ``BlockRemoved`` event of ``worker``; return how many keys it dropped.

        Called by the event decoder once per event. A hash stays known while any medium (GPU,
        CPU offload, ...) still holds it. Unknown hashes (or a medium that does not hold the
        hash) are counted in ``stats.unknown_removals``, not raised.
        """
        if self._groups is not None and group_idx is not None and group_idx not in self._groups:
            return 0
        with self.lock:
            w = self._workers.get(worker)
            if w is None:
                self.stats.unknown_removals += len(block_hashes)
                return 0
            emed = w.emed
            if len(block_hashes) > 1 and all(map(eq, map(emed.get, block_hashes), repeat(medium))):
                dropped = self._remove_known(w, block_hashes)  # the common case, in C passes
                if dropped is not None:
                    return dropped
            dropped = 0
            for h in block_hashes:
                media = emed.get(h, _MISSING)
                if type(media) is set:
                    media.discard(medium)
                    if len(media) > 1:
                        continue
                    if media:
                        emed[h] = next(iter(media))
                        continue
                elif media is _MISSING or media != medium:
                    self.stats.unknown_removals += 1
                    continue
                del emed[h]
                key = w.ekey.pop(h)
                n = w.kcount[key] - 1
                self.stats.removed_blocks += 1
                if n:
                    w.kcount[key] = n
                    continue
                del w.kcount[key]
                self._held[w.bit] -= 1
                if self._clear_bit(key, w.mask):  # confirmed and speculative keys are disjoint
                    self._forget([key])
                dropped += 1
            self._evicted(dropped)
            return dropped

    def apply_cleared(self, worker: str) -> None:
        """Apply ``AllBlocksCleared`` (or an engine restart): ``worker`` holds nothing now.

        Speculative entries go too: they were predictions about the cache just emptied.
        """
        with self.lock:
            w = self._workers.get(worker)
            if w is not None:
                self._clear(w)
            self.stats.cleared += 1

    # ------------------------------------------------------------------ routing history

    def record_routed(
        self,
        worker: str,
        keys: Sequence[int],
        ttl_s: float,
        capacity: int | None = None,
    ) -> None:
        """Note that a request with ``keys`` was routed to ``worker`` (speculative entries).

        Called by the scheduler once per routed request (`Scheduler.on_routed`). Keys already
        confirmed by events are skipped; the others are inserted or refreshed (moved to the LRU
        end, expiry ``now + ttl_s``). ``capacity`` (else the worker's, else the index default)
        bounds the speculative keys of the worker, evicting least recently routed ones. Also
        collects every entry that has expired (in LRU order: exact while one index uses one
        TTL). Cost: ~0.5-1 µs per new key, plus the same per key expiring.
        """
        if ttl_s <= 0 or not keys:
            return
        with self.lock:
            now = self._clock()
            if self._wake and self._wake[0][0] <= now:
                self._expire(now)
            w = self._ensure(worker)
            if capacity is not None:
                w.capacity = capacity
            spec = w.spec
            # Every pass below runs in C: this is on the per-request path.
            todo = list(filterfalse(w.kcount.__contains__, keys))  # confirmed keys need nothing
            if todo:
                fresh = list(filterfalse(spec.__contains__, todo))
                self._stamp += 1
                spec.update(zip(todo, repeat(self._stamp)))
                w.batches.append((now + ttl_s, self._stamp, todo))
                if fresh:
                    self._held[w.bit] += len(fresh)
                    self._set_bits(fresh, w.mask)
                self.stats.speculative_inserted += len(fresh)
            self._trim(w)
            if w.wake_at is None and w.batches:
                w.wake_at = w.batches[0][0]
                heapq.heappush(self._wake, (w.wake_at, worker))

    # ------------------------------------------------------------------ matching

    def match_groups(self, keys: Sequence[int]) -> list[tuple[int, int]]:
        """Longest cached prefix per worker, as nested groups: ``[(mask, n_blocks), ...]``.

        Called once per routing decision (the hot path). A worker whose bit is set in the mask
        of a group holds the first ``n_blocks`` keys of ``keys`` consecutively; groups come with
        increasing ``n_blocks`` and shrinking masks (a later mask is a subset of an earlier one),
        so a worker's match is the ``n_blocks`` of the *last* group that contains it. Workers in
        no group match 0 blocks. The walk stops at the first key no surviving worker holds.
        """
        with self.lock:
            if self._wake and self._wake[0][0] <= self._clock() - self._expiry_slack_s:
                self._expire(self._clock())
            alive = takewhile(bool, accumulate(map(self._owners.get, keys, repeat(0)), and_))
            groups: list[tuple[int, int]] = []
            n = 0
            for mask, run in groupby(alive):
                n += len(list(run))
                groups.append((mask, n))
            return groups

    def match(self, keys: Sequence[int]) -> dict[str, int]:
        """Longest cached prefix, in blocks, per worker that matches at least one block.

        Convenience over `match_groups` (which the scorer uses): O(matching workers).
        """
        groups = self.match_groups(keys)
        out: dict[str, int] = {}
        by_bit = self._by_bit
        for mask, n in groups:
            m = mask
            while m:
                low = m & -m
                worker = by_bit[low.bit_length() - 1]
                if worker is not None:
                    out[worker] = n
                m ^= low
        return out

    # ------------------------------------------------------------------ internals

    def _ensure(self, worker: str) -> _Worker:
        w = self._workers.get(worker)
        if w is None:
            if self._free_bits:
                bit = heapq.heappop(self._free_bits)
                self._by_bit[bit] = worker
            else:
                bit = len(self._by_bit)
                self._by_bit.append(worker)
                if len(self._held) <= len(self._by_bit):  # keep the trailing 0 past every bit
                    grown = np.zeros(2 * len(self._by_bit) + 1, dtype=np.float64)
                    grown[: len(self._held) - 1] = self._held[:-1]
                    self._held = grown
            w = _Worker(bit)
            w.capacity = self._default_capacity
            self._workers[worker] = w
            self.membership_version += 1
        return w

    def _store_new(self, w: _Worker, hashes: Sequence[EngineHash], keys: list[int], medium: str | None) -> None:
        """`apply_stored` for hashes all new to ``w``, as C-level passes over the lists."""
        w.ekey.update(zip(hashes, keys))
        w.emed.update(zip(hashes, repeat(medium)))
        kcount = w.kcount
        counts = list(map(kcount.get, keys, repeat(0)))
        kcount.update(zip(keys, map(add, counts, repeat(1))))
        newly = list(compress(keys, map(not_, counts)))  # keys this worker did not hold
        if not newly:
            return
        was_spec = map(w.spec.pop, newly, repeat(None))  # confirmed now: no longer speculative
        need = list(compress(newly, map(is_, was_spec, repeat(None))))
        self._held[w.bit] += len(need)  # the others were counted as speculative keys
        if need:
            self._set_bits(need, w.mask)

    def _remove_known(self, w: _Worker, hashes: Sequence[EngineHash]) -> int | None:
        """`apply_removed` for hashes ``w`` holds on exactly the removed medium; ``None`` (and
        nothing done) when hashes or their keys repeat: the caller then goes block by block."""
        keys = list(map(w.ekey.__getitem__, hashes))
        if len(set(hashes)) != len(hashes) or len(set(keys)) != len(keys):
            return None
        deque(map(w.emed.__delitem__, hashes), maxlen=0)
        deque(map(w.ekey.__delitem__, hashes), maxlen=0)
        kcount = w.kcount
        counts = list(map(sub, map(kcount.__getitem__, keys), repeat(1)))
        kcount.update(zip(compress(keys, counts), filter(None, counts)))
        gone = list(compress(keys, map(not_, counts)))
        deque(map(kcount.pop, gone, repeat(None)), maxlen=0)
        self._held[w.bit] -= len(gone)
        self._forget(self._clear_bits(gone, w.mask))
        self._evicted(len(gone))
        self.stats.removed_blocks += len(hashes)
        return len(gone)

    def _set_bits(self, keys: list[int], mask: int) -> None:
        owners = self._owners
        if self._ghost:
            self._refetched(list(filter(self._ghost.__contains__, keys)))  # never in owners
        shared = list(filter(owners.__contains__, keys))
        merged = list(map(or_, map(owners.__getitem__, shared), repeat(mask)))
        owners.update(zip(keys, repeat(mask)))  # one shared int for singly-held keys
        owners.update(zip(shared, merged))

    def _clear_bit(self, key: int, mask: int) -> bool:
        """Drop ``mask`` from ``key``'s owners; ``True`` when no worker holds ``key`` any more."""
        rest = self._owners.get(key, 0) & ~mask
        if rest:
            self._owners[key] = rest
            return False
        return self._owners.pop(key, None) is not None

    def _clear_bits(self, keys: list[int], mask: int) -> list[int]:
        """`_clear_bit` for many keys, in C-level passes; returns the keys no worker holds now."""
        owners = self._owners
        rest = list(map(and_, map(owners.get, keys, repeat(0)), repeat(~mask)))
        owners.update(zip(compress(keys, rest), filter(None, rest)))
        gone = list(compress(keys, map(not_, rest)))
        deque(map(owners.pop, gone, repeat(None)), maxlen=0)
        return gone

    # ------------------------------------------------------------------ eviction history

    def _forget(self, keys: list[int]) -> None:
        """The tier's last copy of ``keys`` was evicted: remember them (FIFO, bounded by the
        number of keys the tier holds, as ARC's ghost lists are by the cache's size)."""
        ghost = self._ghost
        ghost.update(zip(keys, repeat(None)))
        excess = len(ghost) - max(len(self._owners), 1)
        if excess > 0:
            deque(map(ghost.pop, list(islice(ghost, excess))), maxlen=0)

    def _evicted(self, n: int) -> None:
        """``n`` keys were evicted from a worker: count them, decaying the counts once per key
        the tier holds, so that the ratio covers the last cache's worth of evictions."""
        if n <= 0:
            return
        self.stats.evicted_blocks += n
        decay = math.exp(-n / max(len(self._owners), 1))
        self._evicted_avg = self._evicted_avg * decay + n
        self._refetched_avg *= decay

    def _refetched(self, keys: list[int]) -> None:
        if keys:
            deque(map(self._ghost.pop, keys), maxlen=0)
            self.stats.refetched_blocks += len(keys)
            self._refetched_avg += len(keys)

    def reuse_probability(self) -> float:
        """The probability that an evicted block is needed again: of the keys evicted from the
        tier's workers over about the last cache's worth of evictions, the fraction computed
        again (or routed again) after the tier lost its last copy. 0 before any eviction.
        Measured, not configured: it is high when the tier's caches are smaller than the
        working set, and about 0 when evicted blocks are dead (unique suffixes)."""
        ev = self._evicted_avg
        return min(1.0, self._refetched_avg / ev) if ev > 0 else 0.0

    def held_blocks(self, bits: np.ndarray) -> np.ndarray:
        """Blocks held per entry of ``bits`` (worker bits, -1 for unknown: 0): confirmed by
        events, plus the speculative ones of requests routed there and not confirmed yet (their
        blocks will be in the cache once they are prefilled, whatever they evict)."""
        return self._held[bits]

    def _live(self, w: _Worker, stamp: int, keys: list[int]) -> list[int]:
        """Keys of the batch ``stamp`` still speculative with that stamp (not refreshed or confirmed)."""
        return list(compress(keys, map(eq, map(w.spec.get, keys), repeat(stamp))))

    def _drop_spec(self, w: _Worker, keys: list[int]) -> None:
        self._held[w.bit] -= len(keys)
        deque(map(w.spec.pop, keys, repeat(None)), maxlen=0)
        self._clear_bits(keys, w.mask)

    def _clear(self, w: _Worker) -> None:
        self._held[w.bit] = 0.0
        self._clear_bits(list(w.kcount), w.mask)
        self._clear_bits(list(w.spec), w.mask)  # confirmed and speculative keys are disjoint
        w.ekey.clear()
        w.emed.clear()
        w.kcount.clear()
        w.spec.clear()
        w.batches.clear()

    def _trim(self, w: _Worker) -> None:
        if w.capacity is None:
            return
        excess = len(w.spec) - w.capacity
        batches = w.batches
        while excess > 0 and batches:
            expiry, stamp, keys = batches[0]
            live = self._live(w, stamp, keys)
            if len(live) <= excess:
                batches.popleft()
                self._drop_spec(w, live)
                excess -= len(live)
                self.stats.speculative_evicted += len(live)
            else:
                self._drop_spec(w, live[:excess])
                batches[0] = (expiry, stamp, live[excess:])
                self.stats.speculative_evicted += excess
                excess = 0

    def _expire(self, now: float) -> None:
        wake = self._wake
        while wake and wake[0][0] <= now:
            _, worker = heapq.heappop(wake)
            w = self._workers.get(worker)
            if w is None:
                continue
            w.wake_at = None
            batches = w.batches
            while batches and batches[0][0] <= now:
                _, stamp, keys = batches.popleft()
                live = self._live(w, stamp, keys)
                self._drop_spec(w, live)
                self.stats.speculative_expired += len(live)
            if batches:
                w.wake_at = batches[0][0]
                heapq.heappush(wake, (w.wake_at, worker))
