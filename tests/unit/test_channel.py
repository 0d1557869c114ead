"""pd_serve.channel: one multiplexed stream per (ingress, decode) replica pair, pure asyncio."""

from __future__ import annotations

import asyncio

import pytest

from pd_serve import channel as ch


class _Call:
    """Stands in for a Ray Serve streaming call: iterates a decode-side drain, or fails."""

    def __init__(self, agen=None, error: BaseException | None = None) -> None:
        self.agen, self.error, self.cancelled = agen, error, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.error is not None:
            raise self.error
        return await self.agen.__anext__()

    def cancel(self) -> None:
        self.cancelled = True


async def _take(q: asyncio.Queue, n: int) -> list:
    return [await asyncio.wait_for(q.get(), 2) for _ in range(n)]


def test_one_wakeup_carries_every_stream_ready_at_once() -> None:
    async def main():
        box = ch.Outbox()
        drain = ch.drain(box, idle_s=0.2)
        box.active = 3
        for key in (1, 2, 3):
            box.put(key, f"t{key}")
        first = await drain.__anext__()
        assert first == [(1, "t1"), (2, "t2"), (3, "t3")]
        # the streams of one engine step that wake after the first put still join its batch
        async def later(key):
            box.put(key, "u")
        tasks = [asyncio.ensure_future(later(k)) for k in (1, 2, 3)]
        second = await drain.__anext__()
        await asyncio.gather(*tasks)
        assert sorted(second) == [(1, "u"), (2, "u"), (3, "u")]
        await drain.aclose()
    asyncio.run(main())


def test_channel_stays_open_while_a_request_is_active_and_ends_when_idle() -> None:
    async def main():
        box = ch.Outbox()
        box.active = 1
        drain = ch.drain(box, idle_s=0.05)
        nxt = asyncio.ensure_future(drain.__anext__())
        await asyncio.sleep(0.2)
        assert not nxt.done()  # idle but a request is active: no end
        box.put(7, ch.END)
        assert await nxt == [(7, ch.END)]
        box.active = 0
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(drain.__anext__(), 1)
    asyncio.run(main())


def test_a_newer_channel_takes_the_outbox_over() -> None:
    async def main():
        box = ch.Outbox()
        box.active = 1
        old, new = ch.drain(box, 1), ch.drain(box, 1)
        old_next = asyncio.ensure_future(old.__anext__())
        await asyncio.sleep(0)
        new_next = asyncio.ensure_future(new.__anext__())
        await asyncio.sleep(0)
        box.put(1, "x")
        assert await new_next == [(1, "x")]
        with pytest.raises(StopAsyncIteration):
            await old_next
    asyncio.run(main())


def test_inboxes_route_by_key_and_items_before_bind_are_kept() -> None:
    async def main():
        box = ch.Outbox()
        box.active = 1
        opened = []

        def open_channel(replica):
            opened.append(replica)
            return _Call(ch.drain(box, idle_s=0.05))
        ib = ch.Inboxes(open_channel)
        k1, q1 = ib.new()
        k2, q2 = ib.new()
        box.put(k1, "a")  # sent before the ingress knows the replica: waits in the outbox
        ib.bind(k1, "r1")
        ib.bind(k2, "r1")
        box.put(k2, ("b", [5]))
        box.put(k1, ch.END)
        assert await _take(q1, 2) == ["a", ch.END]
        assert await _take(q2, 1) == [("b", [5])]
        assert opened == ["r1"] and ib.channels() == 1
        ib.drop(k1)
        box.put(k1, "late")  # a dropped request's items are discarded
        box.put(k2, ch.END)
        assert await _take(q2, 1) == [ch.END]
        assert q1.empty()
        ib.close()
    asyncio.run(main())


def test_a_broken_channel_tells_every_stream_bound_to_it() -> None:
    async def main():
        err = RuntimeError("replica died")
        ib = ch.Inboxes(lambda replica: _Call(error=err))
        (k1, q1), (k2, q2), (k3, q3) = ib.new(), ib.new(), ib.new()
        ib.bind(k1, "dead")
        ib.bind(k2, "dead")
        got = await _take(q1, 1) + await _take(q2, 1)
        assert all(isinstance(g, ch.Gone) and g.error is err for g in got)
        assert q3.empty() and ib.channels() == 0  # a request on no replica yet is not told
    asyncio.run(main())


def test_channel_ended_by_decode_is_reopened_while_streams_are_bound() -> None:
    async def main():
        box = ch.Outbox()
        opened = []

        def open_channel(replica):
            opened.append(replica)
            return _Call(ch.drain(box, idle_s=0.02))
        ib = ch.Inboxes(open_channel)
        k, q = ib.new()
        ib.bind(k, "r")  # active stays 0 here, so decode's side ends the channel when idle
        await asyncio.sleep(0.15)
        assert len(opened) >= 2  # reopened, because k is still bound
        box.put(k, ch.END)
        assert await _take(q, 1) == [ch.END]
        ib.drop(k)
        ib.close()
    asyncio.run(main())
