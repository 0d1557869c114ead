"""kv_transfer: backends -> engine settings, typed params, compatibility, node-local claims."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kv_transfer import (
    EngineLayout,
    IncompatibleTiersError,
    KVTransferParams,
    ReplicaTransferIdentity,
    UnknownBackendError,
    check_compatible,
    get_backend,
    prefill_request_params,
)
from kv_transfer.backends import NixlBackend
from kv_transfer.ports import claim, claim_core, claim_port, release

IDENT = ReplicaTransferIdentity("decode", "decode-abc", "10.1.2.3", 25605)


def test_nixl_backend_translates_to_vllm_config_and_env() -> None:
    b = get_backend("nixl", buffer_device="cpu", extra_config={"num_threads": 2}, ucx_tls="shm,tcp")
    cfg = b.engine_config("consumer", IDENT)
    assert cfg == {"kv_connector": "NixlConnector", "kv_role": "kv_consumer", "kv_buffer_device": "cpu",
                   "engine_id": "decode-abc", "kv_connector_extra_config": {"num_threads": 2}}
    assert b.engine_config("producer", IDENT)["kv_role"] == "kv_producer"
    assert b.engine_env(IDENT) == {"VLLM_NIXL_SIDE_CHANNEL_HOST": "10.1.2.3",
                                   "VLLM_NIXL_SIDE_CHANNEL_PORT": "25605", "UCX_TLS": "shm,tcp"}


def test_example_storage_backend_is_selectable() -> None:
    b = get_backend("example_storage")
    cfg = b.engine_config("producer", IDENT)
    assert cfg["kv_connector"] == "ExampleConnector"
    assert cfg["kv_connector_extra_config"]["shared_storage_path"]
    assert b.engine_env(IDENT) == {}


def test_unknown_backend_and_missing_package_fail_loudly(monkeypatch) -> None:
    with pytest.raises(UnknownBackendError, match="choose one of"):
        get_backend("rdma-magic")
    monkeypatch.setattr(NixlBackend, "required_modules", (("no_such_module_xyz", "pip install it"),))
    with pytest.raises(ImportError, match="no_such_module_xyz.*pip install it"):
        get_backend("nixl").check_available()


def test_kv_transfer_params_round_trip_and_validation() -> None:
    raw = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "prefill-1",
           "remote_block_ids": [[3, 4, 5]], "remote_host": "10.0.0.1", "remote_port": 25600,
           "remote_num_tokens": 70, "transfer_mode": "pull", "tp_size": 1}
    p = KVTransferParams.from_vllm(raw)
    assert p.num_blocks == 3 and p.extra == {"transfer_mode": "pull", "tp_size": 1}
    assert p.to_vllm() == raw
    with pytest.raises(ValueError, match="no kv_transfer_params"):
        KVTransferParams.from_vllm(None)
    with pytest.raises(ValueError, match="engine id or block ids"):
        KVTransferParams.from_vllm({"do_remote_prefill": True})
    assert prefill_request_params()["do_remote_decode"] is True


def _layout(**kw) -> EngineLayout:
    base = dict(model="/m", dtype="float32", block_size=32, num_kv_heads=8, head_dim=64, num_layers=2)
    return EngineLayout(**{**base, **kw})


@pytest.mark.parametrize("field,value", [("block_size", 64), ("dtype", "bfloat16"), ("model", "/other"),
                                         ("num_kv_heads", 4), ("kv_cache_dtype", "fp8")])
def test_compat_names_the_field(field, value) -> None:
    with pytest.raises(IncompatibleTiersError, match=field):
        check_compatible(_layout(), _layout(**{field: value}))


def test_compat_tensor_parallel_rules() -> None:
    check_compatible(_layout(tensor_parallel_size=2), _layout(tensor_parallel_size=4))
    with pytest.raises(IncompatibleTiersError, match="multiple"):
        check_compatible(_layout(tensor_parallel_size=2), _layout(tensor_parallel_size=3))
    with pytest.raises(IncompatibleTiersError, match="equal TP"):
        check_compatible(_layout(tensor_parallel_size=2), _layout(tensor_parallel_size=4), heterogeneous_tp=False)


def test_claims_are_unique_and_dead_owners_are_reclaimed(run_dir) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    a = claim("pool", ["x", "y"], owner_pid=dead.pid, prefer_least_used=False)
    assert a == "x"
    # x's owner is dead: the next claim may take it again
    assert claim("pool", ["x", "y"], prefer_least_used=False) == "x"
    assert claim("pool", ["x", "y"], owner_pid=1, prefer_least_used=False) == "y"
    with pytest.raises(RuntimeError, match="all 2 items"):
        claim("pool", ["x", "y"], owner_pid=1, prefer_least_used=False)
    release("pool", "x")
    assert claim("pool", ["x", "y"], owner_pid=1, prefer_least_used=False) == "x"


def test_cores_are_shared_least_used_first(run_dir) -> None:
    me = os.getpid()
    assert [claim_core([0, 1]) for _ in range(3)] == [0, 1, 0]
    assert me == os.getpid()


def test_port_claims_skip_ports_in_use(run_dir) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        p = claim_port("127.0.0.1", busy, span=4)
        assert p != busy and busy < p < busy + 4
        assert claim_port("127.0.0.1", busy, span=4) not in (busy, p)


def test_transfer_metrics_are_derived_from_nixl_metrics() -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from kv_transfer.metrics import derive

    # an engine's registry as vLLM's NIXL stats logger fills it
    reg = CollectorRegistry()
    nbytes = Histogram("vllm:nixl_bytes_transferred", "b", ["engine"], registry=reg)
    xfer = Histogram("vllm:nixl_xfer_time_seconds", "t", ["engine"], buckets=(0.01, 1), registry=reg)
    failed = Counter("vllm:nixl_num_failed_transfers", "f", ["engine"], registry=reg)
    expired = Counter("vllm:nixl_num_kv_expired_reqs", "e", ["engine"], registry=reg)
    Gauge("vllm:num_requests_running", "r", ["engine"], registry=reg).labels("0").set(0)
    for v in (16384, 16384, 16384):
        nbytes.labels("0").observe(v)
    for v in (0.004, 0.006, 2.49):
        xfer.labels("0").observe(v)
    failed.labels("0").inc()
    expired.labels("0").inc(2)

    families = text_string_to_metric_families(generate_latest(reg).decode())
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in derive(families) for s in fam.samples}
    assert got[("pd_serve_kv_transfer_bytes_total", (("engine", "0"),))] == 49152.0
    assert got[("pd_serve_kv_transfer_duration_seconds_count", (("engine", "0"),))] == 3.0
    assert got[("pd_serve_kv_transfer_duration_seconds_bucket", (("engine", "0"), ("le", "0.01")))] == 2.0
    assert got[("pd_serve_kv_transfer_failures_total", (("engine", "0"), ("reason", "transfer")))] == 1.0
    assert got[("pd_serve_kv_leases_expired_total", (("engine", "0"),))] == 2.0
    assert not any(name.startswith("vllm:") for name, _ in got)


def test_kv_transfer_imports_no_ray_and_no_fastapi() -> None:
    """The package boundary issue 4 fixes: every kv_transfer module imports without Ray/FastAPI."""
    import subprocess
    import sys

    code = (
        "import sys, pkgutil, importlib, kv_transfer\n"
        "for m in pkgutil.walk_packages(kv_transfer.__path__, 'kv_transfer.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(','.join(sorted(m for m in ('ray', 'fastapi', 'starlette') if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"kv_transfer pulled in: {out.stdout.strip()}"
