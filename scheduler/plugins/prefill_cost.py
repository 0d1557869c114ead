"""``prefill_cost`` scorer: the time until the request's first token, estimated per worker.

For each worker::

    wait_s = (queued_prefill_tokens + uncached_tokens) / prefill_tps  (+ the wait for KV blocks)

* ``queued_prefill_tokens``: prefill work already queued on the worker: the registry's fluid
  estimate (every request this router sent adds its uncached tokens; it drains at the worker's
  rate; an engine report of its queued tokens re-anchors it; see `scheduler.state`).
* ``uncached_tokens``: the prompt tokens the worker does not cache (prompt minus its longest
  cached prefix, per the prefix index); at least one, as the engine always computes the last one.
* ``prefill_tps``: the worker's measured prefill rate (assumed until it reports one).

Score = ``min(wait_s over eligible) / wait_s``: 1 for the cheapest worker, less for the others,
so alone with ``max_score`` it picks the smallest estimated wait. There is no weight between
cache and load to tune: a cached block is worth exactly the prefill time it saves, and a queued
token costs exactly the time it delays the request, both at the worker's own measured rate.

Compared with the two designs it starts from:

* Dynamo's KV router cost, ``overlap_weight * prefill_blocks + decode_blocks``, counts the new
  prefill blocks of the request and of the requests in flight, with a configured weight between
  them and decode load. Here the queued work and the request's own suffix are one quantity
  (tokens to compute before this request's first token), converted to seconds with each
  worker's measured rate, so slow and fast engines compare correctly and no weight is needed.
* llm-d's predicted-latency scorer learns TTFT from features (KV usage, queue, prefix overlap)
  with trained sidecar models. This is the closed-form, first-order version of that: the same
  inputs, no training, and it stays explainable (``Decision.scores``).

Evictions: where the worker's cache is full, the blocks the request adds push others out; each
is computed again later with the tier's measured probability p (`evicted_work_s`), so copying a
prefix onto a full cache is charged for the prefixes it displaces. What it leaves out: decode
work slowing prefill (visible only through the measured rate), and which blocks are evicted (p is
the tier's average, not the worker's LRU tail). KV headroom is the ``saturated`` filter's job.

```yaml
plugins:
  - type: prefill_cost
profiles:
  decode:
    plugins:
      - ref: prefill_cost
        weight: 1
```
"""

from __future__ import annotations

import numpy as np

from scheduler.context import CycleContext
from scheduler.plugins.base import Scorer, register_plugin
from scheduler.state import WorkerView


def estimated_wait_s(ctx: CycleContext, view: WorkerView) -> np.ndarray:
    """Per row: estimated seconds until ``ctx.request``'s prefill would finish there.

    Prefill time (queued tokens + the request's uncached suffix, at the worker's rate) plus the
    time to wait for KV blocks when the engine's cache cannot hold the request next to the
    requests it has. Pure; reads ``ctx`` and the view. Also used by the benchmark and tests.
    """
    return _wait(ctx, view)[0]


def _wait(ctx: CycleContext, view: WorkerView) -> tuple[np.ndarray, np.ndarray]:
    """``(wait_s, own_s)`` per row: the estimated wait, and the request's own prefill time."""
    req = ctx.request
    own = req.prompt_tokens - ctx.matched_blocks * req.block_size
    if req.prompt_tokens:
        np.maximum(own, 1, out=own)  # the engine always computes the last token
    own = own * view.inv_prefill_tps
    wait = view.queued_prefill(ctx.now)
    wait *= view.inv_prefill_tps
    wait += own
    running_s = ctx.running_s
    if running_s <= 0 and ctx.arrival_rate > 0:
        # not measured yet (no completion seen): Little's law with the request rate instead
        running_s = float(view.num_running.sum()) / ctx.arrival_rate
    if running_s > 0:
        # KV: blocks free as running requests end, a request running `running_s` on average
        # (measured, `WorkerRegistry.mean_running_s`), so freeing `over` of the `held` blocks
        # takes about over / held of that. The queue ahead is charged once, as prefill time above.
        over = view.kv_over_blocks(-(-req.prompt_tokens // req.block_size))
        over *= view.kv_scale
        over *= running_s
        wait += over
    return wait, own


def evicted_work_s(ctx: CycleContext, view: WorkerView) -> np.ndarray | None:
    """Per row: the prefill seconds that the blocks this request evicts there will cost later.

    The request adds its uncached full blocks to the worker's cache; where the cache is full
    (the blocks the index says it holds, plus these, exceed its capacity) as many blocks are
    evicted, and each is computed again later with the tier's measured probability p
    (``ctx.reuse_p``, `scheduler.index.PrefixIndex.reuse_probability`), at the worker's rate;
    that recomputation evicts in turn, so an eviction costs p / (1 - p) blocks of work.
    ``None`` when nothing is known (no index, no eviction seen yet, no capacity reported).
    Copying a prefix another worker holds onto a full cache is then charged for the other
    prefixes it pushes out, which is what caches smaller than the working set lose hits to.
    """
    held = ctx.cached_blocks
    if held is None or ctx.reuse_p <= 0:
        return None
    req = ctx.request
    new = req.prompt_tokens // req.block_size - ctx.matched_blocks
    np.maximum(new, 0, out=new)
    over = held + new
    over -= view.capacity_blocks
    np.clip(over, 0.0, new, out=over)
    over[view.capacity_blocks <= 0] = 0.0  # capacity unknown: no estimate
    # Each block computed again evicts another, needed again with the same probability: the
    # expected recomputations per eviction are p + p^2 + ... = p / (1 - p). The index measures p
    # over one cache's worth of evictions, so chains longer than that are not seen (the bound).
    p = min(ctx.reuse_p, 1.0 - 1.0 / max(2.0, float(held.sum())))
    over *= p / (1.0 - p) * req.block_size
    over *= view.inv_prefill_tps
    return over


def cost_s(ctx: CycleContext, view: WorkerView, keep: np.ndarray) -> np.ndarray:
    """Per row: the request's own wait, the work its evictions cause later, and the delay its
    work imposes on later requests.

    The work this choice causes is the request's ``own`` uncached prefill now plus the expected
    recomputation of what it evicts (`evicted_work_s`). Requests that arrive at a worker before
    this one's prefill ends queue behind that work: about ``arrival_rate / eligible workers *
    wait`` of them. Adding that externality makes the choice minimise everyone's wait, not only
    this request's, so a prefix that saves work is worth more when the tier is busy and nothing
    extra when it is idle.
    """
    wait, own = _wait(ctx, view)
    later = evicted_work_s(ctx, view)
    if later is not None:
        wait += later
        own += later
    if ctx.arrival_rate > 0:
        own *= ctx.arrival_rate / max(1, int(np.count_nonzero(keep)))
        own += 1.0
        wait *= own
    return wait


@register_plugin
class PrefillCostScorer(Scorer):
    """Cheapest estimated cost (own wait for prefill and KV, plus the delay imposed on others) wins."""

    type_name = "prefill_cost"

    def score(self, ctx: CycleContext, view: WorkerView, keep: np.ndarray) -> np.ndarray:
        cost = cost_s(ctx, view, keep)
        best = cost.min(where=keep, initial=np.inf)
        if not np.isfinite(best):
            return np.zeros(len(view))
        if best <= 0:  # an empty prompt on an idle worker: nothing to wait for
            return (cost <= 0).astype(np.float64)
        return best / cost
