"""Generate a KubeRay ``RayService`` manifest from a pd_serve serve config.

    python -m pd_serve.kuberay configs/llama70b.yaml --image REGISTRY/pd-serve:0.1.0-gpu \\
        > configs/kuberay/llama70b-rayservice.yaml

The serve config is embedded unchanged as ``spec.serveConfigV2`` (KubeRay hands it to Ray
Serve, which validates it with ``ServeDeploySchema``). The Ray cluster gets a CPU-only head
(``num-cpus: 0``, so no replica lands on it) and one GPU worker group sized from the tiers:
each worker pod is one node with ``--gpus-per-node`` GPUs; max pods cover both tiers at their
``max_replicas``. The image must contain pd_serve installed with
``PD_SERVE_TARGET=gpu scripts/bootstrap.sh`` (vllm, nixl, ray[serve] at the pinned versions).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import yaml

from pd_serve.config import AppConfig

RAY_VERSION = "2.60.0"


def _tier_gpus(cfg: AppConfig, tier: str, bound: str) -> int:
    t = getattr(cfg, tier)
    if t.autoscaling is not None:
        n = t.autoscaling.max_replicas if bound == "max" else t.autoscaling.min_replicas
    else:
        n = t.fixed_replicas(1)
    return n * t.world_size * math.ceil(t.num_gpus_per_worker)


def rayservice(serve_config: dict[str, Any], *, name: str, image: str, gpus_per_node: int = 8,
               cpus_per_node: int = 96, memory_per_node: str = "1600Gi") -> dict[str, Any]:
    app = serve_config["applications"][0]
    cfg = AppConfig.model_validate(app["args"])
    if cfg.device != "gpu":
        raise ValueError("the KubeRay manifest is for GPU clusters: use a config with device: gpu")
    min_pods = math.ceil((_tier_gpus(cfg, "prefill", "min") + _tier_gpus(cfg, "decode", "min")) / gpus_per_node)
    max_pods = math.ceil((_tier_gpus(cfg, "prefill", "max") + _tier_gpus(cfg, "decode", "max")) / gpus_per_node)
    port = cfg.ingress.port
    container = {"image": image, "imagePullPolicy": "IfNotPresent"}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "pd-serve"}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": {"spec": {"containers": [{
                        "name": "ray-head", **container,
                        "resources": {"limits": {"cpu": "8", "memory": "32Gi"},
                                      "requests": {"cpu": "8", "memory": "32Gi"}},
                        "ports": [{"containerPort": 6379, "name": "gcs"},
                                  {"containerPort": 8265, "name": "dashboard"},
                                  {"containerPort": port, "name": "serve"}],
                    }]}},
                },
                "workerGroupSpecs": [{
                    "groupName": "gpu",
                    "replicas": min_pods, "minReplicas": min_pods, "maxReplicas": max(max_pods, min_pods),
                    "rayStartParams": {},
                    "template": {"spec": {
                        "containers": [{
                            "name": "ray-worker", **container,
                            "resources": {
                                "limits": {"cpu": str(cpus_per_node), "memory": memory_per_node,
                                           "nvidia.com/gpu": str(gpus_per_node)},
                                "requests": {"cpu": str(cpus_per_node), "memory": memory_per_node,
                                             "nvidia.com/gpu": str(gpus_per_node)}},
                            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
                        }],
                        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
                    }},
                }],
            },
        },
    }


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (serveConfigV2) as literal blocks, readable in review."""


_Dumper.add_representer(str, lambda d, v: d.represent_scalar(
    "tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def dump(manifest: dict[str, Any]) -> str:
    return yaml.dump(manifest, Dumper=_Dumper, sort_keys=False)


def main() -> None:
    ap = argparse.ArgumentParser(description="Write a KubeRay RayService manifest for a pd_serve config.")
    ap.add_argument("config", type=Path)
    ap.add_argument("--image", required=True, help="container image with pd_serve installed for GPUs")
    ap.add_argument("--name", default="pd-serve")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    a = ap.parse_args()
    doc = yaml.safe_load(a.config.read_text())
    print(dump(rayservice(doc, name=a.name, image=a.image, gpus_per_node=a.gpus_per_node)), end="")


if __name__ == "__main__":
    main()
