"""SQLite online store: config and writer.

Feast's SQLite online store is not thread-safe through a shared store object (errors and lost
writes with several threads), so every write goes through ONE dedicated writer thread that owns
its own store object; the event loop only awaits the thread's future. Readers (other threads,
other processes) open their own connections.

Feast's ``online_write_batch`` issues one ``execute`` per (entity, feature) from a Python loop;
:func:`write_rows` runs the *same* upsert statement (same table, columns, key serialization and
value encoding, from Feast's own helpers) as one ``executemany`` per view and transaction, which
is several times cheaper per row. Configurations that need more columns (vector search, the
OpenAI-compatible store) go through Feast's own method. Tests compare what both paths write with
``FeatureStore.get_online_features``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

from driftrec.settings import Settings
from feature_store.writer import FeatureWriter

STORE = "sqlite"


def db_path(settings: Settings) -> Path:
    f = settings.feast
    return Path(f.sqlite_path).resolve() if f.sqlite_path else Path(f.repo_dir).resolve() / "online.db"


def online_store_config(settings: Settings) -> dict:
    return {"type": "sqlite", "path": str(db_path(settings))}


def online_store():
    from feast.infra.online_stores.sqlite import SqliteOnlineStore

    return SqliteOnlineStore()


def _fast_path_ok(config) -> bool:
    oc = config.online_store
    return not getattr(oc, "vector_enabled", False) and not getattr(oc, "enable_openai_compatible_store", False)


def write_rows(online, config, view, data: list) -> None:
    """Upsert Feast online rows ``(entity key, {feature: Value}, event ts, created ts)`` in one transaction."""
    if not _fast_path_ok(config):
        online.online_write_batch(config, view, data, None)
        return
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.infra.online_stores.helpers import extract_text_and_num
    from feast.infra.online_stores.sqlite import _quote_id, _table_id
    from feast.utils import to_naive_utc

    conn = online._get_conn(config)
    table_name = _table_id(config.project, view, config.registry.enable_online_feature_view_versioning)
    sql = (
        f"INSERT INTO {_quote_id(table_name)} (entity_key, feature_name, value, value_text, event_ts, created_ts) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(entity_key, feature_name) DO UPDATE SET "
        "value = excluded.value, value_text = excluded.value_text, event_ts = excluded.event_ts, "
        "created_ts = excluded.created_ts;"
    )
    version = config.entity_key_serialization_version
    params = []
    for entity_key, values, ts, created in data:
        key_bin = serialize_entity_key(entity_key, entity_key_serialization_version=version)
        ts = to_naive_utc(ts)
        created = to_naive_utc(created) if created is not None else None
        for name, val in values.items():
            params.append((key_bin, name, val.SerializeToString(), extract_text_and_num(val, False)[0], ts, created))
    with conn:
        conn.executemany(sql, params)


class Writer(FeatureWriter):
    store_name = STORE

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._config = None
        self._views = None
        self._online = None

    async def _start(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="feast-sqlite-writer")
        await asyncio.get_running_loop().run_in_executor(self._pool, self._open)

    def _open(self) -> None:  # in the writer thread
        from feature_store.definitions import ITEM_VIEW, USER_VIEW
        from feature_store.repo import open_store

        fs = open_store(self.settings, STORE)
        self._config = fs.config
        self._views = (fs.get_feature_view(USER_VIEW), fs.get_feature_view(ITEM_VIEW))
        self._online = online_store()
        conn = self._online._get_conn(self._config)
        # WAL: readers (the scorer, other processes) never block the writer or see a torn batch;
        # synchronous=NORMAL: no fsync per batch (durability comes from the changelogged state -
        # rows are re-derivable from it; a power loss can lose the newest rows, not corrupt the file).
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")

    def _write_sync(self, user_data: list, item_data: list) -> None:  # in the writer thread
        user_view, item_view = self._views
        for view, data in ((user_view, user_data), (item_view, item_data)):
            if data:
                write_rows(self._online, self._config, view, data)

    async def _write(self, user_data: list, item_data: list) -> None:
        assert self._pool is not None
        await asyncio.get_running_loop().run_in_executor(self._pool, self._write_sync, user_data, item_data)

    async def _close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            def _shutdown():
                conn = getattr(self._online, "_conn", None)
                if conn is not None:
                    conn.close()
            await asyncio.get_running_loop().run_in_executor(pool, _shutdown)
            pool.shutdown(wait=True)
