"""Read API for the scorer: a user's features and many items' features in one call.

    reader = FeatureReader(settings)                  # store from settings.feast.online_store
    user, items = reader.get_user_and_items("u1", ["i1", "i2"])
    # user: None (unknown user) or
    #   {"user_id", "recent_items": [ids, newest first], "click_count", "rating_count",
    #    "mean_rating", "last_event_time", "genre_profile": {genre: weight}, "event_timestamp"}
    # items: {item_id: {"item_id", "click_count", "rating_count", "popularity_total",
    #    "popularity_decayed", "popularity_time", "popularity_now", "mean_rating",
    #    "last_event_time", "event_timestamp"}} - unknown items are absent
    user, items = await reader.get_user_and_items_async(...)   # same; native async on Redis

``popularity_now`` is ``popularity_decayed`` decayed from ``popularity_time`` to the time of the read
(half-life ``feast.popularity_half_life_s``). The reader goes to the online store directly (Feast's
``online_read`` with the repository's feature views), skipping ``get_online_features``' per-call
registry work; the values are the same (tests compare both).
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from typing import Any, Iterable

from driftrec.core.settings import Settings
from driftrec.feature_store.definitions import ITEM_FEATURES, ITEM_VIEW, USER_FEATURES, USER_VIEW

Features = dict[str, Any]


def decay_popularity(decayed: float, as_of: float, now: float, half_life_s: float) -> float:
    """Decay a popularity value known at ``as_of`` to ``now`` (never grows it for now < as_of)."""
    dt = max(now - as_of, 0.0)
    return decayed * math.pow(2.0, -dt / half_life_s)


class FeatureReader:
    def __init__(self, settings: Settings, store: str | None = None) -> None:
        self.settings = settings
        self.store = store or settings.feast.online_store
        self._lock = threading.Lock()
        self._ready = False
        self._local = threading.local()  # SQLite connections are per thread

    def _open(self) -> None:
        with self._lock:
            if self._ready:
                return
            from feast.repo_config import load_repo_config

            from driftrec.feature_store import definitions
            from driftrec.feature_store.backends import get_backend
            from driftrec.feature_store.repo import write_repo_config

            repo_dir = write_repo_config(self.settings, self.store)
            self._backend = get_backend(self.store)
            self._config = load_repo_config(repo_dir, repo_dir / "feature_store.yaml")
            objs = {getattr(o, "name", None): o for o in definitions.objects(repo_dir)}
            self._user_view = objs[USER_VIEW]
            self._item_view = objs[ITEM_VIEW]
            self._async_online = None
            self._ready = True

    def _online(self):
        online = getattr(self._local, "online", None)
        if online is None:
            online = self._local.online = self._backend.online_store()
        return online

    @staticmethod
    def _keys(join_key: str, ids: Iterable[str]) -> list:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        return [EntityKey(join_keys=[join_key], entity_values=[Value(string_val=str(i))]) for i in ids]

    def _decode(self, join_key: str, entity_id: str, ts, values, names, now: float) -> Features | None:
        if not values:
            return None
        out: Features = {join_key: entity_id}
        for name in names:
            v = values.get(name)
            if v is None:
                out[name] = None
                continue
            which = v.WhichOneof("val")
            out[name] = getattr(v, which) if which else None
        if all(out[name] is None for name in names):
            return None  # Redis answers unknown keys with empty values
        if join_key == "user_id":
            out["recent_items"] = json.loads(out["recent_items"]) if out.get("recent_items") else []
            out["genre_profile"] = json.loads(out["genre_profile"]) if out.get("genre_profile") else {}
        else:
            if out.get("popularity_decayed") is not None and out.get("popularity_time") is not None:
                out["popularity_now"] = decay_popularity(
                    out["popularity_decayed"], out["popularity_time"], now,
                    self.settings.feast.popularity_half_life_s)
        out["event_timestamp"] = ts.timestamp() if ts is not None else None
        return out

    def _assemble(self, user_id, item_ids, user_res, item_res) -> tuple[Features | None, dict[str, Features]]:
        now = time.time()
        ts, values = user_res[0]
        user = self._decode("user_id", user_id, ts, values, USER_FEATURES, now)
        items: dict[str, Features] = {}
        for iid, (ts, values) in zip(item_ids, item_res):
            row = self._decode("item_id", iid, ts, values, ITEM_FEATURES, now)
            if row is not None:
                items[iid] = row
        return user, items

    def get_user_and_items(self, user_id: str, item_ids: Iterable[str]) -> tuple[Features | None, dict[str, Features]]:
        """(user features or None, {item_id: features}) for one user and many items, one call."""
        self._open()
        item_ids = list(dict.fromkeys(str(i) for i in item_ids))
        user_res = self._read(self._user_view, self._keys("user_id", [user_id]))
        item_res = self._read(self._item_view, self._keys("item_id", item_ids)) if item_ids else []
        return self._assemble(user_id, item_ids, user_res, item_res)

    def _read(self, view, keys: list) -> list:
        try:
            return self._online().online_read(self._config, view, keys, None)
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is an empty store
            # A SQLite store nothing was written to yet has no tables: no features, not an error
            # (a worker answers requests while its writer is still starting).
            if "no such table" in str(exc):
                return [(None, None)] * len(keys)
            raise

    async def get_user_and_items_async(self, user_id: str, item_ids: Iterable[str]) -> tuple[Features | None, dict[str, Features]]:
        """Async form: Feast's async read on Redis (client bound to this loop), a thread on SQLite."""
        if self.store != "redis":
            return await asyncio.to_thread(self.get_user_and_items, user_id, list(item_ids))
        self._open()
        item_ids = list(dict.fromkeys(str(i) for i in item_ids))
        if self._async_online is None:
            self._async_online = self._backend.online_store()
        online = self._async_online
        reads = [online.online_read_async(self._config, self._user_view, self._keys("user_id", [user_id]), None)]
        if item_ids:
            reads.append(online.online_read_async(self._config, self._item_view, self._keys("item_id", item_ids), None))
        results = await asyncio.gather(*reads)
        return self._assemble(user_id, item_ids, results[0], results[1] if item_ids else [])

    def close(self) -> None:
        online = getattr(self._local, "online", None)
        conn = getattr(online, "_conn", None)
        if conn is not None:
            conn.close()
            online._conn = None
