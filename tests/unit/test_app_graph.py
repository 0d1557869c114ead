"""The application graph builds from a config without starting Ray or any engine."""

from __future__ import annotations

from pd_serve.app import build_app
from pd_serve.config import AppConfig
from pd_serve.engine import plan_engine
from tests.unit.conftest import config_args
from tests.unit.hub import LLAMA_70B_CONFIG, stub_hub


def _graph(app) -> dict:
    """name -> Deployment for every deployment bound under ``app``."""
    out = {}
    stack = [app]
    while stack:
        d = stack.pop()._bound_deployment
        out[d.name] = d
        stack.extend(a for a in d.init_args if hasattr(a, "_bound_deployment"))
    return out


def test_llama70b_graph_resources_tp_and_placement(monkeypatch, tmp_path) -> None:
    stub_hub(monkeypatch, tmp_path, {"meta-llama/Llama-3.1-70B-Instruct": LLAMA_70B_CONFIG})
    g = _graph(build_app(config_args("llama70b.yaml")))
    assert set(g) == {"Ingress", "DecodeServer", "PrefillServer", "Control"}
    for name in ("PrefillServer", "DecodeServer"):
        rc = g[name]._replica_config
        bundles = rc.placement_group_bundles
        gpu_bundles = [b for b in bundles if b.get("GPU")]
        assert len(gpu_bundles) == 8, f"{name}: one bundle per TP rank"
        assert all(b["GPU"] == 1 and "accelerator_type:H100" in b for b in gpu_bundles)
        assert rc.placement_group_strategy == "STRICT_PACK"
        assert rc.ray_actor_options["num_cpus"] == 2
        auto = g[name]._deployment_config.autoscaling_config
        assert auto is not None and auto.min_replicas == 1
    assert g["PrefillServer"]._deployment_config.autoscaling_config.max_replicas == 4
    assert g["DecodeServer"]._deployment_config.autoscaling_config.max_replicas == 8
    assert g["Ingress"]._deployment_config.num_replicas == 2


def test_llama70b_engine_plan_per_tier() -> None:
    cfg = AppConfig.model_validate(config_args("llama70b.yaml"))
    for tier, role in (("prefill", "kv_producer"), ("decode", "kv_consumer")):
        p = plan_engine(cfg, tier, replica_tag="r1", host="10.0.0.5", side_channel_port=25601, core=None)
        assert p.engine_kwargs["tensor_parallel_size"] == 8
        assert p.engine_kwargs["distributed_executor_backend"] == "ray"
        assert p.engine_kwargs["model"] == "meta-llama/Llama-3.1-70B-Instruct"
        kt = p.engine_kwargs["kv_transfer_config"]
        assert (kt["kv_connector"], kt["kv_role"], kt["kv_buffer_device"]) == ("NixlConnector", role, "cuda")
        assert p.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "25601" and p.env["UCX_TLS"].endswith("tcp")
        assert "VLLM_CPU_OMP_THREADS_BIND" not in p.env
    assert cfg.tier_engine_args("prefill")["max_num_batched_tokens"] == 16384


def test_tiny_cpu_graph_pins_engines_apart(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PD_SERVE_CACHE", str(tmp_path))
    (tmp_path / "tiny-llama").mkdir()
    (tmp_path / "tiny-llama" / "config.json").write_text("{}")
    args = config_args("tiny-cpu.yaml")
    g = _graph(build_app(args))
    assert g["PrefillServer"]._deployment_config.num_replicas == 1
    assert g["PrefillServer"]._replica_config.placement_group_bundles is None
    cfg = AppConfig.model_validate(args)
    cores = {plan_engine(cfg, t, replica_tag="x", host="127.0.0.1", side_channel_port=1, core=c)
             .env["VLLM_CPU_OMP_THREADS_BIND"] for t, c in (("prefill", 0), ("decode", 1))}
    assert cores == {"0", "1"}


def test_prefill_at_zero_replicas_leaves_it_out(tmp_path) -> None:
    args = config_args("tiny-cpu.yaml")
    args["prefill"] = {"replicas": 0}
    (tmp_path / "config.json").write_text("{}")
    args["model"] = str(tmp_path)
    g = _graph(build_app(args))
    assert "PrefillServer" not in g and g["DecodeServer"].init_args[2] is None


def test_tp_that_nixl_cannot_map_is_refused_at_build(tmp_path, monkeypatch) -> None:
    import pytest

    from kv_transfer import IncompatibleTiersError

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"num_attention_heads": 8, "num_key_value_heads": 8, '
                                       '"hidden_size": 512, "num_hidden_layers": 2}')
    args = config_args("llama70b.yaml")
    args["model"] = str(model)
    args["prefill"]["tensor_parallel_size"] = 3
    with pytest.raises(IncompatibleTiersError, match="tensor_parallel_size prefill=3, decode=8"):
        build_app(args)
    args["prefill"]["tensor_parallel_size"] = 4  # 8 is a multiple of 4, 8 KV heads split evenly
    assert "PrefillServer" in _graph(build_app(args))


def test_engines_publish_a_kv_event_replay_socket(tiny_args) -> None:
    """Routers that start late (or miss a batch) rebuild from vLLM's replay buffer: every engine
    with KV events also binds its replay socket, and vLLM's config accepts it."""
    from vllm.config import KVEventsConfig

    cfg = AppConfig.model_validate(tiny_args)
    p = plan_engine(cfg, "decode", replica_tag="r1", host="10.0.0.5", side_channel_port=25601, core=None,
                    kv_events_port=26101, kv_replay_port=26701)
    ev = p.engine_kwargs["kv_events_config"]
    assert ev["endpoint"] == "tcp://*:26101" and ev["replay_endpoint"] == "tcp://*:26701"
    assert KVEventsConfig(**ev).replay_endpoint == "tcp://*:26701"


def test_pin_process_moves_every_thread_and_skips_missing_cores() -> None:
    import os
    import threading

    from pd_serve.placement import pin_process

    before = os.sched_getaffinity(0)
    ready, done = threading.Event(), threading.Event()
    t = threading.Thread(target=lambda: (ready.set(), done.wait(5)))
    t.start()
    ready.wait(5)
    try:
        core = min(before)
        pin_process([core, 10_000])  # a core this machine lacks is ignored
        assert os.sched_getaffinity(t.native_id) == {core} and os.sched_getaffinity(0) == {core}
        pin_process([10_000])  # no core left: unchanged
        assert os.sched_getaffinity(0) == {core}
    finally:
        done.set()
        t.join()
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), before)
            except OSError:
                pass
