"""Faust's producer buffer flush must not return before every buffered message is with the producer.

Offsets are committed right after that flush; a flush that returns early lets a crash lose the
table updates of committed events (see ``driftrec.streams.faust_patches``). These tests run Faust's real
``ProducerBuffer`` service with a channel whose publishing is slow.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from faust.transport.producer import ProducerBuffer

from driftrec.streams import faust_patches as faust_fixes  # noqa: N813

faust_fixes.apply()


class SlowChannel:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.published: list[str] = []

    async def publish_message(self, fut, wait: bool = False) -> None:
        await asyncio.sleep(self.delay)
        self.published.append(fut.name)


def message(channel: SlowChannel, name: str):
    return SimpleNamespace(message=SimpleNamespace(channel=channel), name=name)


async def started_buffer() -> ProducerBuffer:
    buf = ProducerBuffer()
    buf.app = SimpleNamespace(conf=SimpleNamespace(producer_threaded=False))
    await buf.start()
    return buf


@pytest.mark.asyncio
async def test_flush_waits_for_a_slow_queue() -> None:
    channel = SlowChannel(delay=0.25)  # slower than Faust's 0.1 s give-up
    buf = await started_buffer()
    try:
        for n in range(3):
            buf.put(message(channel, f"m{n}"))
        await buf.flush()
        assert channel.published == ["m0", "m1", "m2"]
    finally:
        await buf.stop()


@pytest.mark.asyncio
async def test_flush_waits_for_the_message_in_hand() -> None:
    channel = SlowChannel(delay=0.05)
    buf = await started_buffer()
    try:
        buf.put(message(channel, "only"))
        await asyncio.sleep(0.01)  # the sender task has taken it off the queue: size is 0
        assert buf.size == 0
        await buf.flush()
        assert channel.published == ["only"]
    finally:
        await buf.stop()


@pytest.mark.asyncio
async def test_fausts_own_flush_returns_early() -> None:
    """The upstream bug the fix exists for; if this starts failing, Faust may have fixed it."""
    channel = SlowChannel(delay=0.25)
    buf = await started_buffer()
    try:
        for n in range(3):
            buf.put(message(channel, f"m{n}"))
        await faust_fixes.original_flush(buf)
        assert len(channel.published) < 3
        await buf.flush()
        assert len(channel.published) == 3
    finally:
        await buf.stop()
