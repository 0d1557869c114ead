"""Built-in scheduling plugins; importing this package registers them in `PLUGIN_TYPES`."""

from scheduler.plugins.base import PLUGIN_TYPES, Filter, NoParams, Picker, Plugin, Scorer, register_plugin
from scheduler.plugins.healthy import HealthyFilter
from scheduler.plugins.kv_headroom import KvHeadroomScorer
from scheduler.plugins.max_score import MaxScorePicker
from scheduler.plugins.prefill_cost import PrefillCostScorer
from scheduler.plugins.prefix import PrefixScorer
from scheduler.plugins.queue_depth import QueueScorer
from scheduler.plugins.saturated import SaturatedFilter

__all__ = [
    "PLUGIN_TYPES",
    "Filter",
    "HealthyFilter",
    "KvHeadroomScorer",
    "MaxScorePicker",
    "NoParams",
    "Picker",
    "Plugin",
    "PrefillCostScorer",
    "PrefixScorer",
    "QueueScorer",
    "SaturatedFilter",
    "Scorer",
    "register_plugin",
]
