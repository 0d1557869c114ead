"""Stream channels: one multiplexed Ray Serve stream per (ingress replica, decode replica).

Streaming a request through Ray costs a fixed amount of CPU per item on both ends of the hop
(``benchmarks/README.md``, "Where the CPU goes"): with one stream per request, 64 concurrent
streams meant one Ray item per token per stream. A decode replica therefore sends each
request's ``Head`` on the request's own call (``DecodeServer.generate``) and everything after
it on its channel to that ingress replica (``DecodeServer.channel``): one Ray item per wake-up
carries every ready chunk of every stream the decode replica serves for that ingress. Under
load that is one item per engine step instead of one per stream.

A channel item is a list of ``(key, payload)``; ``key`` is the ingress's number for the
request (``protocol.Sink``) and ``payload`` one of:

- ``str``: SSE text, as vLLM's OpenAI server formats it;
- ``tuple``: ``(text, token_ids)``, for a stream the ingress tracks for failover;
- ``None`` (``END``): the stream is over;
- ``dict``: ``{"error": message}``: decode failed mid-stream.

Pure asyncio: ``Outbox``/``drain`` is decode's side, ``Inboxes`` the ingress's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Callable

logger = logging.getLogger(__name__)

END = None
# Decode ends a channel after this long without a request of its ingress, so that a replica
# being scaled down has no call left in flight once its last stream is over.
IDLE_S = 2.0


class Outbox:
    """Decode's side of one channel: what waits to be sent, and how many of the ingress's
    requests this replica is serving (``active``; the channel stays open while any is)."""

    __slots__ = ("items", "event", "active", "generation")

    def __init__(self) -> None:
        self.items: list[tuple[int, Any]] = []
        self.event = asyncio.Event()
        self.active = 0
        self.generation = 0

    def put(self, key: int, payload: Any) -> None:
        self.items.append((key, payload))
        self.event.set()


async def drain(box: Outbox, idle_s: float = IDLE_S) -> AsyncIterator[list[tuple[int, Any]]]:
    """The channel: every wake-up yields all that is waiting in ``box``. Ends when ``box``
    has had no item and no active request for ``idle_s``, or when a newer channel took
    ``box`` over (the ingress reopened it)."""
    box.generation += 1
    me = box.generation
    while True:
        if not box.items:
            box.event.clear()
            try:
                await asyncio.wait_for(box.event.wait(), idle_s)
            except asyncio.TimeoutError:
                if box.active == 0 and not box.items:
                    return
                continue
            # One engine step wakes many streams; let the others add their chunk first.
            await asyncio.sleep(0)
        if box.generation != me:
            return
        items, box.items = box.items, []
        yield items


class Gone:
    """Put in a request's inbox when its decode replica's channel broke."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Inboxes:
    """The ingress's side: one queue per request in flight, one reader per decode replica.

    ``open_channel(replica)`` starts the channel call (a Ray Serve streaming call pinned to
    ``replica``). A request gets its inbox before it is sent (``new``), so nothing that
    arrives early is lost, and is bound to its replica once decode's ``Head`` says which
    (``bind``), which opens the channel if none is open. When a channel breaks, each request
    bound to it finds ``Gone`` in its inbox."""

    def __init__(self, open_channel: Callable[[str], Any]) -> None:
        self._open = open_channel
        self.inboxes: dict[int, asyncio.Queue] = {}
        self._replica_of: dict[int, str] = {}
        self._bound: dict[str, set[int]] = {}
        self._readers: dict[str, asyncio.Task] = {}
        self._next = 0

    def new(self) -> tuple[int, asyncio.Queue]:
        self._next += 1
        q: asyncio.Queue = asyncio.Queue()
        self.inboxes[self._next] = q
        return self._next, q

    def bind(self, key: int, replica: str) -> None:
        self._replica_of[key] = replica
        self._bound.setdefault(replica, set()).add(key)
        if replica not in self._readers:
            self._readers[replica] = asyncio.get_running_loop().create_task(self._read(replica))

    def drop(self, key: int) -> None:
        self.inboxes.pop(key, None)
        replica = self._replica_of.pop(key, None)
        if replica is not None:
            keys = self._bound.get(replica)
            if keys is not None:
                keys.discard(key)

    def channels(self) -> int:
        return len(self._readers)

    async def _read(self, replica: str) -> None:
        error: BaseException | None = None
        gen = self._open(replica)
        try:
            inboxes = self.inboxes
            async for batch in gen:
                for key, payload in batch:
                    q = inboxes.get(key)
                    if q is not None:
                        q.put_nowait(payload)
        except asyncio.CancelledError:
            gen.cancel()
            raise
        except Exception as e:  # the replica died (or refused the pin: it is not the replica asked for)
            error = e
        finally:
            if self._readers.get(replica) is asyncio.current_task():
                del self._readers[replica]
        keys = self._bound.get(replica) or set()
        if error is not None:
            logger.warning("stream channel to decode replica %s broke (%r); %d stream(s) on it", replica, error,
                           len(keys))
            for key in list(keys):
                q = self.inboxes.get(key)
                if q is not None:
                    q.put_nowait(Gone(error))
            keys.clear()
        elif keys and replica not in self._readers:  # decode ended it while streams are still bound: reopen
            self._readers[replica] = asyncio.get_running_loop().create_task(self._read(replica))

    def close(self) -> None:
        for t in self._readers.values():
            t.cancel()
        self._readers.clear()
