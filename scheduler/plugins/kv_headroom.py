"""``kv_headroom`` scorer: free KV cache, ``1 - kv_usage``.

Prefers engines with room for the request's blocks (fewer preemptions, more cache kept).

```yaml
plugins:
  - type: kv_headroom
profiles:
  decode:
    plugins:
      - ref: kv_headroom
        weight: 1
```
"""

from __future__ import annotations

import numpy as np

from scheduler.context import CycleContext
from scheduler.plugins.base import Scorer, register_plugin
from scheduler.state import WorkerView


@register_plugin
class KvHeadroomScorer(Scorer):
    """Score = 1 - ``kv_cache_usage_perc``."""

    type_name = "kv_headroom"

    def score(self, ctx: CycleContext, view: WorkerView, keep: np.ndarray) -> np.ndarray:
        return 1.0 - view.kv_usage
