"""``saturated`` filter: drop workers whose KV cache is nearly full or whose queue is long.

A saturated decode engine would preempt or queue the request; a saturated prefill tier makes
the P/D decider prefill locally instead (`scheduler.decider`).

```yaml
plugins:
  - type: saturated
    params:
      kv_usage_threshold: 0.95  # drop when kv_cache_usage_perc >= this
      max_waiting: 32           # drop when num_requests_waiting > this
```
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from scheduler.context import CycleContext
from scheduler.plugins.base import Filter, register_plugin
from scheduler.state import WorkerView


class SaturatedParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kv_usage_threshold: float = Field(
        0.95, gt=0, le=1, description="A worker with KV-cache usage at or above this is saturated."
    )
    max_waiting: int = Field(32, ge=0, description="A worker with more waiting requests than this is saturated.")


@register_plugin
class SaturatedFilter(Filter):
    """Keeps workers with ``kv_usage < kv_usage_threshold`` and ``num_waiting <= max_waiting``."""

    type_name = "saturated"
    Params = SaturatedParams
    params: SaturatedParams

    def filter(self, ctx: CycleContext, view: WorkerView, keep: np.ndarray) -> np.ndarray:
        p = self.params
        return keep & (view.kv_usage < p.kv_usage_threshold) & (view.num_waiting <= p.max_waiting)
