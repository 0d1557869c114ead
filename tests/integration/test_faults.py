"""Faults on real engines: a dead prefill replica, and the proof that decode uses prefill's KV."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest

from tests.integration import cases
from tests.integration.conftest import wait_idle
from tests.support.metrics import Scrape
from tests.support.servers import load_app_args

CASE = next(c for c in cases.ALL if c.name == "blocks")


def _replicas(tier: str):
    from ray import serve

    return serve.get_deployment_handle("Control", app_name="pd_serve").replicas.remote(tier).result()


def _engine_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name", "cmdline"])
            if (p.info["cmdline"] or [""])[0].startswith("VLLM::EngineCore")]


@pytest.mark.disruptive
def test_dead_prefill_replica_falls_back_to_local_prefill_and_recovers(
        pd_url: str, client: httpx.Client, reference) -> None:
    wait_idle(pd_url)
    (victim,) = _replicas("prefill")
    children = psutil.Process(victim.pid).children(recursive=True)
    assert children, "the prefill replica should own its engine processes"
    before = Scrape.get(pd_url)

    os.kill(victim.pid, signal.SIGKILL)
    t0 = time.monotonic()
    out = cases.run(client, CASE)  # served while the prefill tier is down
    served_in = time.monotonic() - t0
    assert out.token_ids == reference[CASE.name].token_ids
    after = Scrape.get(pd_url)
    local = (after.sum("pd_serve_prefill_total", where="local")
             - before.sum("pd_serve_prefill_total", where="local"))
    assert local == 1, "the request should have been prefilled on decode"
    assert served_in < 30

    # the killed replica's engine processes died with it (no orphan holding memory or a core)
    psutil.wait_procs(children, timeout=15)
    assert not [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]

    # Serve restarts the replica; remote prefill resumes on it
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        reps = _replicas("prefill")
        if reps and reps[0].pid != victim.pid:
            break
        time.sleep(2)
    else:
        pytest.fail("prefill replica did not come back within 240s")
    time.sleep(2)  # let decode's heartbeat see it
    before = Scrape.get(pd_url)
    out = cases.run(client, CASE)
    assert out.token_ids == reference[CASE.name].token_ids
    after = wait_idle(pd_url)
    assert (after.sum("pd_serve_prefill_total", where="remote")
            - before.sum("pd_serve_prefill_total", where="remote")) == 1
    assert len(_engine_processes()) == 2


@pytest.mark.own_app("wrong-prefill-weights")
def test_decode_continues_from_transferred_kv_not_its_own(apps, reference) -> None:
    """Control: prefill runs other (random) weights under the same model path. If decode really
    continues from the transferred KV, its tokens change; if it silently recomputed, they would not."""
    url = apps.get("wrong-prefill-weights", load_app_args(prefill={"engine_args": {"load_format": "dummy"}}))
    with httpx.Client(base_url=url, timeout=120) as client:
        changed = 0
        for case in (c for c in cases.ALL if not c.stream):
            before = Scrape.get(url)
            out = cases.run(client, case)
            after = wait_idle(url)
            got = (after.sum("vllm:prompt_tokens_by_source_total", source="external_kv_transfer", tier="decode")
                   - before.sum("vllm:prompt_tokens_by_source_total", source="external_kv_transfer", tier="decode"))
            decided = {k: v - before.by("pd_serve_prefill_total", "reason").get(k, 0.0)
                       for k, v in after.by("pd_serve_prefill_total", "reason").items()}
            assert got == out.prompt_tokens, f"{case.name}: prefill decisions {decided}"
            changed += out.token_ids != reference[case.name].token_ids
        assert changed == 4, "every continuation should differ when the transferred KV comes from other weights"
