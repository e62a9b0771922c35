"""The topic followers against a real (embedded) broker: every event delivered once, in order, and a big
fetch does not hold the event loop for all of its records."""

from __future__ import annotations

import asyncio
import json
import time

from driftrec.core.followers import YIELD_EVERY, InteractionFollower
from tests.support import produce_raw


def test_a_big_fetch_is_delivered_in_order_in_slices_between_the_loops_other_work(kafka):
    bootstrap, settings = kafka
    n = 6 * YIELD_EVERY + 17
    now = time.time()
    clicks = [json.dumps({"type": "click", "event_id": f"e{k}", "event_time": now - n + k, "user_id": "u1",
                          "item_id": f"i{k % 50}"}).encode() for k in range(n)]
    # one partition: the follower's order is the topic's; plus one invalid record, not delivered
    produce_raw(bootstrap, [(settings.topics.clicks.name, b"u1", v) for v in clicks[:100]]
                + [(settings.topics.clicks.name, b"u1", b"{not json")]
                + [(settings.topics.clicks.name, b"u1", v) for v in clicks[100:]]
                + [(settings.topics.clicks.name, b"u1", clicks[5])])  # a repeat: delivered once

    async def follow() -> tuple[list[str], list[int]]:
        follower = InteractionFollower(settings, bootstrap)
        got: list[str] = []
        follower.listen(lambda ev: got.append(ev.event_id))
        turns: list[int] = []  # events delivered so far, at each turn the loop gave another task
        task = asyncio.create_task(follower.run())

        async def tick() -> None:
            while True:
                turns.append(len(got))
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        try:
            assert await follower.wait_caught_up(60), "the follower did not catch up"
        finally:
            task.cancel()
            ticker.cancel()
            await asyncio.gather(task, ticker, return_exceptions=True)
        return got, turns

    got, turns = asyncio.run(follow())
    assert got == [f"e{k}" for k in range(n)]
    steps = [b - a for a, b in zip(turns, turns[1:])]
    assert max(steps) <= YIELD_EVERY, f"{max(steps)} events delivered without the loop running anything else"
