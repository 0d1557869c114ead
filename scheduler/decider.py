"""The P/D decider: prefill on the chosen decode engine (LOCAL) or on the prefill tier (REMOTE).

Called by the decode replica once per request, after the decode worker is chosen (decode-first,
like llm-d's P/D profile handler and Ray Serve LLM's P/D). Checks, in order:

1. ``short_uncached`` - the part of the prompt the decode engine does not cache is at most
   ``threshold_tokens``: computing it locally is cheaper than a round trip plus a KV transfer;
2. ``no_prefill_workers`` - the prefill tier has no replica (e.g. scaled to zero); when a tier
   is configured, the caller also wakes it (`wakes_prefill`) so that it scales up, while this
   request prefills locally;
3. ``prefill_saturated`` - every prefill replica is filtered out (saturated or unhealthy);
4. otherwise ``remote``.

```yaml
decider:
  threshold_tokens: 256
```
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from scheduler.context import RequestContext
    from scheduler.framework import Decision, Scheduler
    from scheduler.plugins.base import Filter


class ReplicaLoad(Protocol):
    """What `count_eligible` reads of a replica (pd_serve's heartbeat ``ReplicaInfo`` has it)."""

    replica_id: str
    kv_usage: float
    num_running: int
    num_waiting: int

__all__ = [
    "DeciderParams",
    "DeciderReason",
    "PDDecision",
    "PrefillLocation",
    "ReplicaLoad",
    "count_eligible",
    "decide",
    "decide_for",
    "wakes_prefill",
]


class PrefillLocation(StrEnum):
    LOCAL = "local"
    """Prefill on the decode engine itself."""
    REMOTE = "remote"
    """Prefill on a prefill-tier engine, then transfer the KV blocks to decode."""


class DeciderReason(StrEnum):
    """Why the decider chose; a bounded label for the local-vs-remote metric."""

    SHORT_UNCACHED = "short_uncached"
    NO_PREFILL_WORKERS = "no_prefill_workers"
    PREFILL_SATURATED = "prefill_saturated"
    REMOTE = "remote"


class DeciderParams(BaseModel):
    """Parameters of the P/D decider."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    threshold_tokens: int = Field(
        256,
        ge=0,
        description="Prefill locally when at most this many prompt tokens are not cached on the decode engine.",
    )


DEFAULT_DECIDER_PARAMS = DeciderParams.model_validate({})


@dataclass(frozen=True, slots=True)
class PDDecision:
    """Outcome of `decide`: where to prefill, why, and how many tokens need computing."""

    location: PrefillLocation
    reason: DeciderReason
    uncached_tokens: int

    @property
    def remote(self) -> bool:
        return self.location is PrefillLocation.REMOTE


def decide(
    prompt_tokens: int,
    cached_tokens: int,
    prefill_workers: int,
    prefill_eligible: int,
    params: DeciderParams | None = None,
) -> PDDecision:
    """Decide where to prefill a prompt (pure arithmetic; see the module docstring).

    ``cached_tokens``: prompt tokens the chosen decode engine already caches
    (``Decision.matched_tokens``). ``prefill_workers`` / ``prefill_eligible``: prefill replicas
    registered, and left after the prefill profile's filters (`Scheduler.eligible_counts`).
    """
    p = params or DEFAULT_DECIDER_PARAMS
    uncached = max(0, prompt_tokens - cached_tokens)
    if uncached <= p.threshold_tokens:
        return PDDecision(PrefillLocation.LOCAL, DeciderReason.SHORT_UNCACHED, uncached)
    if prefill_workers <= 0:
        return PDDecision(PrefillLocation.LOCAL, DeciderReason.NO_PREFILL_WORKERS, uncached)
    if prefill_eligible <= 0:
        return PDDecision(PrefillLocation.LOCAL, DeciderReason.PREFILL_SATURATED, uncached)
    return PDDecision(PrefillLocation.REMOTE, DeciderReason.REMOTE, uncached)


def decide_for(
    ctx: RequestContext,
    decode_decision: Decision,
    prefill: Scheduler | None,
    params: DeciderParams | None = None,
) -> PDDecision:
    """`decide` for a request routed by the decode `Scheduler`, given the prefill tier's one.

    ``prefill=None`` (no prefill tier configured) counts as zero prefill workers. The eligible
    count runs the prefill filters only when the prompt is long enough to matter.
    """
    p = params or DEFAULT_DECIDER_PARAMS
    uncached = max(0, ctx.prompt_tokens - decode_decision.matched_tokens)
    if uncached <= p.threshold_tokens or prefill is None:
        return decide(ctx.prompt_tokens, decode_decision.matched_tokens, 0, 0, p)
    workers, eligible = prefill.eligible_counts(ctx)
    return decide(ctx.prompt_tokens, decode_decision.matched_tokens, workers, eligible, p)


def wakes_prefill(reason: DeciderReason | str, tier_configured: bool) -> bool:
    """Whether a decision should wake the prefill tier: the prompt would have gone remote (more
    than ``threshold_tokens`` uncached) but the tier, though configured, has no replica (scaled to
    zero, or all gone). The request itself still prefills locally.

    A tier at zero replicas sees no request of its own (decode prefills locally instead), so
    nothing would queue at the prefill handle and Ray Serve's autoscaler would never scale it
    up; the wake is such a request. Short or cached prompts (``short_uncached``) would have
    stayed local anyway and wake nothing; neither does a tier that has replicas, saturated or
    not (its own queue is the autoscaler's signal), nor a deployment without a prefill tier.
    """
    return tier_configured and reason == DeciderReason.NO_PREFILL_WORKERS


def count_eligible(replicas: Iterable[ReplicaLoad], filters: Sequence[Filter]) -> tuple[int, int]:
    """``(registered, eligible)``: ``replicas`` run through ``filters``, the prefill profile's own.

    For a decode replica that knows the prefill tier only from heartbeats (no `Scheduler` of its
    own for that tier): the same filter code as the prefill router's, so "saturated" means one
    thing. Called once per request that is long enough to prefill remotely; builds a small
    registry (tens of microseconds for a handful of replicas).
    """
    from scheduler.framework import Profile, Scheduler
    from scheduler.state import WorkerRegistry

    replicas = list(replicas)
    if not replicas:
        return 0, 0
    registry = WorkerRegistry("prefill")
    registry.sync(r.replica_id for r in replicas)
    for r in replicas:
        registry.update(r.replica_id, kv_usage=r.kv_usage, num_running=r.num_running, num_waiting=r.num_waiting)
    return Scheduler(Profile("prefill", filters=tuple(filters)), registry).eligible_counts()
