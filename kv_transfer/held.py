"""Blocks a prefill engine holds for decode to pull: the gauge vLLM does not export.

When a prefill request finishes, NIXL's scheduler side keeps its blocks until decode has read
them (the worker reports the request in ``finished_sending``) or the lease expires (reported
the same way, and counted in ``vllm:nixl_num_kv_expired_reqs``). vLLM counts expiries but not
what is held right now, which is what an operator needs to see stranded KV before the lease
frees it.

``install()`` (called by pd_serve's vLLM plugin in every engine process) wraps three methods of
vLLM's NIXL connector, only on the scheduler side, only to observe:

- ``request_finished`` / ``request_finished_all_groups``: when vLLM answers "delay the free",
  the request and its block count are recorded;
- ``update_connector_output``: requests in ``finished_sending`` (pulled, or expired) are dropped.

The engine-core process publishes (requests, blocks) in a 16-byte shared-memory file named
after the engine id (``ledger_path``); the replica's process reads it for its
``pd_serve_kv_*_awaiting_pull`` gauges (``read``). Nothing here changes what vLLM does.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import struct
import tempfile
from typing import Any

logger = logging.getLogger("vllm.plugins.pd_serve_held_blocks")
_FMT = "<qq"  # requests, blocks
_SIZE = struct.calcsize(_FMT)
_installed = False


def ledger_path(engine_id: str) -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", engine_id)
    return os.path.join(base, f"pd_serve-held-{safe}")


def read(engine_id: str) -> tuple[int, int]:
    """(requests, blocks) engine ``engine_id`` holds for a pull; (0, 0) before its first hold."""
    try:
        with open(ledger_path(engine_id), "rb") as f:
            data = f.read(_SIZE)
    except FileNotFoundError:
        return 0, 0
    return struct.unpack(_FMT, data) if len(data) == _SIZE else (0, 0)


def remove(engine_id: str) -> None:
    try:
        os.unlink(ledger_path(engine_id))
    except FileNotFoundError:
        pass


class HeldLedger:
    """Request id -> blocks held, mirrored into the shared file on every change."""

    def __init__(self, engine_id: str) -> None:
        self.held: dict[str, int] = {}
        path = ledger_path(engine_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, _SIZE)
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)
        self._publish()

    def hold(self, req_id: str, blocks: int) -> None:
        self.held[req_id] = blocks
        self._publish()

    def release(self, req_ids: Any) -> None:
        changed = False
        for r in req_ids or ():
            changed |= self.held.pop(r, None) is not None
        if changed:
            self._publish()

    @property
    def blocks(self) -> int:
        return sum(self.held.values())

    def _publish(self) -> None:
        self._map[:_SIZE] = struct.pack(_FMT, len(self.held), self.blocks)


def count_blocks(block_ids: Any) -> int:
    """Blocks in vLLM's ``block_ids``: a list of ids, or one list per KV-cache group."""
    if block_ids and isinstance(block_ids[0], (list, tuple)):
        return sum(len(g) for g in block_ids)
    return len(block_ids or ())


def install() -> bool:
    """Wrap the NIXL connector's scheduler-side hooks (idempotent). False if NIXL is absent."""
    global _installed
    if _installed:
        return True
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlBaseConnector
    except Exception:  # vLLM without the NIXL connector: nothing to observe
        return False

    def ledger(conn: Any) -> HeldLedger:
        led = conn.__dict__.get("_pd_serve_held")
        if led is None:
            led = conn.__dict__["_pd_serve_held"] = HeldLedger(str(conn.engine_id))
        return led

    def wrap_finished(orig):
        def request_finished(self, request, block_ids):
            delay, params = orig(self, request, block_ids)
            if delay and self.connector_scheduler is not None:
                ledger(self).hold(request.request_id, count_blocks(block_ids))
            return delay, params
        request_finished.__wrapped__ = orig
        return request_finished

    orig_update = NixlBaseConnector.update_connector_output

    def update_connector_output(self, connector_output):
        orig_update(self, connector_output)
        sent = getattr(connector_output, "finished_sending", None)
        if sent and self.connector_scheduler is not None and "_pd_serve_held" in self.__dict__:
            ledger(self).release(sent)
    update_connector_output.__wrapped__ = orig_update

    NixlBaseConnector.request_finished = wrap_finished(NixlBaseConnector.request_finished)
    NixlBaseConnector.request_finished_all_groups = wrap_finished(NixlBaseConnector.request_finished_all_groups)
    NixlBaseConnector.update_connector_output = update_connector_output
    _installed = True
    return True
