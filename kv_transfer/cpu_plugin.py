"""vLLM general plugin: make NIXL behave on CPU-only hosts.

Registered as the ``vllm.general_plugins`` entry point ``pd_serve_cpu_nixl`` (pyproject.toml),
so vLLM runs ``register()`` in every engine process. It changes nothing unless vLLM's
platform is the CPU, and can be turned off with ``PD_SERVE_NIXL_CPU_FIX=0`` (the benchmark
measures both ways). It is never needed on GPUs and never active there.

Three upstream behaviours are corrected (both measured on a 2-core host, see docs/architecture.md, "Running on CPU"):

1. **Busy-waiting progress thread.** NIXL's Python API hard-codes the agent's progress-thread
   delay to 0 µs, so every idle engine spins one full core. We set ``pthrDelay`` to
   ``PD_SERVE_NIXL_PTHR_DELAY_US`` (default 1000 µs) when the agent is created. Transfers still
   complete; the first byte of a pull waits at most that delay.
2. **Affinity override.** vLLM's NIXL worker on the CPU moves its thread to the last core of
   each NUMA node, which puts prefill's and decode's compute on the same core whatever
   ``VLLM_CPU_OMP_THREADS_BIND`` says. When that variable pins the engine to explicit cores,
   the move is redirected to those cores.

3. **Busy-waiting ring buffer.** On the CPU vLLM always runs the model in a worker process
   that talks to the EngineCore process through a shared-memory ring buffer
   (``shm_broadcast.MessageQueue``). For 1 s after every message each reader polls the buffer
   in a ``sched_yield`` loop, so under any steady load the worker (between steps) and the
   EngineCore (during each forward pass) each keep a core busy doing nothing. On a P/D host
   that is four spinners on the cores the engines' compute and the serving processes need:
   measured here, both workers sat at 80-87 % of a core at 13 requests/s while their engines
   were idle most of the time. We keep vLLM's polling window but sleep
   ``PD_SERVE_SHM_POLL_US`` (default 200 µs; 0 keeps vLLM's spin) between polls instead of
   yielding. (Shortening
   the window instead, so that readers wait on the buffer's ZMQ notification, stalled
   requests for seconds here: that notification is not reliable enough to rely on alone.)

Output is unaffected: neither change touches what is computed or transferred, only where and
how often threads run. The token-identity tests run with the plugin active.
"""

from __future__ import annotations

import logging
import os
import sys
import types

logger = logging.getLogger("vllm.plugins.pd_serve_cpu_nixl")  # propagates to vLLM's handlers
_NIXL_WORKER_MODULE = "vllm.distributed.kv_transfer.kv_connector.v1.nixl"
_installed = False


def _enabled() -> bool:
    if os.environ.get("PD_SERVE_NIXL_CPU_FIX", "1") == "0":
        return False
    try:
        from vllm.platforms import current_platform
    except Exception:  # pragma: no cover - vLLM not importable
        return False
    return current_platform.is_cpu()


def _bound_cores() -> list[int] | None:
    spec = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "")
    if not spec or spec in ("auto", "all", "nobind"):
        return None
    cores: list[int] = []
    for part in spec.split("|")[0].split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cores.extend(range(int(lo), int(hi) + 1))
        elif part.strip():
            cores.append(int(part))
    return cores or None


def _patch_affinity() -> None:
    real = os.sched_setaffinity
    cores = _bound_cores()
    if cores is None:
        return

    def sched_setaffinity(pid, mask):  # noqa: ANN001 - same signature as os.sched_setaffinity
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith(_NIXL_WORKER_MODULE) and set(mask) != set(cores):
            logger.info("pd_serve: keeping NIXL worker on cores %s (vLLM asked for %s)",
                        cores, sorted(mask))
            mask = cores
        return real(pid, mask)

    os.sched_setaffinity = sched_setaffinity


def _patch_progress_delay() -> None:
    import vllm.distributed.nixl_utils as nixl_utils

    delay = int(os.environ.get("PD_SERVE_NIXL_PTHR_DELAY_US", "1000"))
    real_load = nixl_utils._load_nixl_attr

    def _load_nixl_attr(name):  # noqa: ANN001
        value = real_load(name)
        if name == "NixlWrapper" and value is not None:
            api = sys.modules.get(value.__module__)
            binds = getattr(api, "nixlBind", None)
            if binds is not None and not getattr(binds, "_pd_serve_patched", False):
                real_agent = binds.nixlAgent

                def nixlAgent(agent_name, agent_config):  # noqa: N802, ANN001
                    agent_config.pthrDelay = delay
                    return real_agent(agent_name, agent_config)

                shim = types.ModuleType(binds.__name__)
                shim.__dict__.update(binds.__dict__)
                shim.nixlAgent = nixlAgent
                shim._pd_serve_patched = True
                api.nixlBind = shim
                logger.info("pd_serve: NIXL progress-thread delay set to %d us", delay)
        return value

    nixl_utils._load_nixl_attr = _load_nixl_attr


def _patch_shm_polling() -> None:
    import time

    from vllm.distributed.device_communicators import shm_broadcast

    if getattr(shm_broadcast, "_pd_serve_patched", False):
        return
    pause = float(os.environ.get("PD_SERVE_SHM_POLL_US", "200")) / 1e6
    if pause <= 0:
        return

    def poll_pause() -> None:
        time.sleep(pause)

    shm_broadcast.sched_yield = poll_pause
    shm_broadcast._pd_serve_patched = True
    logger.info("pd_serve: shared-memory ring buffer polls every %g us", pause * 1e6)


def register() -> None:
    """Entry point called by vLLM's plugin loader in each process; idempotent."""
    global _installed
    if _installed or not _enabled():
        return
    _installed = True
    _patch_affinity()
    _patch_progress_delay()
    _patch_shm_polling()
