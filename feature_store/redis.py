"""Redis online store: config and writer.

Writes use Feast's async Redis API (``online_write_batch_async``) on the caller's event loop: the
async client binds to the first loop that uses it, so a writer belongs to one loop (the worker's).
``skip_dedup: true``: the features stage is the only writer of an entity (its partition's owner)
and writes its state in order, and a row's event time is the entity's newest event, which a late
event does not move - Redis' default skip-older-or-equal check would drop exactly those updates.
"""

from __future__ import annotations

import asyncio

from driftrec.settings import Settings
from feature_store.writer import FeatureWriter

STORE = "redis"


def online_store_config(settings: Settings) -> dict:
    f = settings.feast
    cfg = {"type": "redis", "connection_string": f.redis_url, "skip_dedup": True}
    if f.redis_key_ttl_s:
        cfg["key_ttl_seconds"] = int(f.redis_key_ttl_s)
    return cfg


def online_store():
    from feast.infra.online_stores.redis import RedisOnlineStore

    return RedisOnlineStore()


def ping(url: str, timeout: float = 1.0) -> bool:
    """Whether a Redis server answers at ``host:port[,options]`` (Feast's connection string)."""
    import redis as redis_client

    host_port = url.split(",")[0]
    host, _, port = host_port.rpartition(":")
    try:
        return bool(redis_client.Redis(host=host or "127.0.0.1", port=int(port or 6379),
                                       socket_connect_timeout=timeout, socket_timeout=timeout).ping())
    except Exception:  # noqa: BLE001 - any failure means "not reachable"
        return False


class Writer(FeatureWriter):
    store_name = STORE

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._config = None
        self._views = None
        self._online = None

    async def _start(self) -> None:
        from feature_store.definitions import ITEM_VIEW, USER_VIEW
        from feature_store.repo import open_store

        fs = await asyncio.to_thread(open_store, self.settings, STORE)
        self._config = fs.config
        self._views = (fs.get_feature_view(USER_VIEW), fs.get_feature_view(ITEM_VIEW))
        self._online = online_store()

    async def _write(self, user_data: list, item_data: list) -> None:
        user_view, item_view = self._views
        if user_data:
            await self._online.online_write_batch_async(self._config, user_view, user_data, None)
        if item_data:
            await self._online.online_write_batch_async(self._config, item_view, item_data, None)

    async def _close(self) -> None:
        client = getattr(self._online, "_client_async", None)
        if client is not None:
            try:
                await client.aclose()
            except Exception:  # noqa: BLE001
                pass
