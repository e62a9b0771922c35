"""The scorer worker's catalogue feed: items from the Kafka items topic into the scorer's catalogue.

Attached to the scorer's aiohttp app when a broker is reachable (configured bootstrap servers, or a
running embedded broker); a scorer without one is fed from a catalogue file or over HTTP
(``POST /v1/items``). Adapter announcements have their own consumer (:mod:`driftrec.model.serving.announcements`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from driftrec.core.contracts import Item

log = logging.getLogger(__name__)


def kafka_bootstrap(settings: Any) -> str | None:
    """The broker this scorer should follow, or None when there is none."""
    from driftrec.core.broker import BrokerError, broker

    try:
        with broker(settings, start=False) as bootstrap:
            return bootstrap
    except BrokerError:
        return None


async def feed_catalogue(settings: Any, bootstrap: str, catalogue, flush_every_s: float = 0.5) -> None:
    """Follow the items topic into ``catalogue`` (upserts batched, so vectors refresh once per batch)."""
    from driftrec.core.followers import CatalogueFollower

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


def attach_catalogue_feed(app: web.Application, settings: Any, bootstrap: str, catalogue) -> None:
    tasks: list[asyncio.Task] = []

    async def start(app: web.Application) -> None:
        tasks.append(asyncio.get_running_loop().create_task(feed_catalogue(settings, bootstrap, catalogue)))

    async def stop(app: web.Application) -> None:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    log.info("scorer catalogue follows %s on %s", settings.topics.items.name, bootstrap)
