"""``max_score`` picker: the highest total score; among ties, the worker that was sent the
fewest requests lately; then uniformly at random.

Ties are scores within ``tie_tolerance`` of the best. They are common: every idle worker that
does not cache the prompt costs the same. Breaking them at random splits new prefixes unevenly
(12 over two workers: 4/8 or worse about two times in five), and since each prefix's later
requests follow it, one worker then carries most of the load. Breaking them by the requests each
worker was sent lately (decayed over about half a minute, `WorkerView.recent_routed`) gives a new
prefix to the worker with the smaller share. The random source is the scheduler's (seedable)
``random.Random``, so simulations are reproducible.

```yaml
plugins:
  - type: max_score
    params:
      tie_tolerance: 1.0e-9
```
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from scheduler.plugins.base import Picker, register_plugin


class MaxScoreParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tie_tolerance: float = Field(1e-9, ge=0, description="Scores this close to the best count as ties.")


@register_plugin
class MaxScorePicker(Picker):
    """Argmax; ties to the fewest recent requests, then uniformly at random."""

    type_name = "max_score"
    Params = MaxScoreParams
    params: MaxScoreParams

    def pick(self, scores: np.ndarray, rng: random.Random,
             recent: Callable[[], np.ndarray] | None = None) -> int:
        best = scores.max()
        ties = np.flatnonzero(scores >= best - self.params.tie_tolerance)
        if len(ties) == 1:
            return int(ties[0])
        if recent is not None:
            share = recent()[ties]
            ties = ties[share <= share.min()]
            if len(ties) == 1:
                return int(ties[0])
        return int(ties[rng.randrange(len(ties))])
