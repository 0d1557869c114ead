"""How a tier's replicas are placed on a Ray cluster, and the rules Ray and vLLM enforce there.

One GPU replica is one Ray Serve replica actor plus one vLLM engine worker per TP x PP rank,
all in one placement group:

    bundle 0      {"CPU": num_cpus, **resources}        the replica actor (Serve pins it here)
    bundle 1..N   {"CPU": 1, "GPU": 1[, "accelerator_type:X": 0.001]}   one per engine worker

Each rule below is something Ray or vLLM 0.32 refuses at run time, long after ``serve run``
returned, turned into a config error that names the field and says what to write instead:

- ``num_gpus_per_worker`` must be 1 on GPUs. vLLM's Ray executor asks ``VLLM_RAY_PER_WORKER_GPUS``
  (1.0) GPU per worker (``vllm/v1/executor/ray_executor_v2.py`` ``_get_actor_resource_kwargs``)
  and refuses a bundle with more than one (``vllm/v1/executor/ray_utils.py``,
  ``initialize_ray_cluster``); a fraction leaves a bundle no worker fits in.
- Bundle 0 must hold something: Ray refuses a bundle whose resources are all 0
  (``ray/util/placement_group.py`` ``_validate_bundles``).
- The replica actor's own resources must be a subset of bundle 0
  (``ray/serve/_private/config.py`` ``_validate_placement_group_options``): ``replica_bundles``
  puts the tier's ``resources`` there, so this one holds by construction.
- ``STRICT_PACK`` puts every bundle on one node: TP x PP above a node's GPUs never places.
  A config does not know the node size; ``check_node_fit`` is called with it by the KubeRay
  generator (``--gpus-per-node``) and, at ``serve run``, with the largest GPU node of the
  running cluster.
- vLLM data parallelism inside a replica is reserved: every DP rank would open the NIXL side
  channel and the KV-event socket at ``port + dp_rank`` (``nixl/base_scheduler.py``,
  ``kv_events.py`` ``offset_endpoint_port``), and pd_serve claims one port of each per replica.
  Replicas are pd_serve's data parallelism.

Pure functions over the config; no Ray at import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pd_serve.config import AppConfig

TIERS = ("prefill", "decode")


class PlacementError(ValueError):
    """A tier could never be placed, or vLLM would refuse its placement."""


def check_placement(cfg: AppConfig) -> None:
    """The rules that need no cluster facts. Called by ``AppConfig`` validation."""
    for tier in TIERS:
        t = getattr(cfg, tier)
        for key, value in cfg.tier_engine_args(tier).items():
            if key.startswith("data_parallel_") and not (key == "data_parallel_size" and value == 1):
                raise PlacementError(
                    f"{tier}: engine_args.{key} is reserved: each pd_serve replica runs one engine, "
                    "with one NIXL side-channel port and one KV-event port (vLLM would use port + "
                    "dp_rank for every DP rank). Remove it and scale with the tier's `replicas` or "
                    "`autoscaling.max_replicas` instead")
        if cfg.device != "gpu":
            continue
        if t.num_gpus_per_worker != 1:
            raise PlacementError(
                f"{tier}.num_gpus_per_worker is {t.num_gpus_per_worker:g}: vLLM's Ray executor gives "
                "each engine worker exactly one GPU (it refuses a bundle with more, and a fraction "
                f"never schedules). Write `num_gpus_per_worker: 1` and set `{tier}.tensor_parallel_size` "
                "(x pipeline_parallel_size) to the GPUs each engine should use")
        if t.num_cpus <= 0 and not any(v > 0 for v in t.resources.values()):
            raise PlacementError(
                f"{tier}.num_cpus is 0: the replica actor takes the placement group's first bundle, "
                "and Ray refuses a bundle with only 0 resources. Write `num_cpus: 1` (or more)")


def replica_bundles(cfg: AppConfig, tier: str) -> list[dict[str, float]]:
    """Placement-group bundles of one GPU replica: the actor's bundle, then one per engine worker."""
    t = getattr(cfg, tier)
    accel = {f"accelerator_type:{t.accelerator_type}": 0.001} if t.accelerator_type else {}
    first = {"CPU": float(t.num_cpus), **{k: float(v) for k, v in t.resources.items()}}
    return [first] + [{"CPU": 1.0, "GPU": float(t.num_gpus_per_worker), **accel}
                      for _ in range(t.world_size)]


def check_node_fit(cfg: AppConfig, gpus_per_node: int, *, source: str) -> None:
    """Refuse ``STRICT_PACK`` tiers whose engine needs more GPUs than one node has.

    ``source`` says where ``gpus_per_node`` came from, for the message."""
    for tier in TIERS:
        t = getattr(cfg, tier)
        if cfg.device == "gpu" and t.placement_strategy == "STRICT_PACK" and t.world_size > gpus_per_node:
            raise PlacementError(
                f"{tier}: tensor_parallel_size x pipeline_parallel_size = {t.world_size} GPUs, but "
                f"{source} has {gpus_per_node} GPUs per node and `placement_strategy: STRICT_PACK` "
                f"keeps one replica on one node. Set `{tier}.tensor_parallel_size` to at most "
                f"{gpus_per_node}, or `{tier}.placement_strategy: PACK` to span nodes")


def cluster_gpus_per_node() -> int | None:
    """GPUs of the largest live node of the connected Ray cluster; None outside Ray or with no
    GPU node up yet (an autoscaler may still add them)."""
    import ray

    if not ray.is_initialized():
        return None
    gpus = [n.get("Resources", {}).get("GPU", 0) for n in ray.nodes() if n.get("Alive")]
    most = int(max(gpus, default=0))
    return most or None


def node_slots(cfg: AppConfig, tier: str, gpus_per_node: int) -> float:
    """Replicas of ``tier`` one node holds (a fraction: nodes one replica spans, inverted)."""
    ws = getattr(cfg, tier).world_size
    return gpus_per_node // ws if ws <= gpus_per_node else gpus_per_node / ws


def pin_process(cores: list[int] | None) -> None:
    """Move every thread of this process onto ``cores`` (``replica_cpu_cores``); threads it
    starts later inherit it. Processes already started (an engine's EngineCore and workers,
    which bind their own threads) keep theirs. A core this machine lacks is skipped; none
    left: nothing changes."""
    if not cores:
        return
    import os

    allowed = set(cores) & os.sched_getaffinity(0)
    if not allowed:
        return
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), allowed)
        except OSError:  # a thread that just exited
            pass
