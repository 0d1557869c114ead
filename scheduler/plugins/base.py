"""Plugin interfaces (llm-d style) and the registry of plugin types.

A decision runs: filters (which workers may serve) → scorers (how well each one fits, in [0, 1])
→ one picker. Plugins are small, stateless apart from their validated ``params``, and operate on
the registry's column view (`scheduler.state.WorkerView`): one row per worker.

* ``Filter.filter(ctx, view, keep) -> keep'``: ``keep`` is a boolean row mask of the workers
  still eligible; return the subset that passes (never add rows).
* ``Scorer.score(ctx, view, keep) -> scores``: one float per row; rows outside ``keep`` are
  ignored. The framework clamps to [0, 1] and applies the profile's weight.
* ``Picker.pick(scores, rng, recent) -> row``: ``scores`` holds ``-inf`` for ineligible rows;
  ``recent()`` gives each row's requests routed there lately (for tie-breaks; computed on call).

Why rows and masks rather than ``list[Worker]`` / ``dict[worker, float]``: at 1,024 workers the
dictionary form costs ~0.5 ms a decision in CPython, the vector form ~60 µs (see
docs/scheduler.md). The contract is the same: a filter returns a subset of its input, a scorer
returns one score per worker.

Each plugin declares ``type_name`` (the ``type:`` in config) and a pydantic ``Params`` model
(``extra="forbid"``), and is registered with `register_plugin`.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from scheduler.context import CycleContext
from scheduler.state import WorkerView

__all__ = ["PLUGIN_TYPES", "Filter", "NoParams", "Picker", "Plugin", "Scorer", "register_plugin"]


class NoParams(BaseModel):
    """Parameters of a plugin that takes none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Plugin(ABC):
    """Base of all plugins: a config name plus validated parameters."""

    type_name: ClassVar[str]
    kind: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, name: str | None = None, params: BaseModel | dict[str, Any] | None = None) -> None:
        self.name = name or self.type_name
        if isinstance(params, BaseModel):
            if not isinstance(params, self.Params):
                raise TypeError(f"{self.type_name}: params must be {self.Params.__name__}")
            self.params = params
        else:
            self.params = self.Params.model_validate(params or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, params={self.params!r})"


class Filter(Plugin):
    """Removes workers that must not serve the request."""

    kind = "filter"

    @abstractmethod
    def filter(self, ctx: CycleContext, view: WorkerView, keep: np.ndarray) -> np.ndarray:
        """Return the rows of ``keep`` that pass. Called once per decision; no side effects."""


class Scorer(Plugin):
    """Rates each eligible worker in [0, 1] (higher is better)."""

    kind = "scorer"

    @abstractmethod
    def score(self, ctx: CycleContext, view: WorkerView, keep: np.ndarray) -> np.ndarray:
        """Return one score per row (values of rows outside ``keep`` are ignored).

        Called once per decision; no side effects. Out-of-range values are clamped.
        """


class Picker(Plugin):
    """Chooses one row from the weighted total scores."""

    kind = "picker"

    @abstractmethod
    def pick(self, scores: np.ndarray, rng: random.Random,
             recent: Callable[[], np.ndarray] | None = None) -> int:
        """Return the chosen row. ``scores`` has at least one finite entry; ``-inf`` = ineligible.
        ``recent``, where given, returns per row the requests routed there lately
        (`scheduler.state.WorkerView.recent_routed`), for breaking ties by load share."""


PLUGIN_TYPES: dict[str, type[Plugin]] = {}
"""Plugin classes by ``type_name``; the config loader looks types up here."""


def register_plugin(cls: type[Plugin]) -> type[Plugin]:
    """Class decorator: make ``cls`` available to configs under ``cls.type_name``."""
    existing = PLUGIN_TYPES.get(cls.type_name)
    if existing is not None and existing is not cls:
        raise ValueError(f"plugin type {cls.type_name!r} is already registered by {existing.__qualname__}")
    PLUGIN_TYPES[cls.type_name] = cls
    return cls
