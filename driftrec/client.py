"""For apps: produce events to driftrec and subscribe to its recommendations.

Async::

    async with AsyncProducer(settings) as p:
        await p.click("user-1", "item-9")
        await p.rating("user-1", "item-9", 4.5)
        await p.request("user-1", k=10)

    async for rec in subscribe(settings):            # dicts, one per Recommendation
        print(rec["user_id"], [i["item_id"] for i in rec["items"]])

Sync (scripts, notebooks, synchronous web apps; on kafka-python)::

    with Producer(settings) as p:
        p.click("user-1", "item-9")

    for rec in subscribe_sync(settings, user_id="user-1", timeout_s=30):
        ...

This module needs only the base install (``pip install driftrec``: the contracts, validation, settings,
aiokafka and kafka-python; no Faust, torch or Feast).

Events are validated client-side with the same code the ingest agent uses, so an app learns about
a bad event at once (``ValueError``); the agent validates again, since not every producer is ours.
Delivery is at-least-once (``acks=all``; Tansu offers no idempotent producer): every event carries
an ``event_id`` and driftrec counts each id once.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Iterable, Iterator

from driftrec.core.settings import Settings
from driftrec.core.contracts import (
    Click,
    Event,
    Item,
    Rating,
    RecommendationRequest,
    new_event_id,
)
from driftrec.core.validation import Limits, Rejected, validate


class EventError(ValueError):
    """An event failed validation before it was sent."""

    def __init__(self, rejected: Rejected) -> None:
        super().__init__(str(rejected))
        self.rejected = rejected


def _topic_for(settings: Settings, etype: str) -> str:
    t = settings.topics
    return {
        Click.TYPE: t.clicks.name,
        Rating.TYPE: t.ratings.name,
        Item.TYPE: t.items.name,
        RecommendationRequest.TYPE: t.requests.name,
    }[etype]


def prepare(settings: Settings, event: Event | dict[str, Any]) -> tuple[str, bytes, bytes, str]:
    """(topic, key, value, event_id) for an event; fills ``event_id``/``event_time`` when absent; validates."""
    data = event.to_wire() if isinstance(event, Event) else dict(event)
    data.setdefault("event_id", new_event_id())
    data.setdefault("event_time", time.time())
    raw = json.dumps(data, separators=(",", ":")).encode()
    result = validate(raw, limits=Limits.from_settings(settings))
    if isinstance(result, Rejected):
        raise EventError(result)
    return _topic_for(settings, result.TYPE), result.key().encode(), raw, result.event_id


class AsyncProducer:
    def __init__(self, settings: Settings | None = None, bootstrap_servers: str | None = None) -> None:
        self.settings = settings or Settings.load()
        self._bootstrap = bootstrap_servers
        self._producer = None

    async def start(self) -> "AsyncProducer":
        from aiokafka import AIOKafkaProducer

        from driftrec.core.kafka_auth import client_options

        self._bootstrap = _bootstrap(self.settings, self._bootstrap)

        self._producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            **client_options(self.settings.kafka),
            acks="all",
            enable_idempotence=False,
            linger_ms=5,
            client_id=f"{self.settings.kafka.client_id}-producer",
        )
        await self._producer.start()
        return self

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def __aenter__(self) -> "AsyncProducer":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def send(self, event: Event | dict[str, Any]) -> str:
        """Send one event and wait for the broker's acknowledgement; returns its event_id."""
        event_id, fut = await self.send_nowait(event)
        await fut
        return event_id

    async def send_nowait(self, event: Event | dict[str, Any]) -> tuple[str, asyncio.Future]:
        """Queue one event; returns its id and a future resolved when the broker has it."""
        if self._producer is None:
            raise RuntimeError("producer not started")
        topic, key, value, event_id = prepare(self.settings, event)
        return event_id, await self._producer.send(topic, value=value, key=key)

    async def send_many(self, events: Iterable[Event | dict[str, Any]]) -> int:
        futures = [(await self.send_nowait(e))[1] for e in events]
        await asyncio.gather(*futures)
        return len(futures)

    async def send_raw(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        """Send bytes unchecked (tests and tools that exercise the dead-letter path)."""
        await (await self._producer.send(topic, value=value, key=key))

    async def click(self, user_id: str, item_id: str, **kw: Any) -> str:
        return await self.send({"type": Click.TYPE, "user_id": user_id, "item_id": item_id, **kw})

    async def rating(self, user_id: str, item_id: str, rating: float, **kw: Any) -> str:
        return await self.send({"type": Rating.TYPE, "user_id": user_id, "item_id": item_id, "rating": rating, **kw})

    async def item(self, item_id: str, title: str, **kw: Any) -> str:
        return await self.send({"type": Item.TYPE, "item_id": item_id, "title": title, **kw})

    async def request(self, user_id: str, k: int = 10, **kw: Any) -> str:
        """Ask for recommendations; the answer's ``request_id`` is the returned id."""
        return await self.send({"type": RecommendationRequest.TYPE, "user_id": user_id, "k": k, **kw})


class Producer:
    """The blocking producer (scripts, notebooks, synchronous web apps), on kafka-python.

    Same events, validation, keys and delivery as :class:`AsyncProducer` (``acks=all``, no idempotent
    producer - Tansu has none; at-least-once, every event carrying its ``event_id``): :meth:`send`
    returns once the broker has the event; :meth:`send_many` sends them all, then waits for every
    acknowledgement. ``timeout_s``: how long an acknowledgement may take before ``KafkaTimeoutError``."""

    def __init__(self, settings: Settings | None = None, bootstrap_servers: str | None = None, *,
                 timeout_s: float = 30.0) -> None:
        from kafka import KafkaProducer

        from driftrec.core.kafka_auth import client_options

        self.settings = settings or Settings.load()
        self.timeout_s = timeout_s
        self._producer = KafkaProducer(
            bootstrap_servers=_bootstrap(self.settings, bootstrap_servers),
            **client_options(self.settings.kafka),
            acks="all",
            enable_idempotence=False,
            linger_ms=5,
            client_id=f"{self.settings.kafka.client_id}-producer",
        )

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=self.timeout_s)
            self._producer = None

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, event: Event | dict[str, Any]):
        if self._producer is None:
            raise RuntimeError("producer closed")
        topic, key, value, event_id = prepare(self.settings, event)
        return event_id, self._producer.send(topic, value=value, key=key)

    def send(self, event: Event | dict[str, Any]) -> str:
        """Send one event and wait for the broker's acknowledgement; returns its event_id."""
        event_id, fut = self._send(event)
        fut.get(timeout=self.timeout_s)
        return event_id

    def send_many(self, events: Iterable[Event | dict[str, Any]]) -> int:
        futures = [self._send(e)[1] for e in events]  # every event is validated before any waits
        self._producer.flush(timeout=self.timeout_s)
        for fut in futures:
            fut.get(timeout=self.timeout_s)
        return len(futures)

    def click(self, user_id: str, item_id: str, **kw: Any) -> str:
        return self.send({"type": Click.TYPE, "user_id": user_id, "item_id": item_id, **kw})

    def rating(self, user_id: str, item_id: str, rating: float, **kw: Any) -> str:
        return self.send({"type": Rating.TYPE, "user_id": user_id, "item_id": item_id, "rating": rating, **kw})

    def item(self, item_id: str, title: str, **kw: Any) -> str:
        return self.send({"type": Item.TYPE, "item_id": item_id, "title": title, **kw})

    def request(self, user_id: str, k: int = 10, **kw: Any) -> str:
        return self.send({"type": RecommendationRequest.TYPE, "user_id": user_id, "k": k, **kw})


def _bootstrap(settings: Settings, bootstrap_servers: str | None) -> str:
    """The configured brokers, else the running embedded broker's address (never starts one)."""
    if bootstrap_servers is not None:
        return bootstrap_servers
    from driftrec.core.broker import broker

    with broker(settings, start=False) as servers:
        return servers


def _consumer_options(settings: Settings, bootstrap_servers: str | None, group_id: str | None,
                      from_beginning: bool) -> dict[str, Any]:
    """What both subscriptions give their consumer (aiokafka and kafka-python take the same names)."""
    from driftrec.core.broker import is_tansu, session_timeouts
    from driftrec.core.kafka_auth import client_options

    session, heartbeat = session_timeouts(settings)
    return dict(
        bootstrap_servers=_bootstrap(settings, bootstrap_servers),
        **client_options(settings.kafka),
        group_id=group_id,
        auto_offset_reset="earliest" if from_beginning else "latest",
        enable_auto_commit=group_id is not None,
        session_timeout_ms=int(session * 1000),
        heartbeat_interval_ms=int(heartbeat * 1000),
        metadata_max_age_ms=5000 if is_tansu(settings) else 300000,
    )


def _recommendation(value: bytes, user_id: str | None) -> dict[str, Any] | None:
    """A record's recommendation, or None when it is not JSON or (with ``user_id``) names another user."""
    try:
        rec = json.loads(value)
    except ValueError:
        return None
    return rec if user_id is None or rec.get("user_id") == user_id else None


async def subscribe(
    settings: Settings | None = None,
    *,
    bootstrap_servers: str | None = None,
    topic: str | None = None,
    group_id: str | None = None,
    from_beginning: bool = False,
    user_id: str | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Yield recommendations (decoded JSON objects) as they are published.

    With a ``group_id`` the subscription commits its position (a restarted app continues where it
    stopped); without one it reads from the end (or the beginning with ``from_beginning``).
    ``user_id``: one user's recommendations, read from that user's partition only (recommendations are
    keyed by user id, so the default partitioner put them all there); with a ``group_id`` that
    partition is assigned directly (no group rebalancing) and its position still committed.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from driftrec.core.broker import user_partition

    settings = settings or Settings.load()
    name = topic or settings.topics.recommendations.name
    options = _consumer_options(settings, bootstrap_servers, group_id, from_beginning)
    consumer = AIOKafkaConsumer(**options)
    await consumer.start()
    try:
        if user_id is None:
            consumer.subscribe([name])
        else:
            await consumer.topics()  # metadata, for the topic's partition count
            partitions = consumer.partitions_for_topic(name)
            if not partitions:
                raise LookupError(f"topic {name!r} does not exist on {options['bootstrap_servers']}")
            consumer.assign([TopicPartition(name, user_partition(user_id, len(partitions)))])
        async for msg in consumer:
            rec = _recommendation(msg.value, user_id)
            if rec is not None:
                yield rec
    finally:
        await consumer.stop()


def subscribe_sync(
    settings: Settings | None = None,
    *,
    bootstrap_servers: str | None = None,
    topic: str | None = None,
    group_id: str | None = None,
    from_beginning: bool = False,
    user_id: str | None = None,
    timeout_s: float | None = None,
) -> Iterator[dict[str, Any]]:
    """The blocking flavour of :func:`subscribe`, on kafka-python: same arguments and records.

    ``timeout_s``: end the iteration after this long without a record (None: wait for ever). Without a
    ``group_id`` every partition of the topic (or the user's one) is assigned directly; with one, the
    group coordinates the partitions and the position is committed."""
    from kafka import KafkaConsumer, TopicPartition

    from driftrec.core.broker import user_partition

    settings = settings or Settings.load()
    name = topic or settings.topics.recommendations.name
    consumer = KafkaConsumer(**_consumer_options(settings, bootstrap_servers, group_id, from_beginning),
                             consumer_timeout_ms=float("inf") if timeout_s is None else int(timeout_s * 1000))
    try:
        if group_id is not None and user_id is None:
            consumer.subscribe([name])
        else:
            partitions = consumer.partitions_for_topic(name)
            if not partitions:
                raise LookupError(f"topic {name!r} does not exist")
            chosen = [user_partition(user_id, len(partitions))] if user_id is not None else sorted(partitions)
            consumer.assign([TopicPartition(name, p) for p in chosen])
        for msg in consumer:
            rec = _recommendation(msg.value, user_id)
            if rec is not None:
                yield rec
    finally:
        consumer.close()
