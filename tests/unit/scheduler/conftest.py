"""Shared builders for scheduler unit tests: no Ray, no engine, no sockets unless a test opens one."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pytest

from scheduler import (
    PrefixIndex,
    Profile,
    RequestContext,
    Scheduler,
    WorkerRegistry,
    block_keys,
    default_profiles,
)

BLOCK = 4


@dataclass
class FakeClock:
    """A manual monotonic clock."""

    t: float = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class Tier:
    """One tier wired like `make_scheduler`, with a fake clock and a seeded RNG."""

    scheduler: Scheduler
    clock: FakeClock
    engine_hashes: dict[str, int] = field(default_factory=dict)

    @property
    def index(self) -> PrefixIndex:
        assert self.scheduler.index is not None
        return self.scheduler.index

    @property
    def registry(self) -> WorkerRegistry:
        return self.scheduler.registry

    def store(self, worker: str, tokens: Sequence[int]) -> None:
        """Make ``worker`` report (via a BlockStored event) the full blocks of ``tokens``."""
        store_prefix(self.index, worker, tokens)


def tokens(seed: int, n: int) -> list[int]:
    """Deterministic pseudo-random token ids."""
    rng = random.Random(seed)
    return [rng.randrange(1, 32000) for _ in range(n)]


def fake_engine_hashes(worker: str, toks: Sequence[int], block_size: int = BLOCK) -> list[int]:
    """Engine-side hashes for a test: distinct per worker (engines may use different seeds)."""
    return [hash((worker, k)) & 0xFFFF_FFFF_FFFF_FFFF for k in block_keys(toks, block_size)]


def store_prefix(index: PrefixIndex, worker: str, toks: Sequence[int], block_size: int = BLOCK) -> list[int]:
    """Apply a root BlockStored for the full blocks of ``toks``; return the engine hashes."""
    n = len(toks) // block_size * block_size
    hashes = fake_engine_hashes(worker, toks[:n], block_size)
    index.apply_stored(worker, hashes, None, toks[:n], block_size)
    return hashes


def make_workers(registry: WorkerRegistry, n: int | Iterable[str], **stats: object) -> list[str]:
    """Register workers ``w0..w{n-1}`` (or the given ids) and apply ``stats`` to each."""
    ids = [f"w{i}" for i in range(n)] if isinstance(n, int) else list(n)
    registry.sync([*registry.ids(), *ids])
    for w in ids:
        if stats:
            registry.update(w, **stats)  # type: ignore[arg-type]
    return ids


def make_ctx(toks: Sequence[int], request_id: str = "r", candidates: Iterable[str] | None = None) -> RequestContext:
    return RequestContext.from_tokens(
        request_id, toks, BLOCK, candidates=None if candidates is None else list(candidates)
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_tier(clock: FakeClock):
    """Factory: ``make_tier(profile=None, n_workers=0, **scheduler_kwargs) -> Tier``."""

    def _make(profile: Profile | None = None, n_workers: int = 0, **kwargs: object) -> Tier:
        index = PrefixIndex(BLOCK, clock=clock)
        registry = WorkerRegistry("decode", index=index, clock=clock)
        kwargs.setdefault("rng", 0)
        sched = Scheduler(profile or default_profiles()["decode"], registry, index, clock=clock, **kwargs)  # type: ignore[arg-type]
        tier = Tier(sched, clock)
        if n_workers:
            make_workers(registry, n_workers)
        return tier

    return _make
