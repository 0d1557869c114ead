"""The GPU path as vLLM 0.32 and Ray 2.60 will see it on a cluster (issue 12).

No GPU here, so each test checks what pd_serve hands to Ray and vLLM (the Serve deployment
options, the placement-group bundles, the engine plan, the RayService manifest) against what
their source requires. Paths are relative to site-packages of the pinned versions; line numbers
are vLLM 0.32.0's and Ray 2.60.0's.
"""

from __future__ import annotations

import copy
import logging

import pytest
import yaml
from pydantic import ValidationError

from kv_transfer import EngineLayout, IncompatibleTiersError, check_compatible
from pd_serve.app import build_app, tier_layouts, tier_options
from pd_serve.config import AppConfig
from pd_serve.engine import plan_engine
from pd_serve.kuberay import ManifestError, rayservice
from pd_serve.model_source import ModelSourceError, is_local_model, read_hf_config
from pd_serve.placement import PlacementError, check_node_fit, replica_bundles
from tests.unit.conftest import ROOT, config_args
from tests.unit.hub import LLAMA_70B_CONFIG, stub_hub
from tests.unit.test_app_graph import _graph

HUB_ID = "meta-llama/Llama-3.1-70B-Instruct"


def _doc() -> dict:
    return yaml.safe_load((ROOT / "configs" / "llama70b.yaml").read_text())


def _args(**tiers) -> dict:
    args = config_args("llama70b.yaml")
    for tier, changes in tiers.items():
        args[tier].update(changes)
    return args


def _err(args: dict) -> str:
    with pytest.raises(ValidationError) as e:
        AppConfig.model_validate(args)
    return str(e.value)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    return stub_hub(monkeypatch, tmp_path, {HUB_ID: LLAMA_70B_CONFIG})


# --- 1. Model weights -------------------------------------------------------------------------

def test_offline_mode_only_where_the_model_is_local(hub, tmp_path, monkeypatch) -> None:
    """A hub id needs the hub: HF_HUB_OFFLINE=1 on the engines or the ingress tokenizer makes
    every download fail. The tiny local model keeps offline mode, as before."""
    g = _graph(build_app(config_args("llama70b.yaml")))
    for name in ("Ingress", "PrefillServer", "DecodeServer"):
        env = g[name]._replica_config.ray_actor_options["runtime_env"]["env_vars"]
        assert "HF_HUB_OFFLINE" not in env and "TRANSFORMERS_OFFLINE" not in env, name
        assert env["VLLM_NO_USAGE_STATS"] == "1"
    monkeypatch.setenv("PD_SERVE_CACHE", str(tmp_path))
    (tmp_path / "tiny-llama").mkdir()
    (tmp_path / "tiny-llama" / "config.json").write_text('{"num_attention_heads": 4, "num_key_value_heads": 2}')
    g = _graph(build_app(config_args("tiny-cpu.yaml")))
    for name in ("Ingress", "PrefillServer", "DecodeServer"):
        env = g[name]._replica_config.ray_actor_options["runtime_env"]["env_vars"]
        assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1", name


def test_which_models_are_local() -> None:
    assert is_local_model("tiny://llama") and is_local_model("/models/llama-70b")
    assert is_local_model("./weights") and not is_local_model(HUB_ID)
    assert not is_local_model("gpt2")


def test_hub_model_config_is_read_so_the_kv_checks_run(hub) -> None:
    """Before, ``tier_layout`` read config.json only from a local directory, so a hub id left
    every head count None and the KV-head checks silently passed."""
    cfg = AppConfig.model_validate(_args())
    prefill, decode = tier_layouts(cfg)
    assert hub == [(HUB_ID, "config.json", None)]
    assert (prefill.num_kv_heads, prefill.head_dim, prefill.num_layers) == (8, 128, 80)
    assert decode == EngineLayout(model=HUB_ID, dtype="bfloat16", block_size=16, num_kv_heads=8,
                                  head_dim=128, num_layers=80, tensor_parallel_size=8)


def test_hub_revision_is_passed_on(monkeypatch, tmp_path) -> None:
    calls = stub_hub(monkeypatch, tmp_path, {HUB_ID: LLAMA_70B_CONFIG})
    args = _args()
    args["engine_args"]["revision"] = "abc123"
    tier_layouts(AppConfig.model_validate(args))
    assert calls == [(HUB_ID, "config.json", "abc123")]


def test_gated_hub_model_without_access_fails_at_build_saying_what_to_do(monkeypatch, tmp_path) -> None:
    from huggingface_hub.errors import GatedRepoError

    monkeypatch.delenv("HF_TOKEN", raising=False)
    stub_hub(monkeypatch, tmp_path, error=GatedRepoError("401 gated", response=_response(401)))
    with pytest.raises(ModelSourceError, match="gated.*HF_TOKEN is not set.*--hf-token-secret"):
        build_app(config_args("llama70b.yaml"))


def test_unreachable_hub_skips_the_checks_with_a_warning(monkeypatch, tmp_path, caplog) -> None:
    """No network on the node that builds the app is not proof that the engines lack the model
    (they may have a cache): build on, and say loudly which checks did not run."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    stub_hub(monkeypatch, tmp_path, error=LocalEntryNotFoundError("no connection"))
    with caplog.at_level(logging.WARNING, logger="pd_serve.model_source"):
        assert read_hf_config(HUB_ID) is None
        assert "DecodeServer" in _graph(build_app(config_args("llama70b.yaml")))
    assert "KV-layout checks between the tiers skipped" in caplog.text


def test_local_model_without_config_json_is_refused(tmp_path) -> None:
    args = _args()
    args["model"] = str(tmp_path / "absent")
    with pytest.raises(ModelSourceError, match="model: .*absent.*--model-pvc"):
        build_app(args)


def test_manifest_gives_hub_models_a_token_and_a_cache_on_every_pod() -> None:
    m = rayservice(_doc(), name="x", image="img", hf_cache_pvc="hf-cache")
    cluster = m["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:  # the head builds the app, which reads config.json from the hub
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
        assert {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}} in pod["volumes"]
        assert {"name": "hf-cache", "mountPath": env["HF_HOME"]["value"]} in pod["containers"][0]["volumeMounts"]
    public = rayservice(_doc(), name="x", image="img", hf_token_secret=None)
    head = public["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert [e["name"] for e in head["env"]] == ["HF_HOME"]


def test_manifest_mounts_a_model_volume_for_a_model_path() -> None:
    doc = _doc()
    doc["applications"][0]["args"]["model"] = "/models/Llama-3.1-70B-Instruct"
    with pytest.raises(ManifestError, match="--model-pvc"):
        rayservice(doc, name="x", image="img")
    m = rayservice(doc, name="x", image="img", model_pvc="llama-70b-weights")
    cluster = m["spec"]["rayClusterConfig"]
    for pod in [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]:
        assert {"name": "model", "persistentVolumeClaim": {"claimName": "llama-70b-weights", "readOnly": True}} in pod["volumes"]
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in pod["containers"][0]["volumeMounts"]
        assert "HF_TOKEN" not in str(pod)
    with pytest.raises(ManifestError, match="hub id"):
        rayservice(_doc(), name="x", image="img", model_pvc="llama-70b-weights")


# --- 2. KubeRay scale-up ----------------------------------------------------------------------

def test_kuberay_autoscaler_can_place_every_replica_of_both_tiers(hub) -> None:
    """Ray 2.60 ``autoscaler/_private/kuberay/autoscaling_config.py``: a group's node type has
    only CPU, GPU, TPU, memory (``_get_ray_resources_from_group_spec``, L234-316) and the custom
    resources of the group's ``resources`` or ``rayStartParams.resources`` (``_get_custom_resources``,
    L502-560). A bundle asking for ``accelerator_type:H100`` that no node type offers is
    infeasible, so the tiers could not scale past the pods that already exist. Here Ray's own
    function derives the node types from the generated manifest, and every tier's placement group
    (the bundles Serve will create, from the embedded serve config) must fit one node type."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    for variant in ("shipped", "mixed"):
        doc = _doc()
        if variant == "mixed":  # a tier on another accelerator gets a group of its own
            doc["applications"][0]["args"]["prefill"]["accelerator_type"] = "H200"
        manifest = rayservice(doc, name="pd", image="img")
        cluster = manifest["spec"]["rayClusterConfig"]
        types = _derive_autoscaling_config_from_ray_cr(
            {"metadata": {"name": "pd", "namespace": "default"}, "spec": cluster})["available_node_types"]
        workers = {k: v for k, v in types.items() if k != "headgroup"}
        g = _graph(build_app(yaml.safe_load(manifest["spec"]["serveConfigV2"])["applications"][0]["args"]))
        for name in ("PrefillServer", "DecodeServer"):
            rc = g[name]._replica_config
            assert rc.placement_group_strategy == "STRICT_PACK"
            need: dict[str, float] = {}
            for bundle in rc.placement_group_bundles:
                for k, v in bundle.items():
                    need[k] = need.get(k, 0) + v
            fits = [t for t, spec in workers.items()
                    if spec["max_workers"] > 0 and all(spec["resources"].get(k, 0) >= v for k, v in need.items())]
            assert fits, f"{variant} {name}: no KubeRay node type holds {need}; node types: {workers}"
        if variant == "mixed":
            assert sorted(workers) == ["gpu-h100", "gpu-h200"]
            assert (workers["gpu-h200"]["min_workers"], workers["gpu-h200"]["max_workers"]) == (1, 4)


# --- 3. Placement rules -----------------------------------------------------------------------

@pytest.mark.parametrize("gpus", [2, 0.5])
def test_num_gpus_per_worker_must_be_one(gpus) -> None:
    """vLLM 0.32 ``v1/executor/ray_utils.py`` L590-596 raises for a bundle with more than one GPU;
    each worker asks ``VLLM_RAY_PER_WORKER_GPUS`` (1.0) GPU of its bundle
    (``v1/executor/ray_executor_v2.py`` L275-282), which a 0.5-GPU bundle never holds."""
    msg = _err(_args(decode={"num_gpus_per_worker": gpus}))
    assert "decode.num_gpus_per_worker" in msg and "Write `num_gpus_per_worker: 1`" in msg


def test_replica_with_no_cpu_is_refused_and_bundles_pass_rays_own_validation() -> None:
    """Ray 2.60 ``util/placement_group.py`` ``_validate_bundles`` (L470-506) refuses a bundle of
    only zeros, which ``num_cpus: 0`` used to make of bundle 0."""
    from ray.util.placement_group import validate_placement_group

    msg = _err(_args(prefill={"num_cpus": 0}))
    assert "prefill.num_cpus is 0" in msg and "Write `num_cpus: 1`" in msg
    cfg = AppConfig.model_validate(_args(prefill={"num_cpus": 0, "resources": {"nvlink_domain_a": 1}}))
    for tier in ("prefill", "decode"):
        validate_placement_group(bundles=replica_bundles(cfg, tier), strategy="STRICT_PACK")


def test_tier_resources_go_into_the_replica_bundle(hub) -> None:
    """Ray 2.60 ``serve/_private/config.py`` L976-1018: the replica actor is placed in bundle 0,
    so its ``resources`` must be a subset of it, or ``.options()`` raises at build."""
    g = _graph(build_app(_args(decode={"resources": {"nvlink_domain_a": 1}})))
    rc = g["DecodeServer"]._replica_config
    assert rc.ray_actor_options["resources"] == {"nvlink_domain_a": 1}
    assert rc.placement_group_bundles[0] == {"CPU": 2.0, "nvlink_domain_a": 1.0}


def test_strict_pack_beyond_one_node_is_refused() -> None:
    cfg = AppConfig.model_validate(_args(prefill={"tensor_parallel_size": 16}, decode={"tensor_parallel_size": 16}))
    with pytest.raises(PlacementError, match=r"prefill: .* = 16 GPUs.*--gpus-per-node has 8.*placement_strategy: PACK"):
        check_node_fit(cfg, 8, source="--gpus-per-node")
    with pytest.raises(PlacementError, match="tensor_parallel_size` to at most 4"):
        rayservice(_doc(), name="x", image="img", gpus_per_node=4)
    spread = AppConfig.model_validate(_args(prefill={"tensor_parallel_size": 16, "placement_strategy": "PACK"},
                                            decode={"tensor_parallel_size": 16, "placement_strategy": "PACK"}))
    check_node_fit(spread, 8, source="--gpus-per-node")  # PACK may span nodes: vLLM's Ray executor does TP across them


@pytest.mark.parametrize("key,value", [("data_parallel_size", 2), ("data_parallel_size_local", 1)])
def test_data_parallel_is_reserved(key, value) -> None:
    """vLLM 0.32 opens the NIXL side channel at ``VLLM_NIXL_SIDE_CHANNEL_PORT + data_parallel_index``
    (``distributed/kv_transfer/kv_connector/v1/nixl/base_scheduler.py`` L77-80) and the KV-event
    socket at the endpoint's port + dp_rank (``distributed/kv_events.py`` L353-358); pd_serve claims
    one port of each per replica."""
    args = _args()
    args["decode"]["engine_args"][key] = value
    msg = _err(args)
    assert f"decode: engine_args.{key} is reserved" in msg and "autoscaling.max_replicas" in msg
    args["decode"]["engine_args"] = {"data_parallel_size": 1}
    AppConfig.model_validate(args)


# --- 4. Heterogeneous TP against the KV heads ----------------------------------------------

def test_prefill_tp_above_decode_tp_and_the_kv_heads_is_refused() -> None:
    """vLLM 0.32 ``nixl/base_worker.py`` L2441-2451 asserts, at decode's handshake with prefill,
    ``not (tp_ratio < 0 and is_kv_replicated(prefill))``: ``tp_ratio`` is negative when prefill
    TP > decode TP (``kv_connector/utils.py`` L495-512), and prefill's KV is replicated when its
    TP exceeds the model's KV heads (L522-531). Llama-3.1-70B has 8 KV heads."""
    def layout(tp: int) -> EngineLayout:
        return EngineLayout(model=HUB_ID, dtype="bfloat16", block_size=16, num_kv_heads=8,
                            head_dim=128, num_layers=80, tensor_parallel_size=tp)

    with pytest.raises(IncompatibleTiersError, match="prefill=16 > decode=8 .* 8 KV heads.*at most 8"):
        check_compatible(layout(16), layout(8))
    check_compatible(layout(8), layout(4))   # prefill TP = KV heads: each rank holds one head
    check_compatible(layout(8), layout(16))  # decode replicates, prefill does not: vLLM allows it
    mla = EngineLayout(model="deepseek", dtype="bfloat16", block_size=16, num_kv_heads=1,
                       tensor_parallel_size=16, use_mla=True)
    check_compatible(mla, EngineLayout(**{**mla.__dict__, "tensor_parallel_size": 8}))


def test_prefill_tp16_over_decode_tp8_is_refused_at_build_for_the_hub_model(hub) -> None:
    args = _args(prefill={"tensor_parallel_size": 16, "placement_strategy": "PACK"})
    with pytest.raises(IncompatibleTiersError, match="8 KV heads"):
        build_app(args)


# --- the app graph for llama70b.yaml and a prefill TP 8 / decode TP 4 variant ----------------

@pytest.mark.parametrize("variant", ["shipped", "prefill8_decode4"])
def test_llama70b_graph_meets_vllm_ray_executor_and_nixl(hub, variant) -> None:
    """What vLLM 0.32 needs of each replica, and where it says so:

    - Bundles: the engine adopts the replica's placement group (``engine/arg_utils.py`` L2328-2337)
      and uses its GPU bundles only (``v1/executor/ray_utils.py`` L429-432), each holding at most
      one GPU and at least world_size of them (L590-605); a worker asks exactly
      ``VLLM_RAY_PER_WORKER_GPUS`` = 1 GPU (``v1/executor/ray_executor_v2.py`` L275-282).
    - Engine args: ``distributed_executor_backend: ray`` for TP > 1, so that workers are Ray actors
      in that placement group (``v1/executor/abstract.py`` L77-85; RayExecutorV2 is the default,
      ``envs.py`` L942-946).
    - Env: the replica's Ray runtime_env becomes the workers' (``engine/arg_utils.py`` L2312-2319,
      ``ray_executor_v2.py`` L255-266, L389), while its os.environ only fills gaps with
      ``setdefault`` (L168-177, L347-350): UCX_TLS must be in the runtime_env. The NIXL side
      channel (``VLLM_NIXL_SIDE_CHANNEL_PORT``, ``nixl/base_scheduler.py`` L76-80) is per replica.
    - NixlConnector on CUDA takes a ``cuda`` or ``cpu`` KV buffer (``nixl/utils.py`` L18-22,
      ``nixl/base_worker.py`` L684-690).
    """
    args = config_args("llama70b.yaml")
    if variant == "prefill8_decode4":
        args["decode"]["tensor_parallel_size"] = 4
    cfg = AppConfig.model_validate(args)
    g = _graph(build_app(args))
    for tier, role in (("prefill", "kv_producer"), ("decode", "kv_consumer")):
        t = getattr(cfg, tier)
        rc = g[f"{tier.capitalize()}Server"]._replica_config
        bundles = rc.placement_group_bundles
        gpu_bundles = [b for b in bundles if b.get("GPU")]
        assert bundles[0]["CPU"] == rc.ray_actor_options["num_cpus"] == 2 and not bundles[0].get("GPU")
        assert len(gpu_bundles) == t.world_size == len(bundles) - 1
        assert all(b == {"CPU": 1.0, "GPU": 1.0, "accelerator_type:H100": 0.001} for b in gpu_bundles)
        assert "accelerator_type" not in rc.ray_actor_options  # it lives in the GPU bundles
        env = rc.ray_actor_options["runtime_env"]["env_vars"]
        assert env["UCX_TLS"] == "cuda_copy,cuda_ipc,tcp"
        assert g[f"{tier.capitalize()}Server"]._deployment_config.graceful_shutdown_timeout_s >= 30
        p = plan_engine(cfg, tier, replica_tag="r1", host="10.0.0.5", side_channel_port=25601, core=None,
                        kv_events_port=26101)
        kw = p.engine_kwargs
        assert (kw["tensor_parallel_size"], kw["pipeline_parallel_size"]) == (t.tensor_parallel_size, 1)
        assert kw["distributed_executor_backend"] == "ray" and "data_parallel_size" not in kw
        assert kw["model"] == HUB_ID and kw["block_size"] == 16 and kw["dtype"] == "bfloat16"
        kt = kw["kv_transfer_config"]
        assert (kt["kv_connector"], kt["kv_role"], kt["kv_buffer_device"]) == ("NixlConnector", role, "cuda")
        assert p.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "25601"
        assert kw["kv_events_config"]["endpoint"] == "tcp://*:26101"
    layouts = tier_layouts(cfg)
    assert [x.tensor_parallel_size for x in layouts] == [8, 8 if variant == "shipped" else 4]
    check_compatible(*layouts)


# --- 5. Transport and shutdown ------------------------------------------------------------

def test_ucx_tls_reaches_engine_workers_through_the_runtime_env(hub) -> None:
    """RayExecutorV2 applies the replica's os.environ to workers with ``setdefault``
    (``v1/executor/ray_executor_v2.py`` L168-177), so a UCX_TLS baked into the image would win;
    the replica's runtime_env is copied into the workers' (L255-266, ``engine/arg_utils.py``
    L2312-2319) and wins over the image. A tier's own ``env`` still wins over both."""
    args = _args(decode={"env": {"UCX_TLS": "tcp"}})
    g = _graph(build_app(args))
    assert g["PrefillServer"]._replica_config.ray_actor_options["runtime_env"]["env_vars"]["UCX_TLS"] == \
        "cuda_copy,cuda_ipc,tcp"
    assert g["DecodeServer"]._replica_config.ray_actor_options["runtime_env"]["env_vars"]["UCX_TLS"] == "tcp"
    args = _args()
    args["kv_transfer"]["ucx_tls"] = None
    g = _graph(build_app(args))
    assert "UCX_TLS" not in g["PrefillServer"]._replica_config.ray_actor_options["runtime_env"]["env_vars"]


def test_rdma_devices_and_ipc_lock_only_when_ucx_tls_asks_for_rdma() -> None:
    def worker(m: dict) -> dict:
        return m["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]

    tcp = worker(rayservice(_doc(), name="x", image="img"))  # the shipped config: TCP
    assert "securityContext" not in tcp and set(tcp["resources"]["limits"]) == {"cpu", "memory", "nvidia.com/gpu"}
    with pytest.raises(ManifestError, match="lists no RDMA transport"):
        rayservice(_doc(), name="x", image="img", rdma_resource="rdma/ib")
    doc = _doc()
    doc["applications"][0]["args"]["kv_transfer"]["ucx_tls"] = "cuda_copy,cuda_ipc,rc,tcp"
    with pytest.raises(ManifestError, match=r"kv_transfer.ucx_tls .* --rdma-resource"):
        rayservice(doc, name="x", image="img")
    rdma = worker(rayservice(doc, name="x", image="img", rdma_resource="rdma/rdma_shared_device_a=2"))
    assert rdma["securityContext"] == {"capabilities": {"add": ["IPC_LOCK"]}}
    assert rdma["resources"]["limits"]["rdma/rdma_shared_device_a"] == "2"
    assert rdma["resources"]["requests"]["rdma/rdma_shared_device_a"] == "2"


def test_graceful_shutdown_is_long_enough_on_gpus_and_unchanged_on_cpu(hub, tmp_path, monkeypatch) -> None:
    gpu = AppConfig.model_validate(config_args("llama70b.yaml"))
    assert tier_options(gpu, "decode")["graceful_shutdown_timeout_s"] == 60
    # prefill: the same teardown after waiting (at most the KV lease) for decode's last pulls
    assert tier_options(gpu, "prefill")["graceful_shutdown_timeout_s"] == 60 + 5 + gpu.kv_transfer.lease_s
    monkeypatch.setenv("PD_SERVE_CACHE", str(tmp_path))
    cpu = AppConfig.model_validate(copy.deepcopy(config_args("tiny-cpu.yaml")))
    assert tier_options(cpu, "decode")["graceful_shutdown_timeout_s"] == 5


def _response(status: int):
    import httpx

    return httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co"))
