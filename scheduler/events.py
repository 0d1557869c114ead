"""vLLM KV events: wire types, decoding, and a ZMQ subscriber that feeds a `PrefixIndex`.

An engine started with ``--kv-events-config '{"enable_kv_cache_events": true, "publisher":
"zmq", "endpoint": "tcp://*:5557", "topic": "kv-events"}'`` publishes ZMQ multipart messages
``(topic, seq, payload)``: ``seq`` is an 8-byte big-endian counter starting at 0 per publisher
process, ``payload`` a msgpack ``KVEventBatch``.

The structs below mirror ``vllm/distributed/kv_events.py`` of vLLM 0.32 field for field (same
order, same tags, same defaults), so the scheduler decodes events without importing vLLM; a
contract test encodes with vLLM's classes and decodes with these (and back). The batch is an
``array_like`` struct; events are tagged maps (``{"type": "BlockStored", ...}``), so fields a
newer vLLM adds to an event are ignored, not fatal.

`KVEventSubscriber` runs one daemon thread per ZMQ endpoint. It tracks sequence numbers per
topic: a jump forward is a *gap* (counted; replayed from the engine's replay socket when one is
configured), a jump backwards is a publisher *restart* (the engine's cache is empty: the worker's
entries are cleared).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from scheduler.index import PrefixIndex

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EventBatch",
    "KVEventBatch",
    "KVEventSubscriber",
    "SubscriberStats",
    "apply_batch",
    "decode_batch",
    "encode_batch",
]

logger = logging.getLogger(__name__)

ExternalBlockHash = int | bytes


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):  # type: ignore[call-arg]
    """Mirror of ``vllm.distributed.kv_events.EventBatch``."""

    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):  # type: ignore[call-arg]
    """Mirror of ``vllm.distributed.kv_events.KVCacheEvent`` (tagged by class name)."""


class BlockStored(KVCacheEvent):
    """Mirror of vLLM's ``BlockStored``: full blocks newly cached (or re-reported) by an engine."""

    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    """Mirror of vLLM's ``BlockRemoved``: blocks evicted from one medium."""

    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    """Mirror of vLLM's ``AllBlocksCleared``: the engine reset its prefix cache."""


class KVEventBatch(EventBatch):
    """Mirror of ``vllm.distributed.kv_events.KVEventBatch``."""

    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


_decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
_encoder = msgspec.msgpack.Encoder()


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decode one published payload. Raises ``msgspec.DecodeError`` / ``ValidationError``."""
    return _decoder.decode(payload)


def encode_batch(batch: KVEventBatch) -> bytes:
    """Encode a batch exactly as vLLM's publisher does (for simulators and tests)."""
    return _encoder.encode(batch)


def apply_batch(index: PrefixIndex, worker: str, batch: KVEventBatch) -> int:
    """Apply every event of ``batch``, published by ``worker``, to ``index``; return the count.

    Called by `KVEventSubscriber` once per received batch, in sequence order (or by a simulator
    that produces batches itself). Events are applied in order (runs of ``BlockRemoved`` with the
    same medium and group, which vLLM sends one block at a time, in one call); see the
    `PrefixIndex` methods for how each one is handled.
    """
    removed: list[ExternalBlockHash] = []  # consecutive BlockRemoved (vLLM sends one per block)
    removed_from: tuple[str | None, int | None] = (None, None)
    for ev in batch.events:
        if type(ev) is BlockRemoved:
            if removed and (ev.medium, ev.group_idx) != removed_from:
                index.apply_removed(worker, removed, medium=removed_from[0], group_idx=removed_from[1])
                removed = []
            removed_from = (ev.medium, ev.group_idx)
            removed.extend(ev.block_hashes)
            continue
        if removed:
            index.apply_removed(worker, removed, medium=removed_from[0], group_idx=removed_from[1])
            removed = []
        if type(ev) is BlockStored:
            index.apply_stored(
                worker,
                ev.block_hashes,
                ev.parent_block_hash,
                ev.token_ids,
                ev.block_size,
                lora_name=ev.lora_name,
                medium=ev.medium,
                group_idx=ev.group_idx,
            )
        else:
            index.apply_cleared(worker)
    if removed:
        index.apply_removed(worker, removed, medium=removed_from[0], group_idx=removed_from[1])
    return len(batch.events)


@dataclass
class SubscriberStats:
    """Counters of one subscriber since it was created (monotonic; export as counters)."""

    batches: int = 0
    events: int = 0
    gaps: int = 0
    """Number of sequence jumps forward (messages lost, e.g. over the PUB high-water mark)."""
    missed_batches: int = 0
    """Batches lost in those gaps, before any replay."""
    replayed_batches: int = 0
    restarts: int = 0
    """Sequence went backwards: the publisher (engine) restarted; its entries were cleared."""
    decode_errors: int = 0
    ignored: int = 0
    """Messages whose topic maps to no worker."""


_END_SEQ = (-1).to_bytes(8, "big", signed=True)


class KVEventSubscriber:
    """Receive one engine endpoint's KV events on a daemon thread and apply them to an index.

    Created by pd_serve once per engine (or per shared endpoint); `start` once, `stop` once at
    shutdown. The `handle` method is the whole protocol and is usable without a socket (tests,
    simulators, a different transport).

    Args:
        index: the tier's prefix index (thread-safe).
        endpoint: ZMQ address. Engines that *bind* (``tcp://*:5557``) need ``bind=False`` here
            and the engine's concrete address; engines that *connect* need ``bind=True``.
        worker: the worker id all messages belong to, or a function topic → worker id (``None``
            drops the message) when several engines publish to one bound endpoint.
        topic: subscription prefix (vLLM's ``kv_events_config.topic``).
        replay_endpoint: the engine's ``replay_endpoint`` (ROUTER); when set, gaps and a late
            start are repaired by asking for the missing batches.
        on_gap: ``"keep"`` (default: keep possibly stale entries, they age out with evictions)
            or ``"clear"`` (drop the worker's entries; used when no replay is configured and
            stale affinity is worse than none).
    """

    def __init__(
        self,
        index: PrefixIndex,
        endpoint: str,
        worker: str | Callable[[bytes], str | None],
        *,
        topic: str = "",
        bind: bool = False,
        replay_endpoint: str | None = None,
        on_gap: str = "keep",
        poll_interval_s: float = 0.1,
        replay_timeout_s: float = 1.0,
    ) -> None:
        if on_gap not in ("keep", "clear"):
            raise ValueError(f"on_gap must be 'keep' or 'clear', got {on_gap!r}")
        self.index = index
        self.endpoint = endpoint
        self.topic = topic
        self.bind = bind
        self.replay_endpoint = replay_endpoint
        self.on_gap = on_gap
        self.poll_interval_s = poll_interval_s
        self.replay_timeout_s = replay_timeout_s
        self.stats = SubscriberStats()
        self._worker_of = worker if callable(worker) else (lambda _topic, _w=worker: _w)
        self._last_seq: dict[bytes, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._warm = False

    # ------------------------------------------------------------------ protocol

    def handle(self, frames: list[bytes]) -> None:
        """Process one multipart message ``[topic, seq, payload]``.

        Called by the receive thread for every message (or by tests / simulators directly).
        Decodes, checks the sequence, repairs gaps when possible, and applies the batch.
        Malformed messages are counted in `stats` and dropped; nothing raises.
        """
        if len(frames) != 3:
            self.stats.decode_errors += 1
            return
        topic, seq_bytes, payload = frames
        worker = self._worker_of(topic)
        if worker is None:
            self.stats.ignored += 1
            return
        seq = int.from_bytes(seq_bytes, "big")
        last = self._last_seq.get(topic)
        if last is not None and seq <= last:
            logger.warning("KV events of %s restarted (seq %d after %d): clearing", worker, seq, last)
            self.stats.restarts += 1
            self.index.apply_cleared(worker)
            last = None
        if (last is None and seq > 0) or (last is not None and seq > last + 1):
            first_missing = 0 if last is None else last + 1
            self.stats.gaps += 1
            self.stats.missed_batches += seq - first_missing
            logger.warning("KV events of %s: missed batches %d..%d", worker, first_missing, seq - 1)
            if not self._replay(worker, first_missing, seq) and self.on_gap == "clear":
                self.index.apply_cleared(worker)
        self._last_seq[topic] = seq
        self._apply(worker, payload)

    def _apply(self, worker: str, payload: bytes) -> None:
        try:
            batch = _decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.stats.decode_errors += 1
            return
        self.stats.batches += 1
        self.stats.events += apply_batch(self.index, worker, batch)

    def _warm_replay(self) -> None:
        """Apply every batch the engine's replay buffer holds, in order; remember each topic's
        last sequence number so live messages continue from there. Called once, before the
        subscription, from the receive thread."""
        import zmq

        topic_prefix = self.topic.encode("utf-8")
        sock: Any = zmq.Context.instance().socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.replay_endpoint)
            sock.send_multipart([b"", (0).to_bytes(8, "big")])
            while sock.poll(int(self.replay_timeout_s * 1000)):
                frames = sock.recv_multipart()
                if len(frames) < 3 or frames[-2] == _END_SEQ:
                    return
                topic = frames[-3] if len(frames) >= 4 else topic_prefix
                worker = self._worker_of(topic)
                if worker is None or not topic.startswith(topic_prefix):
                    continue
                self._last_seq[topic] = int.from_bytes(frames[-2], "big")
                self.stats.replayed_batches += 1
                self._apply(worker, frames[-1])
            logger.warning("KV event warm replay from %s timed out", self.replay_endpoint)
        finally:
            sock.close()

    def _replay(self, worker: str, start: int, stop: int) -> bool:
        """Fetch batches ``start..stop-1`` from the replay socket and apply them in order."""
        if self.replay_endpoint is None:
            return False
        import zmq

        sock: Any = zmq.Context.instance().socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.replay_endpoint)
            sock.send_multipart([b"", start.to_bytes(8, "big")])
            timeout_ms = int(self.replay_timeout_s * 1000)
            while sock.poll(timeout_ms):
                # vLLM 0.32 replies [b"", topic, seq, payload] per batch, then an end marker
                # whose seq is -1 (older versions omit the topic frame).
                frames = sock.recv_multipart()
                if len(frames) < 3 or frames[-2] == _END_SEQ:
                    return True
                seq = int.from_bytes(frames[-2], "big")
                if start <= seq < stop:
                    self.stats.replayed_batches += 1
                    self._apply(worker, frames[-1])
            logger.warning("KV event replay from %s timed out", self.replay_endpoint)
            return False
        finally:
            sock.close()

    # ------------------------------------------------------------------ thread

    def start(self, timeout_s: float = 5.0, *, warm: bool = False) -> None:
        """Start the receive thread; returns once the socket is connected/bound.

        ``warm=True`` (needs ``replay_endpoint``): first rebuild the worker's state from the
        engine's replay buffer, every batch it still holds, then subscribe. A router that starts
        or restarts next to running engines then knows their caches at once instead of learning
        them from new events. Batches published between the replay and the subscription are a
        gap, repaired by the usual replay. Blocks older than the engine's buffer stay unknown
        (vLLM keeps its last ``buffer_steps`` batches). A warm start returns at once; the
        index fills in the background.
        """
        if self._thread is not None:
            raise RuntimeError("KVEventSubscriber already started")
        self._warm = warm and self.replay_endpoint is not None
        self._thread = threading.Thread(target=self._run, name=f"kv-events:{self.endpoint}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"KV event subscriber for {self.endpoint} did not start")

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the receive thread and close its socket (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        import zmq

        sock: Any = zmq.Context.instance().socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, self.topic.encode("utf-8"))
            if self._warm:
                self._ready.set()  # do not hold the caller (a router's event loop) for the replay
                self._warm_replay()
            if self.bind:
                sock.bind(self.endpoint)
            else:
                sock.connect(self.endpoint)
            self._ready.set()
            timeout_ms = max(1, int(self.poll_interval_s * 1000))
            while not self._stop.is_set():
                if sock.poll(timeout_ms):
                    self.handle(sock.recv_multipart())
        except Exception:  # the thread must not die silently
            logger.exception("KV event subscriber for %s failed", self.endpoint)
            raise
        finally:
            self._ready.set()
            sock.close()
