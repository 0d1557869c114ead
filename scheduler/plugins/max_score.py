"""``max_score`` picker: the highest total score, ties broken uniformly at random.

Ties are scores within ``tie_tolerance`` of the best. The random source is the scheduler's
(seedable) ``random.Random``, so simulations are reproducible.

```yaml
plugins:
  - type: max_score
    params:
      tie_tolerance: 1.0e-9
```
"""

from __future__ import annotations

import random

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from scheduler.plugins.base import Picker, register_plugin


class MaxScoreParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tie_tolerance: float = Field(1e-9, ge=0, description="Scores this close to the best count as ties.")


@register_plugin
class MaxScorePicker(Picker):
    """Argmax with a uniform random tie-break."""

    type_name = "max_score"
    Params = MaxScoreParams
    params: MaxScoreParams

    def pick(self, scores: np.ndarray, rng: random.Random) -> int:
        best = scores.max()
        ties = np.flatnonzero(scores >= best - self.params.tie_tolerance)
        if len(ties) == 1:
            return int(ties[0])
        return int(ties[rng.randrange(len(ties))])
