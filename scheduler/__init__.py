"""pd_serve's scheduler: prefix- and load-aware routing, the P/D decider, scaling arithmetic.

Pure Python (plus numpy, msgspec, xxhash, pydantic; pyzmq only inside `KVEventSubscriber`):
importing it never imports Ray, FastAPI or vLLM, so the simulator and unit tests use it as is.

Typical wiring, one scheduler per tier::

    decode = make_scheduler("decode", block_size=32)
    prefill = make_scheduler("prefill", block_size=32)
    decode.registry.sync(decode_replica_ids)                    # on membership change
    decode.registry.update(rid, kv_usage=0.4, num_running=3)    # on each stats report
    KVEventSubscriber(decode.index, "tcp://host:5557", rid).start()

    ctx = RequestContext.from_tokens(request_id, token_ids, block_size=32)
    d = decode.route(ctx)                        # -> Decision(worker, scores, matched_blocks, ...)
    decode.on_routed(ctx, d.worker)
    pd = decide_for(ctx, d, prefill)             # -> PDDecision(location, reason, uncached_tokens)
    if pd.remote:
        p = prefill.route(ctx); prefill.on_routed(ctx, p.worker)

See docs/scheduler.md.
"""

from scheduler.context import CycleContext, RequestContext
from scheduler.decider import (
    DeciderParams,
    DeciderReason,
    PDDecision,
    PrefillLocation,
    ReplicaLoad,
    count_eligible,
    decide,
    decide_for,
    wakes_prefill,
)
from scheduler.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventSubscriber,
    SubscriberStats,
    apply_batch,
    decode_batch,
    encode_batch,
)
from scheduler.framework import (
    DEFAULT_CONFIG,
    ConfigError,
    Decision,
    MetricsHook,
    NoEligibleWorker,
    Profile,
    RouteReason,
    Scheduler,
    SchedulerError,
    WEIGHTED_CONFIG,
    default_profiles,
    load_profiles,
    make_scheduler,
)
from scheduler.hashing import block_keys, engine_block_hashes, lora_seed
from scheduler.index import IndexStats, PrefixIndex
from scheduler.plugins import PLUGIN_TYPES, Filter, Picker, Plugin, Scorer, register_plugin
from scheduler.scaling import (
    DecodeScalingParams,
    PrefillScalingParams,
    ScaleDecision,
    recommend_decode,
    recommend_prefill,
)
from scheduler.state import WorkerRegistry, WorkerState, WorkerView

__all__ = [
    "DEFAULT_CONFIG",
    "PLUGIN_TYPES",
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "ConfigError",
    "CycleContext",
    "DeciderParams",
    "DeciderReason",
    "Decision",
    "DecodeScalingParams",
    "Filter",
    "IndexStats",
    "KVEventBatch",
    "KVEventSubscriber",
    "MetricsHook",
    "NoEligibleWorker",
    "PDDecision",
    "Picker",
    "Plugin",
    "PrefillLocation",
    "PrefillScalingParams",
    "PrefixIndex",
    "Profile",
    "ReplicaLoad",
    "RequestContext",
    "RouteReason",
    "ScaleDecision",
    "Scheduler",
    "SchedulerError",
    "Scorer",
    "SubscriberStats",
    "WorkerRegistry",
    "WorkerState",
    "WorkerView",
    "WEIGHTED_CONFIG",
    "apply_batch",
    "block_keys",
    "count_eligible",
    "decide",
    "decide_for",
    "decode_batch",
    "default_profiles",
    "encode_batch",
    "engine_block_hashes",
    "load_profiles",
    "lora_seed",
    "make_scheduler",
    "recommend_decode",
    "recommend_prefill",
    "register_plugin",
    "wakes_prefill",
]
