"""The shipped RayService manifest is what the generator writes, and passes KubeRay's CRD schema
and Ray Serve's own schema for the embedded serve config."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from pd_serve.kuberay import dump, rayservice
from tests.unit.conftest import ROOT

CRD = ROOT.parent / "shared" / "kuberay" / "ray.io_rayservices.yaml"
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
    if not CRD.exists():
        pytest.fail(f"the RayService CRD is expected at {CRD} (shared/kuberay)")
    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _to_json_schema(version["schema"]["openAPIV3Schema"])


def test_shipped_manifest_is_generated_from_the_config() -> None:
    doc = yaml.safe_load((ROOT / "configs" / "llama70b.yaml").read_text())
    shipped = yaml.safe_load(MANIFEST.read_text())
    regenerated = yaml.safe_load(dump(rayservice(doc, name=shipped["metadata"]["name"],
                                                 image=shipped["spec"]["rayClusterConfig"]["headGroupSpec"]
                                                 ["template"]["spec"]["containers"][0]["image"])))
    assert shipped == regenerated, "regenerate with: python -m pd_serve.kuberay configs/llama70b.yaml ..."


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
    group = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    # prefill 1..4 and decode 1..8 replicas of TP=8 on 8-GPU nodes
    assert (group["minReplicas"], group["maxReplicas"]) == (2, 12)
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_cpu_config_is_refused() -> None:
    doc = yaml.safe_load((ROOT / "configs" / "tiny-cpu.yaml").read_text())
    with pytest.raises(ValueError, match="device: gpu"):
        rayservice(doc, name="x", image="y")
