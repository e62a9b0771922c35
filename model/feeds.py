"""The scorer worker's Kafka feeds: the catalogue from the items topic, adapter announcements.

Both attach to the scorer's aiohttp app as background tasks when a broker is reachable (configured
bootstrap servers, or a running embedded broker); a scorer without a broker is fed over HTTP
(``POST /v1/items``) or from a catalogue file instead.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from streams.contracts import AdapterAnnouncement, Item

log = logging.getLogger(__name__)


async def feed_catalogue(settings: Any, bootstrap: str, catalogue, flush_every_s: float = 0.5) -> None:
    """Follow the items topic into ``catalogue`` (upserts batched, so vectors refresh once per batch)."""
    from streams.catalogue import CatalogueFollower

    follower = CatalogueFollower(settings, bootstrap)
    pending: list[Item] = []
    follower.on_item(pending.append)
    task = asyncio.get_running_loop().create_task(follower.run())
    try:
        while True:
            await asyncio.sleep(flush_every_s)
            if pending:
                batch, pending[:] = list(pending), []
                catalogue.upsert(batch)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def feed_adapters(settings: Any, bootstrap: str, scorer) -> None:
    """Apply adapter announcements (activate / rollback) published after this scorer started."""
    import json

    from aiokafka import AIOKafkaConsumer

    while True:
        consumer = AIOKafkaConsumer(settings.topics.adapters.name, bootstrap_servers=bootstrap, group_id=None,
                                    auto_offset_reset="latest", enable_auto_commit=False)
        try:
            await consumer.start()
            async for msg in consumer:
                try:
                    data = json.loads(msg.value)
                    data.pop("type", None)
                    data.pop("schema_version", None)
                    ann = AdapterAnnouncement(**data)
                except (ValueError, TypeError) as exc:
                    log.error("ignoring malformed adapter announcement at offset %s: %s", msg.offset, exc)
                    continue
                await scorer.on_announcement(ann)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - broker away: retry
            log.exception("adapter feed lost the broker; retrying in 1 s")
            await asyncio.sleep(1.0)
        finally:
            await consumer.stop()


def attach_feeds(app: web.Application, settings: Any, scorer, catalogue) -> bool:
    """Start both feeds with the app when a broker is reachable; returns whether one was."""
    from driftrec.broker import BrokerError, broker

    try:
        with broker(settings, start=False) as bootstrap:
            pass
    except BrokerError:
        log.info("no Kafka broker: the scorer is fed over HTTP (POST /v1/items) and the adapter directory")
        return False
    tasks: list[asyncio.Task] = []

    async def start(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        tasks.append(loop.create_task(feed_catalogue(settings, bootstrap, catalogue)))
        tasks.append(loop.create_task(feed_adapters(settings, bootstrap, scorer)))

    async def stop(app: web.Application) -> None:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    log.info("scorer follows %s and %s on %s", settings.topics.items.name, settings.topics.adapters.name, bootstrap)
    return True
