"""The shipped RayService manifest is what the generator writes, and passes KubeRay's CRD schema
and Ray Serve's own schema for the embedded serve config."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from pd_serve.kuberay import GENERATED_BY, dump, from_args, parser, rayservice
from tests.unit.conftest import ROOT

# The RayService CRD's v1 schema (KubeRay v1.7, Apache-2.0): see tests/data/kuberay/README.md.
CRD_SCHEMA = ROOT / "tests" / "data" / "kuberay" / "rayservice-v1-openapi.json"
MANIFEST = ROOT / "configs" / "kuberay" / "llama70b-rayservice.yaml"


def _to_json_schema(node):
    """OpenAPI v3 (Kubernetes flavour) -> JSON Schema: drop x-kubernetes-* extensions, let
    int-or-string fields take both."""
    if isinstance(node, dict):
        out = {k: _to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
        if node.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        return out
    if isinstance(node, list):
        return [_to_json_schema(v) for v in node]
    return node


def _crd_schema() -> dict:
    return _to_json_schema(json.loads(CRD_SCHEMA.read_text()))


def test_shipped_manifest_is_generated_from_the_config() -> None:
    """The manifest records the generator command that wrote it; running it again gives it back."""
    shipped = yaml.safe_load(MANIFEST.read_text())
    command = shipped["metadata"]["annotations"][GENERATED_BY]
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "pd_serve.kuberay"]
    a = parser().parse_args(argv[3:])
    doc = yaml.safe_load((ROOT / a.config).read_text())
    regenerated = yaml.safe_load(dump(from_args(a, doc, command)))
    assert shipped == regenerated, f"regenerate with: {command} > {MANIFEST.relative_to(ROOT)}"


def test_manifest_passes_the_rayservice_crd_schema() -> None:
    manifest = yaml.safe_load(MANIFEST.read_text())
    jsonschema.validate(manifest, _crd_schema())
    broken = yaml.safe_load(MANIFEST.read_text())
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _crd_schema())


def test_embedded_serve_config_passes_ray_serve_schema_and_sizes_the_gpu_group() -> None:
    from ray.serve.schema import ServeDeploySchema

    manifest = yaml.safe_load(MANIFEST.read_text())
    serve_cfg = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)
    [group] = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    # prefill 1..4 and decode 1..8 replicas of TP=8 on 8-GPU nodes
    assert (group["minReplicas"], group["maxReplicas"]) == (2, 12)
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert group["rayStartParams"]["resources"] == '"{\\"accelerator_type:H100\\": 1}"'


def test_manifest_variants_pass_the_crd_schema() -> None:
    """Model on a volume, RDMA on, two accelerator types, TP 4 packed two to a node: every
    optional part the generator writes is still a valid RayService."""
    doc = yaml.safe_load((ROOT / "configs" / "llama70b.yaml").read_text())
    args = doc["applications"][0]["args"]
    args["model"] = "/models/Llama-3.1-70B-Instruct"
    args["kv_transfer"]["ucx_tls"] = "cuda_copy,rc,tcp"
    args["prefill"]["accelerator_type"] = "H200"
    args["decode"]["tensor_parallel_size"] = 4
    manifest = rayservice(doc, name="pd", image="img", model_pvc="weights", rdma_resource="rdma/ib=1")
    jsonschema.validate(yaml.safe_load(dump(manifest)), _crd_schema())
    groups = {g["groupName"]: g for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert (groups["gpu-h200"]["minReplicas"], groups["gpu-h200"]["maxReplicas"]) == (1, 4)
    assert (groups["gpu-h100"]["minReplicas"], groups["gpu-h100"]["maxReplicas"]) == (1, 4)  # 8 TP-4 replicas, 2 a node


def test_cpu_config_is_refused() -> None:
    doc = yaml.safe_load((ROOT / "configs" / "tiny-cpu.yaml").read_text())
    with pytest.raises(ValueError, match="device: gpu"):
        rayservice(doc, name="x", image="y")
