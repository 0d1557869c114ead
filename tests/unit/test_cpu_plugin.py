"""The CPU plugin's ring-buffer fix hooks vLLM's real shm_broadcast module and only changes
how its readers wait, never what they read."""

from __future__ import annotations

import time

import pytest


@pytest.fixture
def shm(monkeypatch):
    from vllm.distributed.device_communicators import shm_broadcast

    # undo the patch (a module global and a marker) after each test
    monkeypatch.setattr(shm_broadcast, "sched_yield", shm_broadcast.sched_yield)
    monkeypatch.delattr(shm_broadcast, "_pd_serve_patched", raising=False)
    return shm_broadcast


def test_readers_sleep_between_polls_instead_of_yielding(shm, monkeypatch) -> None:
    from kv_transfer import cpu_plugin

    monkeypatch.setenv("PD_SERVE_SHM_POLL_US", "2000")
    real = shm.sched_yield
    cpu_plugin._patch_shm_polling()
    assert shm.sched_yield is not real
    t0 = time.perf_counter()
    shm.sched_yield()
    assert time.perf_counter() - t0 >= 0.0015
    # SpinCondition.wait looks the name up in the module at call time, so the patch applies
    assert "sched_yield" in shm.SpinCondition.wait.__code__.co_names
    patched = shm.sched_yield
    cpu_plugin._patch_shm_polling()  # idempotent
    assert shm.sched_yield is patched


def test_zero_keeps_vllms_own_spin(shm, monkeypatch) -> None:
    from kv_transfer import cpu_plugin

    monkeypatch.setenv("PD_SERVE_SHM_POLL_US", "0")
    real = shm.sched_yield
    cpu_plugin._patch_shm_polling()
    assert shm.sched_yield is real
