"""drain_batches: batches only what is ready, propagates errors, aborts the producer on cancel."""

from __future__ import annotations

import asyncio

import pytest

from pd_serve.engine import drain_batches


async def test_ready_items_travel_together_and_lone_items_go_at_once() -> None:
    async def gen():
        for i in range(3):
            yield i          # three ready at once
        await asyncio.sleep(0.05)
        yield 3              # then a lone one
    out = [b async for b in drain_batches(gen())]
    assert out[0] == [0, 1, 2] and out[-1] == [3] and sum(out, []) == [0, 1, 2, 3]


async def test_errors_reach_the_consumer_after_the_items_before_them() -> None:
    async def gen():
        yield "a"
        raise RuntimeError("engine died")
    got = []
    with pytest.raises(RuntimeError, match="engine died"):
        async for b in drain_batches(gen()):
            got.extend(b)
    assert got == ["a"]


async def test_closing_the_consumer_cancels_the_producer() -> None:
    cancelled = asyncio.Event()

    async def gen():
        try:
            for i in range(1000):
                yield i
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            cancelled.set()  # where vLLM's generate() aborts the engine request
            raise
    agen = drain_batches(gen())
    assert await agen.__anext__()
    await agen.aclose()
    await asyncio.wait_for(cancelled.wait(), 1)


async def test_an_interval_groups_a_steady_stream_and_never_delays_its_end() -> None:
    async def gen():
        for i in range(20):
            yield i
            await asyncio.sleep(0.005)   # one item every 5 ms
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    out = [(loop.time() - t0, b) async for b in drain_batches(gen(), min_interval_s=0.05)]
    total = loop.time() - t0
    assert sum((b for _, b in out), []) == list(range(20))
    assert out[0][1] == [0], "the first item goes at once, alone"
    # ~100 ms of items at most one batch per 50 ms: 1 + about 2-3 batches, not 20
    assert 2 <= len(out) <= 5, [b for _, b in out]
    # the end is not held back for a full interval: the last item left with the stream's end
    assert total < 0.1 + 0.04, total


async def test_an_interval_of_zero_sends_each_lone_item_at_once() -> None:
    async def gen():
        for i in range(5):
            yield i
            await asyncio.sleep(0.005)
    out = [b async for b in drain_batches(gen(), min_interval_s=0.0)]
    assert out == [[0], [1], [2], [3], [4]]
