"""DecodeServer.cancel_stream: a running channelled request is cancelled; one not there yet is
remembered (bounded), so that it is dropped when it arrives."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from types import SimpleNamespace

from pd_serve.servers import DecodeServer


def _replica():
    return SimpleNamespace(_sink_tasks={}, _cancelled_sinks=OrderedDict(), _CANCELLED_KEEP=3)


def test_a_running_stream_is_cancelled():
    async def go():
        r = _replica()
        task = asyncio.ensure_future(asyncio.sleep(10))
        r._sink_tasks[("ing-1", 7)] = task
        assert DecodeServer.cancel_stream(r, "ing-1", 7) is True
        await asyncio.sleep(0)
        assert task.cancelled() and not r._cancelled_sinks

    asyncio.run(go())


def test_a_stream_not_there_yet_is_remembered_and_the_memory_is_bounded():
    r = _replica()
    for key in range(5):
        assert DecodeServer.cancel_stream(r, "ing-1", key) is False
    assert list(r._cancelled_sinks) == [("ing-1", 2), ("ing-1", 3), ("ing-1", 4)]
