"""``healthy`` filter: drop workers marked unhealthy, or silent for too long.

```yaml
plugins:
  - type: healthy
    params:
      max_staleness_s: 30   # optional: drop workers whose last report is older (default: off)
```
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from scheduler.context import CycleContext
from scheduler.plugins.base import Filter, register_plugin
from scheduler.state import WorkerView


class HealthyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_staleness_s: float | None = Field(
        None, gt=0, description="Drop workers whose last stats report is older than this; null = never."
    )


@register_plugin
class HealthyFilter(Filter):
    """Keeps workers with ``healthy`` set (and, optionally, a recent stats report)."""

    type_name = "healthy"
    Params = HealthyParams
    params: HealthyParams

    def filter(self, ctx: CycleContext, view: WorkerView, keep: np.ndarray) -> np.ndarray:
        out = keep & view.healthy
        if self.params.max_staleness_s is not None:
            out &= view.updated_at >= ctx.now - self.params.max_staleness_s
        return out
