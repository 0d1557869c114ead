"""``queue`` scorer: fewer queued requests score higher, relative to the busiest eligible worker.

load = max(num_running + num_waiting, num_inflight), where ``num_inflight`` is what this router
sent and has not seen finish (fresher than the engine's last report). Score = 1 - load /
max(load over eligible workers); all 1 when every eligible worker is idle. Scale-free: no
"typical queue length" to tune.

```yaml
plugins:
  - type: queue
profiles:
  decode:
    plugins:
      - ref: queue
        weight: 1
```
"""

from __future__ import annotations

import numpy as np

from scheduler.context import CycleContext
from scheduler.plugins.base import Scorer, register_plugin
from scheduler.state import WorkerView


@register_plugin
class QueueScorer(Scorer):
    """Normalized inverse of the request load."""

    type_name = "queue"

    def score(self, ctx: CycleContext, view: WorkerView, keep: np.ndarray) -> np.ndarray:
        load = np.maximum(view.num_running + view.num_waiting, view.num_inflight)
        top = load.max(where=keep, initial=0.0)
        if top <= 0:
            return np.ones(len(view))
        return 1.0 - load * (1.0 / top)
