"""``prefix`` scorer: the fraction of the request's full blocks a worker already caches.

Score = longest cached prefix (blocks, from the tier's `PrefixIndex`) / request blocks. A
request without a full block scores 0 everywhere. The match itself is computed once per decision
by the scheduler (``ctx.matched_blocks``), so several profiles can share it.

```yaml
plugins:
  - type: prefix
profiles:
  decode:
    plugins:
      - ref: prefix
        weight: 2
```
"""

from __future__ import annotations

import numpy as np

from scheduler.context import CycleContext
from scheduler.plugins.base import Scorer, register_plugin
from scheduler.state import WorkerView


@register_plugin
class PrefixScorer(Scorer):
    """Longest cached prefix as a fraction of the prompt's full blocks."""

    type_name = "prefix"

    def score(self, ctx: CycleContext, view: WorkerView, keep: np.ndarray) -> np.ndarray:
        n = len(ctx.request.block_keys)
        if n == 0:
            return np.zeros(len(view))
        return ctx.matched_blocks * (1.0 / n)
