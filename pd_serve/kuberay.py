"""Generate a KubeRay ``RayService`` manifest from a pd_serve serve config.

    python -m pd_serve.kuberay configs/llama70b.yaml --image REGISTRY/pd-serve:0.1.0-gpu \\
        > configs/kuberay/llama70b-rayservice.yaml

The serve config is embedded unchanged as ``spec.serveConfigV2`` (KubeRay hands it to Ray
Serve, which validates it with ``ServeDeploySchema``). The Ray cluster gets a CPU-only head
(``num-cpus: 0``, so no replica lands on it) and one GPU worker group per accelerator type of
the tiers, each pod one node with ``--gpus-per-node`` GPUs, sized from the tiers' replica
bounds. docs/gpu-cluster.md explains every choice; in short:

- **Scale-up.** A tier's ``accelerator_type: H100`` puts ``accelerator_type:H100`` in each GPU
  bundle (Ray's own encoding of the option). The KubeRay autoscaler knows a group's resources
  only from CPU, GPU, TPU, memory and declared custom resources (Ray's
  ``autoscaler/_private/kuberay/autoscaling_config.py``), so the group declares that resource in
  ``rayStartParams.resources``, with the value the raylet itself reports on such a node (1).
- **Weights.** A hub id: ``HF_TOKEN`` from a Kubernetes secret (``--hf-token-secret``) on every
  pod, head included (the app build reads config.json), and an HF cache volume
  (``--hf-cache-pvc``, else a node-local emptyDir). A local path: ``--model-pvc`` is mounted
  read-only at the model's parent directory on every pod.
- **RDMA.** Only when ``kv_transfer.ucx_tls`` lists an RDMA transport (rc, ud, dc, …): the
  workers then request ``--rdma-resource`` and get ``IPC_LOCK``. Otherwise NIXL runs over TCP.

The image must contain pd_serve installed with ``PD_SERVE_TARGET=gpu scripts/bootstrap.sh``
(vllm, nixl, ray[serve] at the pinned versions). The command that wrote a manifest is kept in
its ``pd-serve.io/generated-by`` annotation.
"""

from __future__ import annotations

import argparse
import json
import math
import posixpath
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from pd_serve.config import AppConfig
from pd_serve.model_source import is_local_model
from pd_serve.placement import TIERS, check_node_fit, node_slots

RAY_VERSION = "2.60.0"
GENERATED_BY = "pd-serve.io/generated-by"
HF_HOME = "/data/hf-cache"
# UCX transports that need an RDMA device (verbs): rc/ud/dc and their accelerated variants.
_RDMA_TLS = re.compile(r"^(rc|ud|dc|ib)(_[a-z0-9]+)?$")


class ManifestError(ValueError):
    """The config and the generator's options cannot make a working RayService."""


def wants_rdma(ucx_tls: str | None) -> bool:
    """Whether ``UCX_TLS`` asks for an RDMA transport. ``None`` lets UCX pick what the pod has,
    which is TCP in a pod without RDMA devices."""
    if not ucx_tls:
        return False
    items = {x.strip() for x in ucx_tls.lstrip("^").split(",")}
    if ucx_tls.startswith("^"):  # an exclusion list: RDMA stays in unless all of it is excluded
        return not ("ib" in items or {"rc", "ud", "dc"} <= items)
    return "all" in items or any(_RDMA_TLS.match(x) for x in items)


def _tier_pods(cfg: AppConfig, tier: str, bound: str, gpus_per_node: int) -> int:
    t = getattr(cfg, tier)
    if t.autoscaling is not None:
        n = t.autoscaling.max_replicas if bound == "max" else t.autoscaling.min_replicas
    else:
        n = t.fixed_replicas(1)
    return math.ceil(n / node_slots(cfg, tier, gpus_per_node))


def _resource_param(resources: dict[str, int]) -> str:
    """``rayStartParams.resources`` in the quoted form KubeRay passes on and the autoscaler parses:
    ``"{\\"Custom\\": 1}"``."""
    return '"' + json.dumps(resources).replace('"', '\\"') + '"'


def _group_name(accelerator_type: str | None) -> str:
    return "gpu" if accelerator_type is None else "gpu-" + re.sub(r"[^a-z0-9]+", "-", accelerator_type.lower()).strip("-")


def _weights(cfg: AppConfig, *, hf_token_secret: str | None, hf_cache_pvc: str | None,
             model_pvc: str | None) -> tuple[list[dict], list[dict], list[dict]]:
    """(env, volumes, volumeMounts) that give every pod the model's weights."""
    model = cfg.model
    if model.startswith("tiny://"):
        raise ManifestError("model: tiny:// models are built on the machine that runs them; set `model` "
                            "to a hub id or to a path on the volume named by --model-pvc")
    if is_local_model(model):
        if not model.startswith("/"):
            raise ManifestError(f"model: {model!r} is a relative path; write the absolute path where "
                                "--model-pvc is mounted, e.g. /models/Llama-3.1-70B-Instruct")
        if not model_pvc:
            raise ManifestError(f"model: {model!r} is a local path, so pass --model-pvc NAME (the "
                                "PersistentVolumeClaim holding it), or set `model` to a hub id")
        mount = posixpath.dirname(posixpath.normpath(model))
        if mount == "/":
            raise ManifestError(f"model: {model!r} sits at the root; write /models/<name> so the "
                                "volume has a directory of its own to mount on")
        return ([], [{"name": "model", "persistentVolumeClaim": {"claimName": model_pvc, "readOnly": True}}],
                [{"name": "model", "mountPath": mount, "readOnly": True}])
    if model_pvc:
        raise ManifestError(f"--model-pvc is for a model on a volume, but model: {model!r} is a hub id; "
                            "drop --model-pvc, or set `model` to the weights' path on that volume")
    env = [{"name": "HF_HOME", "value": HF_HOME}]
    if hf_token_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": hf_token_secret, "key": "token"}}})
    cache = ({"persistentVolumeClaim": {"claimName": hf_cache_pvc}} if hf_cache_pvc else {"emptyDir": {}})
    return env, [{"name": "hf-cache", **cache}], [{"name": "hf-cache", "mountPath": HF_HOME}]


def _rdma(cfg: AppConfig, rdma_resource: str | None) -> tuple[dict[str, str], dict[str, Any]]:
    """(extra worker resources, container securityContext) for NIXL over RDMA; empty for TCP."""
    ucx = cfg.kv_transfer.ucx_tls if cfg.kv_transfer.backend == "nixl" else None
    if not wants_rdma(ucx):
        if rdma_resource:
            raise ManifestError(f"--rdma-resource was given but kv_transfer.ucx_tls ({ucx!r}) lists no RDMA "
                                "transport: add `rc` (e.g. cuda_copy,cuda_ipc,rc,tcp) or drop --rdma-resource")
        return {}, {}
    if not rdma_resource:
        raise ManifestError(f"kv_transfer.ucx_tls ({ucx!r}) lists an RDMA transport, so the worker pods need "
                            "RDMA devices: pass --rdma-resource NAME[=COUNT] (your RDMA device plugin's "
                            "resource, e.g. rdma/rdma_shared_device_a=1), or drop rc/ud/dc from ucx_tls "
                            "to use TCP")
    name, _, count = rdma_resource.partition("=")
    return {name: count or "1"}, {"capabilities": {"add": ["IPC_LOCK"]}}


def rayservice(serve_config: dict[str, Any], *, name: str, image: str, gpus_per_node: int = 8,
               cpus_per_node: int = 96, memory_per_node: str = "1600Gi",
               hf_token_secret: str | None = "hf-token", hf_cache_pvc: str | None = None,
               model_pvc: str | None = None, rdma_resource: str | None = None,
               generated_by: str | None = None) -> dict[str, Any]:
    app = serve_config["applications"][0]
    cfg = AppConfig.model_validate(app["args"])
    if cfg.device != "gpu":
        raise ManifestError("the KubeRay manifest is for GPU clusters: use a config with device: gpu")
    check_node_fit(cfg, gpus_per_node, source="--gpus-per-node")
    env, volumes, mounts = _weights(cfg, hf_token_secret=hf_token_secret, hf_cache_pvc=hf_cache_pvc,
                                    model_pvc=model_pvc)
    rdma_resources, security = _rdma(cfg, rdma_resource)
    port = cfg.ingress.port
    container = {"image": image, "imagePullPolicy": "IfNotPresent", **({"env": env} if env else {})}

    groups: dict[str | None, list[str]] = {}
    for tier in TIERS:
        if _tier_pods(cfg, tier, "max", gpus_per_node):
            groups.setdefault(getattr(cfg, tier).accelerator_type, []).append(tier)
    worker_groups = []
    for accel, tiers in groups.items():
        min_pods = sum(_tier_pods(cfg, t, "min", gpus_per_node) for t in tiers)
        max_pods = sum(_tier_pods(cfg, t, "max", gpus_per_node) for t in tiers)
        limits = {"cpu": str(cpus_per_node), "memory": memory_per_node,
                  "nvidia.com/gpu": str(gpus_per_node), **rdma_resources}
        worker_groups.append({
            "groupName": _group_name(accel),
            "replicas": min_pods, "minReplicas": min_pods, "maxReplicas": max(max_pods, min_pods),
            "rayStartParams": ({"resources": _resource_param({f"accelerator_type:{accel}": 1})}
                               if accel else {}),
            "template": {"spec": {
                "containers": [{
                    "name": "ray-worker", **container,
                    "resources": {"limits": limits, "requests": dict(limits)},
                    **({"securityContext": security} if security else {}),
                    "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, *mounts],
                }],
                "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}, *volumes],
            }},
        })
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/name": "pd-serve"}}
    if generated_by:
        metadata["annotations"] = {GENERATED_BY: generated_by}
    head_spec: dict[str, Any] = {"containers": [{
        "name": "ray-head", **container,
        "resources": {"limits": {"cpu": "8", "memory": "32Gi"},
                      "requests": {"cpu": "8", "memory": "32Gi"}},
        "ports": [{"containerPort": 6379, "name": "gcs"},
                  {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": port, "name": "serve"}],
        **({"volumeMounts": mounts} if mounts else {}),
    }]}
    if volumes:
        head_spec["volumes"] = volumes
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": metadata,
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": {"spec": head_spec},
                },
                "workerGroupSpecs": worker_groups,
            },
        },
    }


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (serveConfigV2) as literal blocks, readable in review, and
    repeats shared parts (env, volumes) instead of YAML anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(str, lambda d, v: d.represent_scalar(
    "tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def dump(manifest: dict[str, Any]) -> str:
    return yaml.dump(manifest, Dumper=_Dumper, sort_keys=False)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pd_serve.kuberay",
                                 description="Write a KubeRay RayService manifest for a pd_serve config.")
    ap.add_argument("config", type=Path)
    ap.add_argument("--image", required=True, help="container image with pd_serve installed for GPUs")
    ap.add_argument("--name", default="pd-serve")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--hf-token-secret", default="hf-token",
                    help="hub ids: Kubernetes secret whose key `token` becomes HF_TOKEN on every pod; "
                         "'' for public models")
    ap.add_argument("--hf-cache-pvc", default=None,
                    help=f"hub ids: PersistentVolumeClaim for the HF cache ({HF_HOME}); default: a "
                         "node-local emptyDir, so each pod downloads the weights once")
    ap.add_argument("--model-pvc", default=None,
                    help="model paths: PersistentVolumeClaim holding the weights, mounted read-only at "
                         "the model's parent directory")
    ap.add_argument("--rdma-resource", default=None,
                    help="NAME[=COUNT]: RDMA device resource for the workers, required when "
                         "kv_transfer.ucx_tls lists rc/ud/dc")
    return ap


def from_args(a: argparse.Namespace, doc: dict[str, Any], generated_by: str | None) -> dict[str, Any]:
    return rayservice(doc, name=a.name, image=a.image, gpus_per_node=a.gpus_per_node,
                      hf_token_secret=a.hf_token_secret or None, hf_cache_pvc=a.hf_cache_pvc,
                      model_pvc=a.model_pvc, rdma_resource=a.rdma_resource, generated_by=generated_by)


def main() -> None:
    a = parser().parse_args()
    doc = yaml.safe_load(a.config.read_text())
    command = shlex.join(["python", "-m", "pd_serve.kuberay", *sys.argv[1:]])
    try:
        manifest = from_args(a, doc, command)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(dump(manifest), end="")


if __name__ == "__main__":
    main()
