"""The config schema: shipped configs validate, mistakes fail with a message saying what to change."""

from __future__ import annotations

import copy

import pytest
import yaml
from pydantic import ValidationError

from pd_serve.config import AppConfig
from tests.unit.conftest import ROOT, config_args


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "llama70b.yaml"])
def test_shipped_configs_validate_and_http_options_match_ingress(name: str) -> None:
    doc = yaml.safe_load((ROOT / "configs" / name).read_text())
    cfg = AppConfig.model_validate(doc["applications"][0]["args"])
    assert doc["applications"][0]["import_path"] == "pd_serve.app:build_app"
    assert (doc["http_options"]["host"], doc["http_options"]["port"]) == (cfg.ingress.host, cfg.ingress.port)


def _err(args: dict) -> str:
    with pytest.raises(ValidationError) as e:
        AppConfig.model_validate(args)
    return str(e.value)


def test_typo_is_rejected(tiny_args) -> None:
    tiny_args["decode"]["replica"] = 2
    assert "replica" in _err(tiny_args) and "Extra inputs are not permitted" in _err(tiny_args)


def test_block_size_mismatch_names_the_field(tiny_args) -> None:
    tiny_args["prefill"]["engine_args"] = {"block_size": 64}
    msg = _err(tiny_args)
    assert "block_size" in msg and "prefill=64" in msg and "decode=32" in msg


def test_model_per_tier_is_refused(tiny_args) -> None:
    tiny_args["prefill"]["engine_args"] = {"model": "/other/model"}
    assert "both tiers must load the same path" in _err(tiny_args)


def test_pd_without_connector_is_refused(tiny_args) -> None:
    tiny_args["kv_transfer"]["backend"] = None
    assert "needs a KV connector" in _err(tiny_args)
    tiny_args["prefill"] = {"replicas": 0}
    assert AppConfig.model_validate(tiny_args).kv_transfer.backend is None


def test_unknown_backend_lists_the_choices(tiny_args) -> None:
    tiny_args["kv_transfer"]["backend"] = "mooncake"
    msg = _err(tiny_args)
    assert "mooncake" in msg and "nixl" in msg and "example_storage" in msg


def test_autoscaling_bounds(tiny_args) -> None:
    a = copy.deepcopy(tiny_args)
    a["prefill"] = {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}
    assert "min_replicas (3) > max_replicas (2)" in _err(a)
    a["prefill"] = {"replicas": 1, "autoscaling": {"min_replicas": 0, "max_replicas": 2}}
    assert "either `replicas` or `autoscaling`" in _err(a)
    a["prefill"] = {"autoscaling": {"min_replicas": 0, "max_replicas": 2}}
    assert AppConfig.model_validate(a).prefill.autoscaling.min_replicas == 0
    a["decode"] = {"autoscaling": {"min_replicas": 0, "max_replicas": 2}}
    assert "decode serves every request" in _err(a)


def test_gpu_fields_on_cpu_device_are_refused(tiny_args) -> None:
    tiny_args["decode"]["num_gpus_per_worker"] = 1
    assert "device is cpu" in _err(tiny_args)


def test_gpu_device_needs_gpus() -> None:
    args = config_args("llama70b.yaml")
    args["decode"]["num_gpus_per_worker"] = 0
    assert "set num_gpus_per_worker" in _err(args)


def test_docs_config_reference_matches_the_code() -> None:
    from pd_serve.config import reference_markdown

    readme = (ROOT / "docs" / "config.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "\n<!-- config-reference:end -->"
    table = readme[readme.index(start) + len(start):readme.index(end)]
    assert table == reference_markdown(), "regenerate with: python -m pd_serve.config --write"


def test_engine_arg_typo_fails_at_validation_with_the_closest_valid_name(tiny_args) -> None:
    """The installed vLLM's AsyncEngineArgs decides which names exist (issue 13: a typo in
    engine_args used to crash the replica and make Serve restart it forever)."""
    tiny_args["engine_args"]["max_model_lenn"] = 512
    msg = _err(tiny_args)
    assert "engine_args.max_model_lenn" in msg and "did you mean `max_model_len`" in msg


def test_engine_arg_typo_in_a_tier_names_the_tier(tiny_args) -> None:
    tiny_args["decode"]["engine_args"] = {"gpu_memory_utilisation": 0.8}
    msg = _err(tiny_args)
    assert msg.startswith("1 validation error") and "decode" in msg
    assert "engine_args.gpu_memory_utilisation" in msg and "`gpu_memory_utilization`" in msg


def test_engine_arg_cli_spelling_points_to_the_yaml_key(tiny_args) -> None:
    tiny_args["engine_args"]["max-num-seqs"] = 8
    assert "did you mean `max_num_seqs`" in _err(tiny_args)


def test_engine_arg_unknown_without_a_close_match_has_no_guess(tiny_args) -> None:
    tiny_args["engine_args"]["zzzz_qqqq"] = 1
    msg = _err(tiny_args)
    assert "engine_args.zzzz_qqqq is not an argument" in msg and "did you mean" not in msg


@pytest.mark.parametrize("key,value", [("max_model_len", "long"), ("dtype", "float33"),
                                       ("enforce_eager", "maybe")])
def test_engine_arg_bad_value_is_refused_by_its_vllm_type(tiny_args, key, value) -> None:
    tiny_args["engine_args"][key] = value
    msg = _err(tiny_args)
    assert f"engine_args.{key}={value!r} is not valid for vLLM" in msg


def test_engine_arg_rich_values_are_left_to_vllm(tiny_args) -> None:
    tiny_args["engine_args"]["compilation_config"] = {"mode": 0}
    AppConfig.model_validate(tiny_args)
