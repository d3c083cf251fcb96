"""coalesce: deltas go out at once, and what piles up during a send goes out as one message."""

import asyncio
from collections.abc import AsyncIterator

import pytest

from chatmesh.dialogue.coalesce import coalesce

END = object()


class Source:
    """A model stream the test feeds by hand."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.closed = False

    async def items(self) -> AsyncIterator[object]:
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item is END:
                    return
        finally:
            self.closed = True


async def test_the_first_delta_is_relayed_without_waiting_for_more():
    source = Source()
    relayed = coalesce(source.items())
    source.queue.put_nowait("first")

    assert await asyncio.wait_for(anext(relayed), 5) == "first"
    await relayed.aclose()


async def test_deltas_that_arrive_during_a_send_go_out_as_one_message():
    source = Source()
    relayed = coalesce(source.items())
    source.queue.put_nowait("a")
    assert await anext(relayed) == "a"
    # While the consumer is "sending" "a", three more deltas arrive.
    for text in ("b", "c", "d"):
        source.queue.put_nowait(text)
    for _ in range(10):
        await asyncio.sleep(0)
    source.queue.put_nowait(END)

    assert [item async for item in relayed] == ["bcd", END]


async def test_an_error_comes_after_the_text_before_it():
    source = Source()
    for item in ("x", "y", RuntimeError("stream broke")):
        source.queue.put_nowait(item)

    relayed = coalesce(source.items())
    assert await anext(relayed) == "xy"
    with pytest.raises(RuntimeError, match="stream broke"):
        await anext(relayed)


async def test_closing_the_relay_closes_the_source():
    source = Source()
    relayed = coalesce(source.items())
    source.queue.put_nowait("partial")
    assert await anext(relayed) == "partial"

    await relayed.aclose()

    assert source.closed


async def test_a_source_that_ends_without_its_final_item_is_an_error():
    async def truncated() -> AsyncIterator[object]:
        yield "only text"

    relayed = coalesce(truncated())
    assert await anext(relayed) == "only text"
    with pytest.raises(RuntimeError):
        await anext(relayed)
