"""What one scheduling decision is about: the request (`RequestContext`) and the per-decision
state plugins read (`CycleContext`)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from scheduler.hashing import block_keys, lora_seed

__all__ = ["CycleContext", "RequestContext"]


@dataclass(frozen=True, slots=True)
class RequestContext:
    """A request as the scheduler needs it. Built once per request by the ingress/router.

    Attributes:
        request_id: for logs only.
        block_keys: `scheduler.hashing.block_keys` of the prompt (full blocks only), with the
            tier's block size. Compute them once and pass the same context to both tiers.
        prompt_tokens: prompt length in tokens (including a trailing partial block).
        block_size: the block size ``block_keys`` were computed with.
        candidates: restrict the decision to these worker ids (e.g. the replicas Ray Serve
            offers); ``None`` = every registered worker.
    """

    request_id: str
    block_keys: Sequence[int]
    prompt_tokens: int
    block_size: int
    candidates: Collection[str] | None = None

    @classmethod
    def from_tokens(
        cls,
        request_id: str,
        token_ids: Sequence[int],
        block_size: int,
        *,
        lora_name: str | None = None,
        candidates: Collection[str] | None = None,
    ) -> RequestContext:
        """Hash ``token_ids`` (~10 µs per 1k tokens) and build the context."""
        keys = block_keys(token_ids, block_size, lora_seed(lora_name))
        return cls(request_id, keys, len(token_ids), block_size, candidates)


@dataclass(slots=True)
class CycleContext:
    """Per-decision state handed to every plugin. Created by the `Scheduler`, read by plugins.

    Attributes:
        request: the request being scheduled.
        now: the scheduler clock at the start of the decision.
        matched_blocks: per view row, how many leading blocks of the request the worker holds
            (filled by the scheduler from the prefix index before filters run).
        arrival_rate: requests per second the tier receives from this router (measured,
            `scheduler.state.WorkerRegistry.arrival_rate`); 0 when unknown.
        running_s: how long a request runs (holds KV) on average, measured over the same window
            for the running count and the completions (`WorkerRegistry.mean_running_s`); 0 when
            unknown.
        cached_blocks: per view row, the blocks the worker's KV cache holds per the prefix index
            (confirmed by events), or ``None`` without an index.
        reuse_p: the probability that a block evicted from one of the tier's caches is computed
            again later (`scheduler.index.PrefixIndex.reuse_probability`); 0 when unknown.
    """

    request: RequestContext
    now: float
    matched_blocks: np.ndarray
    arrival_rate: float = 0.0
    running_s: float = 0.0
    cached_blocks: np.ndarray | None = None
    reuse_p: float = 0.0
