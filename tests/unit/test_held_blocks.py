"""kv_transfer.held: the blocks-awaiting-pull ledger and its hooks on vLLM's NIXL connector."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

from kv_transfer import held


def test_ledger_publishes_requests_and_blocks_to_readers() -> None:
    eid = f"prefill-test-{uuid.uuid4().hex[:8]}"
    try:
        assert held.read(eid) == (0, 0)  # before the engine's first hold
        led = held.HeldLedger(eid)
        led.hold("a", 4)
        led.hold("b", 2)
        assert held.read(eid) == (2, 6)
        led.release({"a", "unknown"})
        assert held.read(eid) == (1, 2)
        led.release(None)
        led.release(["b"])
        assert held.read(eid) == (0, 0)
    finally:
        held.remove(eid)
    assert held.read(eid) == (0, 0)


def test_block_counts_per_group() -> None:
    assert held.count_blocks([3, 4, 5]) == 3
    assert held.count_blocks(([1, 2], [3])) == 3
    assert held.count_blocks([]) == 0


class _FakeScheduler:
    """Stands in for NIXL's scheduler side: delays the free of finished prefill requests."""

    def __init__(self) -> None:
        self.updates = []

    def request_finished(self, request, block_ids):
        return bool(request.delay), {"remote_block_ids": block_ids}

    def update_connector_output(self, out) -> None:
        self.updates.append(out)


def test_installed_hooks_count_delayed_frees_until_finished_sending() -> None:
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlBaseConnector

    assert held.install() and held.install()  # idempotent
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlPullConnector

    assert issubclass(NixlPullConnector, NixlBaseConnector)  # "NixlConnector" in vLLM 0.32
    conn = object.__new__(NixlPullConnector)
    conn.connector_scheduler = _FakeScheduler()
    conn.connector_worker = None
    conn.engine_id = f"prefill-test-{uuid.uuid4().hex[:8]}"
    try:
        delay, params = conn.request_finished(SimpleNamespace(request_id="r1", delay=True), [1, 2, 3])
        assert delay and params["remote_block_ids"] == ([1, 2, 3],)  # vLLM's answer is untouched
        conn.request_finished_all_groups(SimpleNamespace(request_id="r2", delay=True), ([4], [5]))
        conn.request_finished(SimpleNamespace(request_id="r3", delay=False), [6])  # freed at once
        assert held.read(conn.engine_id) == (2, 5)
        out = SimpleNamespace(finished_sending={"r1"}, finished_recving=None)
        conn.update_connector_output(out)
        assert conn.connector_scheduler.updates == [out]
        assert held.read(conn.engine_id) == (1, 2)
        conn.update_connector_output(SimpleNamespace(finished_sending={"r2"}, finished_recving=None))
        assert held.read(conn.engine_id) == (0, 0)
    finally:
        held.remove(conn.engine_id)
