"""``serve run configs/X.yaml`` entry point: validate the config, bind the deployments.

    ingress ──> decode ──> prefill          (decode orchestrates; prefill may scale to zero)
        └──────────┴──────────┴──> control  (liveness + metrics registry)
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from kv_transfer import EngineLayout, check_compatible, get_backend
from pd_serve.config import AppConfig, TierConfig
from pd_serve.control import Control
from pd_serve.ingress import Ingress
from pd_serve.model_source import offline_env, read_hf_config
from pd_serve.placement import check_node_fit, cluster_gpus_per_node, replica_bundles
from pd_serve.servers import ENGINE_TEARDOWN_S, DecodeServer, PrefillServer
from pd_serve.tiny_model import resolve_model

# Seconds Serve waits for a replica to stop before killing it (servers.ENGINE_TEARDOWN_S). A
# prefill replica also waits, before its engine stops, until decode has pulled the KV its last
# prefills produced (at most kv_transfer.lease_s): its tier gets room for that
# (PrefillServer.graceful_shutdown_s: 40 s on CPU, 95 s on GPU with lease_s 30).
GRACEFUL_SHUTDOWN_S = ENGINE_TEARDOWN_S


# Ray Serve's own knobs for a replica's request path (read in each replica process):
# - collect and freeze the start-up heap once the replica is up, so the GC's full passes no longer
#   walk vLLM's and transformers' import-time objects (pauses of 100+ ms under load, seen as
#   /health p99 of ~200 ms at 64 streams);
# - run the handle's router on the replica's own event loop, and user code on it too, instead
#   of handing each call between threads;
# - calls between replicas over Serve's gRPC transport instead of Ray actor calls: every replica
#   (control included) serves it; the ingress's and decode's handles ask for it themselves, since a
#   handle built in the driver carries the driver's default (orchestration CPU per 1k tokens at
#   one stream 2.98 -> 2.07, at 64 streams 0.42 -> 0.35; benchmarks/README.md).
SERVE_REPLICA_ENV = {
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
}


def pd_env(cfg: AppConfig) -> dict[str, str]:
    """Environment of every replica and the ingress. Offline mode only where the model is local:
    a hub id must reach the hub (with ``HF_TOKEN``, from the environment or the manifest's secret)."""
    return {**offline_env(cfg.model), "VLLM_NO_USAGE_STATS": "1", **SERVE_REPLICA_ENV}


def transport_env(cfg: AppConfig) -> dict[str, str]:
    """Connector variables that must reach vLLM's engine workers as configured.

    In the replica's Ray ``runtime_env`` they are the workers' process environment: vLLM 0.32
    copies the replica's runtime_env into its workers' (``vllm/engine/arg_utils.py``
    ``ray_runtime_env``, ``vllm/v1/executor/ray_executor_v2.py`` ``_build_runtime_env``), while
    the replica's ``os.environ`` reaches them only through ``setdefault`` (``initialize_worker``),
    where a value baked into the image would win."""
    kt = cfg.kv_transfer
    return {"UCX_TLS": kt.ucx_tls} if kt.backend == "nixl" and kt.ucx_tls else {}


def tier_options(cfg: AppConfig, tier: str) -> dict[str, Any]:
    """Ray Serve deployment options for one tier: sizing, resources and placement."""
    t: TierConfig = getattr(cfg, tier)
    opts: dict[str, Any] = {
        "name": f"{tier.capitalize()}Server",
        "max_ongoing_requests": t.max_ongoing_requests,
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": (PrefillServer.graceful_shutdown_s(cfg, GRACEFUL_SHUTDOWN_S[cfg.device])
                                        if tier == "prefill" else GRACEFUL_SHUTDOWN_S[cfg.device]),
        # internal hops: one access-log line per request per tier is noise (the ingress logs it)
        "logging_config": {"enable_access_log": False},
        "ray_actor_options": {
            "num_cpus": t.num_cpus,
            "runtime_env": {"env_vars": {**pd_env(cfg), **transport_env(cfg), **t.env}},
        },
    }
    r = cfg.router
    # Every policy runs in one of pd_serve's routers: they also send an ingress's stream
    # channel (a pinned call) to its decode replica.
    cls = {"prefix_aware": "PrefixAwareRouter", "round_robin": "RoundRobinRouter",
           "ray_default": "PowerOfTwoRouter"}[r.policy]
    opts["request_router_config"] = {
        "request_router_class": f"pd_serve.routing:{cls}",
        "request_router_kwargs": {"tier": tier, "block_size": cfg.block_size, "profiles": r.profiles},
        "request_routing_stats_period_s": r.stats_period_s,
    }
    if t.autoscaling is not None:
        a = t.autoscaling
        if tier == "decode":
            policy = {"policy_function": "pd_serve.autoscaling:DecodeKVUsagePolicy",
                      "policy_kwargs": {"target_kv_usage": a.target or 0.75, "min_replicas": a.min_replicas,
                                        "max_replicas": a.max_replicas}}
        else:
            policy = {"policy_function": "pd_serve.autoscaling:PrefillQueuePolicy",
                      "policy_kwargs": {"target_queued_tokens": a.target or 16384, "min_replicas": a.min_replicas,
                                        "max_replicas": a.max_replicas}}
        opts["autoscaling_config"] = {
            "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
            "initial_replicas": a.initial_replicas if a.initial_replicas is not None else a.min_replicas,
            "metrics_interval_s": 1, "look_back_period_s": 3,
            "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
            "policy": policy,
        }
    else:
        opts["num_replicas"] = t.fixed_replicas(1)
    if t.resources:
        opts["ray_actor_options"]["resources"] = dict(t.resources)
    if cfg.device == "gpu":
        # The replica actor holds no GPU itself (bundle 0, with the tier's `resources`); its
        # engine workers, one per TP x PP rank, take one GPU bundle each (pd_serve/placement.py).
        opts["placement_group_bundles"] = replica_bundles(cfg, tier)
        opts["placement_group_strategy"] = t.placement_strategy
    return opts


def tier_layouts(cfg: AppConfig) -> tuple[EngineLayout, EngineLayout]:
    """The KV layouts the prefill and decode engines will have, for the up-front compatibility
    check. Head counts come from the model's config.json, read wherever the weights come from
    (a local directory or the hub, pd_serve/model_source.py); None where it cannot be read."""
    hf = read_hf_config(cfg.model, revision=cfg.engine_args.get("revision")) or {}
    heads = hf.get("num_attention_heads")
    mla = bool(hf.get("kv_lora_rank"))  # DeepSeek-style MLA: one latent KV, no per-head split

    def layout(tier: str) -> EngineLayout:
        args = cfg.tier_engine_args(tier)
        return EngineLayout(
            model=cfg.model, dtype=str(args.get("dtype", "auto")), block_size=cfg.block_size,
            kv_cache_dtype=str(args.get("kv_cache_dtype", "auto")),
            num_kv_heads=hf.get("num_key_value_heads", heads),
            head_dim=hf.get("head_dim") or (hf["hidden_size"] // heads if heads and "hidden_size" in hf else None),
            num_layers=hf.get("num_hidden_layers"),
            tensor_parallel_size=getattr(cfg, tier).tensor_parallel_size, use_mla=mla)

    return layout("prefill"), layout("decode")


def build_app_from_config(cfg: AppConfig) -> Application:
    resolve_model(cfg.model)  # fail now, with the command to run, if the tiny model is missing
    if cfg.kv_transfer.backend is not None:
        get_backend(cfg.kv_transfer.backend).check_available()
        # refuse tiers that could not exchange KV before any engine starts
        check_compatible(*tier_layouts(cfg))
    if cfg.device == "gpu" and (gpus := cluster_gpus_per_node()) is not None:
        check_node_fit(cfg, gpus, source="the largest GPU node of this Ray cluster")
    raw = cfg.model_dump(mode="json")
    control = serve.deployment(Control, name="Control", num_replicas=1,
                               ray_actor_options={"num_cpus": 0.05, "runtime_env": {"env_vars": pd_env(cfg)}},
                               logging_config={"enable_access_log": False}).bind()
    prefill_sized = cfg.prefill.autoscaling is not None or cfg.prefill.fixed_replicas(1) > 0
    prefill = (serve.deployment(PrefillServer).options(**tier_options(cfg, "prefill")).bind(raw, control)
               if prefill_sized else None)
    decode = serve.deployment(DecodeServer).options(**tier_options(cfg, "decode")).bind(raw, control, prefill)
    return serve.deployment(Ingress).options(
        name="Ingress", num_replicas=cfg.ingress.replicas, max_ongoing_requests=1024,
        ray_actor_options={"num_cpus": cfg.ingress.num_cpus, "runtime_env": {"env_vars": pd_env(cfg)}},
    ).bind(raw, decode, control)


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve application builder (``import_path: pd_serve.app:build_app``)."""
    return build_app_from_config(AppConfig.model_validate(args))
