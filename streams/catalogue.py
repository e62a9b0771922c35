"""Every worker's full copy of the item catalogue, followed from the compacted items topic.

The items topic is partitioned by item id, but every worker needs every item (to render texts, to
reject events about unknown items), so each worker reads all of its partitions from the beginning
with a plain consumer outside the consumer group. Invalid entries are skipped here; the ingest agent
sends them to dead letters (it sees the same records through the group).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from driftrec.settings import Settings
from streams.contracts import Item
from streams.validation import Limits, validate

log = logging.getLogger(__name__)

Listener = Callable[[Item], None]


class CatalogueFollower:
    def __init__(self, settings: Settings, bootstrap_servers: str) -> None:
        self.settings = settings
        self.bootstrap_servers = bootstrap_servers
        self.topic = settings.topics.items.name
        self.items: dict[str, Item] = {}
        self.version = 0
        self.caught_up = asyncio.Event()
        self._listeners: list[Listener] = []
        self._limits = Limits.from_settings(settings)

    def on_item(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def add(self, item: Item) -> None:
        old = self.items.get(item.item_id)
        if old is not None and old.event_time > item.event_time:
            return  # an older entry replayed after a newer one: keep the newer
        self.items[item.item_id] = item
        self.version += 1
        for fn in self._listeners:
            try:
                fn(item)
            except Exception:  # noqa: BLE001 - a listener must not stop the feed
                log.exception("catalogue listener failed on item %s", item.item_id)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.items

    def get(self, item_id: str) -> Item | None:
        return self.items.get(item_id)

    async def wait_caught_up(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self.caught_up.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def run(self) -> None:
        """Follow the items topic until cancelled; reconnects on errors."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from driftrec.broker import true_end_offsets

        while True:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap_servers, group_id=None, enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            try:
                await consumer.start()
                parts = consumer.partitions_for_topic(self.topic)
                deadline = time.monotonic() + 30
                while not parts and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    await consumer._client.force_metadata_update()
                    parts = consumer.partitions_for_topic(self.topic)
                tps = [TopicPartition(self.topic, p) for p in sorted(parts or [])]
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                ends = await true_end_offsets(consumer, tps)
                pending = {tp for tp in tps if ends.get(tp, 0) > 0}
                if not pending:
                    self.caught_up.set()
                while True:
                    batches = await consumer.getmany(timeout_ms=500, max_records=5000)
                    for tp, records in batches.items():
                        for rec in records:
                            ev = validate(rec.value, limits=self._limits, expected_type=Item.TYPE)
                            if isinstance(ev, Item):
                                self.add(ev)
                            if tp in pending and rec.offset + 1 >= ends[tp]:
                                pending.discard(tp)
                    if pending:
                        for tp in list(pending):
                            if await consumer.position(tp) >= ends[tp]:
                                pending.discard(tp)
                    if not pending and not self.caught_up.is_set():
                        log.info("catalogue caught up: %d items", len(self.items))
                        self.caught_up.set()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - broker away: retry
                log.exception("catalogue follower lost the broker; retrying in 1 s")
                await asyncio.sleep(1.0)
            finally:
                await consumer.stop()
