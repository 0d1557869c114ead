from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest

from scheduler import PrefixIndex, block_keys
from scheduler.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventSubscriber,
    apply_batch,
    decode_batch,
    encode_batch,
)

from .conftest import BLOCK, fake_engine_hashes, tokens


def stored(worker: str, toks: list[int], parent: int | None = None, **kw: object) -> BlockStored:
    return BlockStored(
        block_hashes=fake_engine_hashes(worker, toks),
        parent_block_hash=parent,
        token_ids=toks,
        block_size=BLOCK,
        lora_id=None,
        medium="GPU",
        lora_name=None,
        **kw,  # type: ignore[arg-type]
    )


def frames(seq: int, batch: KVEventBatch, topic: bytes = b"kv") -> list[bytes]:
    return [topic, seq.to_bytes(8, "big"), encode_batch(batch)]


def test_apply_batch_follows_stored_removed_cleared() -> None:
    index = PrefixIndex(BLOCK)
    toks = tokens(1, 12)
    ev = stored("a", toks)
    assert apply_batch(index, "a", KVEventBatch(ts=0.0, events=[ev])) == 1
    assert index.match(block_keys(toks, BLOCK)) == {"a": 3}
    apply_batch(
        index, "a", KVEventBatch(ts=0.0, events=[BlockRemoved(block_hashes=ev.block_hashes[1:2], medium="GPU")])
    )
    assert index.match(block_keys(toks, BLOCK)) == {"a": 1}
    apply_batch(index, "a", KVEventBatch(ts=0.0, events=[AllBlocksCleared()]))
    assert index.match(block_keys(toks, BLOCK)) == {}


def test_own_encoding_round_trips_and_tolerates_unknown_event_fields() -> None:
    batch = KVEventBatch(ts=1.5, events=[stored("a", tokens(1, 8), group_idx=0, session_id="s")], data_parallel_rank=1)
    assert decode_batch(encode_batch(batch)) == batch
    raw = msgspec.msgpack.decode(encode_batch(batch))
    raw[1][0]["field_from_a_newer_vllm"] = 42
    assert decode_batch(msgspec.msgpack.encode(raw)) == batch
    with pytest.raises(msgspec.ValidationError):
        decode_batch(msgspec.msgpack.encode([1.0, [{"type": "Nope"}]]))


def _vllm_batch():
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    return kv_events, kv_events.KVEventBatch(
        ts=123.25,
        events=[
            kv_events.BlockStored(
                block_hashes=[2**64 - 1, b"\x01" * 32],
                parent_block_hash=7,
                token_ids=list(range(8)),
                block_size=4,
                lora_id=3,
                medium="GPU",
                lora_name="adapter",
                extra_keys=[("adapter",), None],
                group_idx=1,
                kv_cache_spec_kind="full_attention",
                kv_cache_spec_sliding_window=None,
                locality="LOCAL",
                ownership="o",
                session_id="s",
            ),
            kv_events.BlockRemoved(block_hashes=[5], medium="CPU", group_idx=0, locality="REMOTE", ownership="o"),
            kv_events.AllBlocksCleared(),
        ],
        data_parallel_rank=2,
    )


def _as_plain(obj: object) -> object:
    """Struct -> nested builtins, with the tag, so both class families compare equal."""
    return msgspec.to_builtins(obj)


def test_contract_vllm_encodes_we_decode() -> None:
    _, batch = _vllm_batch()
    payload = msgspec.msgpack.Encoder().encode(batch)
    ours = decode_batch(payload)
    assert _as_plain(ours) == _as_plain(batch)
    assert [type(e).__name__ for e in ours.events] == ["BlockStored", "BlockRemoved", "AllBlocksCleared"]
    assert ours.events[0].block_hashes == [2**64 - 1, b"\x01" * 32]


def test_contract_we_encode_vllm_decodes() -> None:
    kv_events, batch = _vllm_batch()
    ours = decode_batch(msgspec.msgpack.Encoder().encode(batch))
    back = msgspec.msgpack.Decoder(type=kv_events.KVEventBatch).decode(encode_batch(ours))
    assert back == batch


def test_contract_struct_fields_mirror_vllm() -> None:
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    import scheduler.events as ours

    for name in ("BlockStored", "BlockRemoved", "AllBlocksCleared", "KVEventBatch"):
        theirs_cls, ours_cls = getattr(kv_events, name), getattr(ours, name)
        assert ours_cls.__struct_fields__ == theirs_cls.__struct_fields__, name
        assert ours_cls.__struct_defaults__ == theirs_cls.__struct_defaults__, name
        assert ours_cls.__struct_config__.tag == theirs_cls.__struct_config__.tag, name
        assert ours_cls.__struct_config__.array_like == theirs_cls.__struct_config__.array_like, name


def test_subscriber_counts_gaps_and_detects_restarts() -> None:
    index = PrefixIndex(BLOCK)
    sub = KVEventSubscriber(index, "inproc://unused", "a")
    t = [tokens(i, 4) for i in range(6)]
    sub.handle(frames(0, KVEventBatch(ts=0, events=[stored("a", t[0])])))
    sub.handle(frames(1, KVEventBatch(ts=0, events=[stored("a", t[1])])))
    sub.handle(frames(5, KVEventBatch(ts=0, events=[stored("a", t[5])])))
    assert (sub.stats.gaps, sub.stats.missed_batches, sub.stats.batches) == (1, 3, 3)
    assert index.match(block_keys(t[0], BLOCK)) == {"a": 1}  # on_gap="keep"
    sub.handle(frames(0, KVEventBatch(ts=0, events=[stored("a", t[2])])))  # publisher restarted
    assert sub.stats.restarts == 1
    assert index.match(block_keys(t[0], BLOCK)) == {}
    assert index.match(block_keys(t[2], BLOCK)) == {"a": 1}
    sub.handle([b"kv", b"\x00"])
    sub.handle([*frames(1, KVEventBatch(ts=0, events=[]))[:2], b"\xc1garbage"])
    assert sub.stats.decode_errors == 2


def test_subscriber_gap_policy_clear_and_topic_routing() -> None:
    index = PrefixIndex(BLOCK)
    sub = KVEventSubscriber(index, "inproc://unused", {b"e1": "a", b"e2": "b"}.get, on_gap="clear")
    t = tokens(1, 4)
    sub.handle(frames(0, KVEventBatch(ts=0, events=[stored("a", t)]), topic=b"e1"))
    sub.handle(frames(0, KVEventBatch(ts=0, events=[stored("b", t)]), topic=b"e2"))
    sub.handle(frames(0, KVEventBatch(ts=0, events=[]), topic=b"other"))
    assert sub.stats.ignored == 1
    assert index.match(block_keys(t, BLOCK)) == {"a": 1, "b": 1}
    sub.handle(frames(3, KVEventBatch(ts=0, events=[]), topic=b"e1"))  # gap, no replay socket
    assert index.match(block_keys(t, BLOCK)) == {"b": 1}
    with pytest.raises(ValueError):
        KVEventSubscriber(index, "inproc://x", "a", on_gap="ignore")


def test_subscriber_against_vllm_publisher_with_replay(tmp_path: Path) -> None:
    """Real vLLM ZmqEventPublisher → our subscriber thread. Batches published before the
    subscriber connects are recovered through vLLM's replay socket."""
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    pub = kv_events.ZmqEventPublisher(
        data_parallel_rank=0,
        endpoint=f"ipc://{tmp_path}/pub",
        replay_endpoint=f"ipc://{tmp_path}/replay",
        topic="kv",
    )
    index = PrefixIndex(BLOCK)
    sub = KVEventSubscriber(
        index, f"ipc://{tmp_path}/pub", "engine-0", topic="kv", replay_endpoint=f"ipc://{tmp_path}/replay"
    )
    published: list[list[int]] = []

    def publish() -> None:
        toks = tokens(len(published) + 100, 8)
        published.append(toks)
        h = fake_engine_hashes("engine-0", toks)
        pub.publish(
            kv_events.KVEventBatch(
                ts=time.time(),
                events=[
                    kv_events.BlockStored(
                        block_hashes=h,
                        parent_block_hash=None,
                        token_ids=toks,
                        block_size=BLOCK,
                        lora_id=None,
                        medium="GPU",
                        lora_name=None,
                    )
                ],
            )
        )

    try:
        for _ in range(3):
            publish()  # nobody listens yet: only the replay buffer keeps these
        time.sleep(0.2)
        sub.start()
        deadline = time.monotonic() + 10
        while sub.stats.batches == 0 and time.monotonic() < deadline:
            publish()
            time.sleep(0.05)
        assert sub.stats.batches > 0, "no batch reached the subscriber"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if all(index.match(block_keys(t, BLOCK)) == {"engine-0": 2} for t in published):
                break
            time.sleep(0.05)
        assert all(index.match(block_keys(t, BLOCK)) == {"engine-0": 2} for t in published)
        assert sub.stats.gaps == 1
        assert sub.stats.replayed_batches == sub.stats.missed_batches >= 3
    finally:
        sub.stop()
        pub.shutdown()


def test_warm_start_rebuilds_the_index_from_vllms_replay_buffer(tmp_path: Path) -> None:
    """A router that starts next to a running engine asks vLLM's replay socket for everything
    it still buffers before subscribing: the index knows the engine's blocks before any new
    event, and live events continue without a gap or a false 'restart'."""
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    pub = kv_events.ZmqEventPublisher(
        data_parallel_rank=0, endpoint=f"ipc://{tmp_path}/pub", replay_endpoint=f"ipc://{tmp_path}/replay", topic="kv"
    )

    def publish(toks: list[int]) -> None:
        stored = kv_events.BlockStored(block_hashes=fake_engine_hashes("engine-0", toks), parent_block_hash=None,
                                       token_ids=toks, block_size=BLOCK, lora_id=None, medium="GPU", lora_name=None)
        pub.publish(kv_events.KVEventBatch(ts=time.time(), events=[stored]))

    earlier = [tokens(200 + i, 8) for i in range(5)]
    cold_index, warm_index = PrefixIndex(BLOCK), PrefixIndex(BLOCK)
    replay = f"ipc://{tmp_path}/replay"
    cold = KVEventSubscriber(cold_index, f"ipc://{tmp_path}/pub", "engine-0", topic="kv")
    warm = KVEventSubscriber(warm_index, f"ipc://{tmp_path}/pub", "engine-0", topic="kv", replay_endpoint=replay)
    try:
        for t in earlier:
            publish(t)  # the engine ran before the router: only its replay buffer has these
        time.sleep(0.3)  # the publisher's thread moves them into the buffer
        cold.start()
        warm.start(warm=True)
        deadline = time.monotonic() + 5
        while warm.stats.replayed_batches < len(earlier) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(warm_index.match(block_keys(t, BLOCK)) == {"engine-0": 2} for t in earlier)
        assert all(cold_index.match(block_keys(t, BLOCK)) == {} for t in earlier)  # cold: blind
        later = tokens(300, 8)
        deadline = time.monotonic() + 5
        while warm_index.match(block_keys(later, BLOCK)) != {"engine-0": 2} and time.monotonic() < deadline:
            publish(later)
            time.sleep(0.1)
        assert warm_index.match(block_keys(later, BLOCK)) == {"engine-0": 2}
        assert warm.stats.restarts == 0 and warm.stats.decode_errors == 0
        assert warm.stats.replayed_batches >= len(earlier)
    finally:
        cold.stop()
        warm.stop()
        pub.shutdown()
