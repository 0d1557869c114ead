"""``serve run configs/X.yaml`` entry point: validate the config, bind the deployments.

    ingress ──> decode ──> prefill          (decode orchestrates; prefill may scale to zero)
        └──────────┴──────────┴──> control  (liveness + metrics registry)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from kv_transfer import EngineLayout, check_compatible, get_backend
from pd_serve.config import AppConfig, TierConfig
from pd_serve.control import Control
from pd_serve.ingress import Ingress
from pd_serve.servers import DecodeServer, PrefillServer
from pd_serve.tiny_model import resolve_model

_PD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
}


def tier_options(cfg: AppConfig, tier: str) -> dict[str, Any]:
    """Ray Serve deployment options for one tier: sizing, resources and placement."""
    t: TierConfig = getattr(cfg, tier)
    opts: dict[str, Any] = {
        "name": f"{tier.capitalize()}Server",
        "max_ongoing_requests": t.max_ongoing_requests,
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": 5,
        # internal hops: one access-log line per request per tier is noise (the ingress logs it)
        "logging_config": {"enable_access_log": False},
        "ray_actor_options": {
            "num_cpus": t.num_cpus,
            "runtime_env": {"env_vars": {**_PD_ENV, **t.env}},
        },
    }
    r = cfg.router
    if r.policy != "ray_default":
        cls = "PrefixAwareRouter" if r.policy == "prefix_aware" else "RoundRobinRouter"
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
    if t.accelerator_type:
        opts["ray_actor_options"]["accelerator_type"] = t.accelerator_type
    if cfg.device == "gpu":
        # The replica actor holds no GPU itself; its engine workers (one per TP x PP rank)
        # each take one bundle, packed onto one node.
        opts["placement_group_bundles"] = [{"CPU": t.num_cpus, "GPU": 0}] + [
            {"CPU": 1, "GPU": t.num_gpus_per_worker, **({f"accelerator_type:{t.accelerator_type}": 0.001}
                                                       if t.accelerator_type else {})}
            for _ in range(t.world_size)]
        opts["placement_group_strategy"] = t.placement_strategy
        opts["ray_actor_options"].pop("accelerator_type", None)
    return opts


def tier_layout(cfg: AppConfig, tier: str) -> EngineLayout:
    """The KV layout one tier's engines will have, for the up-front compatibility check.
    Head counts come from the model's config.json when the model is a local directory."""
    args = cfg.tier_engine_args(tier)
    hf: dict[str, Any] = {}
    path = Path(resolve_model(cfg.model)) / "config.json"
    if path.is_file():
        hf = json.loads(path.read_text())
        hf = hf.get("text_config", hf)
    heads = hf.get("num_attention_heads")
    return EngineLayout(
        model=cfg.model, dtype=str(args.get("dtype", "auto")), block_size=cfg.block_size,
        kv_cache_dtype=str(args.get("kv_cache_dtype", "auto")),
        num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or (hf["hidden_size"] // heads if heads and "hidden_size" in hf else None),
        num_layers=hf.get("num_hidden_layers"),
        tensor_parallel_size=getattr(cfg, tier).tensor_parallel_size)


def build_app_from_config(cfg: AppConfig) -> Application:
    resolve_model(cfg.model)  # fail now, with the command to run, if the tiny model is missing
    if cfg.kv_transfer.backend is not None:
        get_backend(cfg.kv_transfer.backend).check_available()
        # refuse tiers that could not exchange KV before any engine starts
        check_compatible(tier_layout(cfg, "prefill"), tier_layout(cfg, "decode"))
    raw = cfg.model_dump(mode="json")
    control = serve.deployment(Control, name="Control", num_replicas=1,
                               ray_actor_options={"num_cpus": 0.05},
                               logging_config={"enable_access_log": False}).bind()
    prefill_sized = cfg.prefill.autoscaling is not None or cfg.prefill.fixed_replicas(1) > 0
    prefill = (serve.deployment(PrefillServer).options(**tier_options(cfg, "prefill")).bind(raw, control)
               if prefill_sized else None)
    decode = serve.deployment(DecodeServer).options(**tier_options(cfg, "decode")).bind(raw, control, prefill)
    return serve.deployment(Ingress).options(
        name="Ingress", num_replicas=cfg.ingress.replicas, max_ongoing_requests=1024,
        ray_actor_options={"num_cpus": cfg.ingress.num_cpus, "runtime_env": {"env_vars": _PD_ENV}},
    ).bind(raw, decode, control)


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve application builder (``import_path: pd_serve.app:build_app``)."""
    return build_app_from_config(AppConfig.model_validate(args))
