"""The routers' scheduler state as Prometheus metrics (pd_serve/routing_metrics.py): values
come from the real index, subscriber and registry of a real PrefixAwareRouter."""

from __future__ import annotations

from prometheus_client import REGISTRY

from pd_serve.routing import PrefixAwareRouter
from scheduler import BlockStored, KVEventBatch, KVEventSubscriber, RequestContext, SubscriberStats, encode_batch


def _sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def _frames(worker: str, seq: int, events: list) -> list[bytes]:
    return [worker.encode(), seq.to_bytes(8, "big"), encode_batch(KVEventBatch(ts=0.0, events=events))]


def test_index_events_gaps_errors_and_backlog_are_exported() -> None:
    router = object.__new__(PrefixAwareRouter)
    router.initialize_state(tier="metrics_test", block_size=4)
    reg = router.sched.registry
    reg.sync(["a", "b"])
    reg.update("a", prefill_tps=100.0)
    reg.update("b", prefill_tps=300.0)
    sub = KVEventSubscriber(router.sched.index, "inproc://test", lambda topic: topic.decode())
    router._subs["a"] = sub
    stored = BlockStored(block_hashes=[11, 12], parent_block_hash=None, token_ids=list(range(8)), block_size=4,
                         lora_id=None, medium="GPU", lora_name=None)
    orphan = BlockStored(block_hashes=[99], parent_block_hash=1234, token_ids=list(range(4)), block_size=4,
                         lora_id=None, medium="GPU", lora_name=None)
    sub.handle(_frames("a", 0, [stored]))
    sub.handle(_frames("a", 3, [orphan]))  # seq 1 and 2 lost: one gap of two batches
    sub.handle([b"a", (4).to_bytes(8, "big"), b"\xc1not msgpack"])
    router.sched.on_routed(RequestContext.from_tokens("r", list(range(40)), 4), "b")
    router.retired_event_stats = SubscriberStats(batches=5, events=7)  # a subscriber stopped earlier

    t = {"tier": "metrics_test"}
    assert _sample("pd_serve_scheduler_index_blocks", **t) == len(router.sched.index) >= 2
    assert _sample("pd_serve_scheduler_index_blocks_dropped_total", reason="orphan", **t) == 1
    assert _sample("pd_serve_kv_event_batches_total", **t) == sub.stats.batches + 5
    assert _sample("pd_serve_kv_events_total", **t) == sub.stats.events + 7
    assert _sample("pd_serve_kv_event_gaps_total", **t) == 1
    assert _sample("pd_serve_kv_event_missed_batches_total", **t) == 2
    assert _sample("pd_serve_kv_event_decode_errors_total", **t) == 1
    assert _sample("pd_serve_kv_event_replayed_batches_total", **t) == 0
    # 40 tokens routed to b, draining at 300/s on the real clock since
    assert 0 < _sample("pd_serve_scheduler_queued_prefill_tokens", worker="b", **t) <= 40  # type: ignore[operator]
    assert _sample("pd_serve_scheduler_queued_prefill_tokens", worker="a", **t) == 0
    assert _sample("pd_serve_scheduler_prefill_tokens_per_second", worker="b", **t) == 300.0
