"""The app client's subscription against a real broker: one user's recommendations come from that user's
partition only (the others are never fetched), in order; without a user every partition is read."""

from __future__ import annotations

import asyncio
import json

from driftrec.core.broker import user_partition
from tests.support import produce_raw


def _rec(n: int, user: str) -> bytes:
    return json.dumps({"type": "recommendation", "event_id": f"r{n}", "event_time": 1.0, "request_id": f"q{n}",
                       "user_id": user, "items": [{"item_id": "m1", "score": 1.0}]}).encode()


async def _collect(settings, bootstrap, n: int, timeout: float = 30.0, **kw) -> list[dict]:
    from driftrec.client import subscribe

    out: list[dict] = []

    async def read() -> None:
        async for rec in subscribe(settings, bootstrap_servers=bootstrap, from_beginning=True, **kw):
            out.append(rec)
            if len(out) >= n:
                return

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        pass
    return out


def test_subscribe_for_one_user_reads_only_that_users_partition(kafka):
    from aiokafka import AIOKafkaProducer

    bootstrap, settings = kafka
    topic = settings.topics.recommendations
    assert topic.partitions > 1
    solo = "solo"
    home = user_partition(solo, topic.partitions)
    others = [u for u in (f"user-{k}" for k in range(50)) if user_partition(u, topic.partitions) != home][:5]
    records = [(topic.name, u.encode(), _rec(n, u)) for n, u in enumerate(others)]
    records += [(topic.name, solo.encode(), _rec(100 + n, solo)) for n in range(3)]
    produce_raw(bootstrap, records)  # keyed: the default partitioner puts solo's on `home`

    async def stray() -> None:  # a record that names solo but sits on another partition
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False)
        await producer.start()
        try:
            await producer.send_and_wait(topic.name, _rec(999, solo), key=b"x", partition=(home + 1) % topic.partitions)
        finally:
            await producer.stop()

    asyncio.run(stray())
    mine = asyncio.run(_collect(settings, bootstrap, 4, timeout=10.0, user_id=solo))  # a 4th never comes
    assert [r["request_id"] for r in mine] == ["q100", "q101", "q102"]  # in order; the stray one never read
    everyone = asyncio.run(_collect(settings, bootstrap, len(records) + 1))
    assert sorted(r["request_id"] for r in everyone) == sorted([f"q{n}" for n in range(len(others))]
                                                               + ["q100", "q101", "q102", "q999"])
