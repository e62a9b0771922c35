"""Followers: every worker's full view of a topic, read from the beginning outside the consumer group.

The consumer group splits partitions between workers, which is right for per-user state but not for
what every worker needs whole: the item catalogue (to render texts and reject unknown items) and the
global interaction log that co-visitation and popularity learn from. A :class:`TopicFollower` reads
every partition of its topics from the beginning with a plain consumer, validates each record with
the same code as the ingest agent (invalid ones are skipped here: the ingest agent dead-letters them),
drops redeliveries by ``event_id``, and hands events to its listeners. A restarted worker rebuilds
the same state by replaying the retained log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Callable

from driftrec.core.settings import Settings
from driftrec.core.contracts import Click, Event, Item, Rating
from driftrec.core.validation import Limits, validate

log = logging.getLogger(__name__)

# records a follower validates and delivers before it lets the event loop run its other work: a fetch of
# 5,000 records took the loop for ~100 ms in one go (~20 µs a record), a request arriving meanwhile waited
YIELD_EVERY = 256


class TopicFollower:
    def __init__(self, settings: Settings, bootstrap_servers: str, topics: dict[str, str], name: str,
                 dedupe: int = 200_000) -> None:
        """``topics`` maps topic name -> the event type expected on it."""
        self.settings = settings
        self.bootstrap_servers = bootstrap_servers
        self.topics = topics
        self.name = name
        self.caught_up = asyncio.Event()
        self._limits = Limits.from_settings(settings)
        self._listeners: list[Callable[[Event], None]] = []
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._dedupe = dedupe
        self.count = 0

    def listen(self, fn: Callable[[Event], None]) -> None:
        self._listeners.append(fn)

    def _deliver(self, ev: Event) -> None:
        if ev.event_id in self._seen:
            return
        self._seen[ev.event_id] = None
        if len(self._seen) > self._dedupe:
            self._seen.popitem(last=False)
        self.count += 1
        for fn in self._listeners:
            try:
                fn(ev)
            except Exception:  # noqa: BLE001 - a listener must not stop the feed
                log.exception("%s listener failed on event %s", self.name, ev.event_id)

    async def wait_caught_up(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self.caught_up.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def run(self) -> None:
        """Follow the topics until cancelled; reconnects (and replays, deduplicated) on errors."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from driftrec.core.broker import true_end_offsets
        from driftrec.core.kafka_auth import client_options

        while True:
            consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap_servers, group_id=None,
                                        **client_options(self.settings.kafka),
                                        enable_auto_commit=False, auto_offset_reset="earliest")
            try:
                await consumer.start()
                tps = []
                for topic in self.topics:
                    parts = consumer.partitions_for_topic(topic)
                    deadline = time.monotonic() + 30
                    while not parts and time.monotonic() < deadline:
                        await asyncio.sleep(0.5)
                        await consumer._client.force_metadata_update()
                        parts = consumer.partitions_for_topic(topic)
                    tps += [TopicPartition(topic, p) for p in sorted(parts or [])]
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                ends = await true_end_offsets(consumer, tps)
                pending = {tp for tp in tps if ends.get(tp, 0) > 0}
                while True:
                    batches = await consumer.getmany(timeout_ms=200, max_records=5000)
                    taken = 0
                    for tp, records in batches.items():
                        expected = self.topics[tp.topic]
                        for rec in records:
                            ev = validate(rec.value, limits=self._limits, expected_type=expected)
                            if isinstance(ev, Event):
                                self._deliver(ev)
                            taken += 1
                            if taken % YIELD_EVERY == 0:
                                await asyncio.sleep(0)  # the loop's other work (requests) between slices
                    for tp in list(pending):
                        if await consumer.position(tp) >= ends[tp]:
                            pending.discard(tp)
                    if not pending and not self.caught_up.is_set():
                        log.info("%s caught up: %d events", self.name, self.count)
                        self.caught_up.set()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - broker away: retry
                log.exception("%s lost the broker; retrying in 1 s", self.name)
                await asyncio.sleep(1.0)
            finally:
                await consumer.stop()


class CatalogueFollower(TopicFollower):
    """Every item of the compacted items topic, newest entry per item id."""

    def __init__(self, settings: Settings, bootstrap_servers: str) -> None:
        super().__init__(settings, bootstrap_servers, {settings.topics.items.name: Item.TYPE}, "catalogue")
        self.items: dict[str, Item] = {}
        self.version = 0
        self.listen(self._add)

    def _deliver(self, ev: Event) -> None:  # items are idempotent by id: no event_id dedupe needed
        for fn in self._listeners:
            try:
                fn(ev)
            except Exception:  # noqa: BLE001
                log.exception("catalogue listener failed on item %s", getattr(ev, "item_id", "?"))

    def _add(self, item: Item) -> None:
        old = self.items.get(item.item_id)
        if old is not None and old.event_time > item.event_time:
            return  # an older entry replayed after a newer one: keep the newer
        self.items[item.item_id] = item
        self.version += 1

    def on_item(self, listener: Callable[[Item], None]) -> None:
        self.listen(listener)

    def add(self, item: Item) -> None:
        self._deliver(item)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.items

    def get(self, item_id: str) -> Item | None:
        return self.items.get(item_id)


class InteractionFollower(TopicFollower):
    """Every click and rating, for the global candidate sources (co-visitation, popularity)."""

    def __init__(self, settings: Settings, bootstrap_servers: str) -> None:
        t = settings.topics
        super().__init__(settings, bootstrap_servers, {t.clicks.name: Click.TYPE, t.ratings.name: Rating.TYPE},
                         "interactions")
