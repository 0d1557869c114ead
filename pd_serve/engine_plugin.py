"""vLLM general plugin (entry point ``pd_serve``), run by vLLM in each of its processes.

1. **No orphaned engine processes.** vLLM's EngineCore and its workers are multiprocessing
   children of the Ray Serve replica. When the replica is killed (SIGKILL, OOM, node
   pressure), they would outlive it and keep their memory and cores. Every such child asks
   the kernel to kill it when its parent dies (``PR_SET_PDEATHSIG``), so the whole engine
   tree goes with the replica. Opt out with ``PD_SERVE_ENGINE_PDEATHSIG=0``.
2. **NIXL on CPU-only hosts**: see ``kv_transfer.cpu_plugin`` (inactive on GPUs).
3. **Blocks held awaiting a pull**: ``kv_transfer.held`` observes NIXL's scheduler side and
   publishes the count that the ``pd_serve_kv_*_awaiting_pull`` gauges show.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    if os.environ.get("PD_SERVE_ENGINE_PDEATHSIG", "1") == "0" or not sys.platform.startswith("linux"):
        return
    if multiprocessing.parent_process() is None:
        return  # the replica itself (or a plain vLLM server): leave it alone
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before we armed the signal
        os._exit(1)


def register() -> None:
    _die_with_parent()
    from kv_transfer.cpu_plugin import register as register_cpu_nixl

    register_cpu_nixl()
    from kv_transfer.held import install as observe_held_blocks

    observe_held_blocks()
