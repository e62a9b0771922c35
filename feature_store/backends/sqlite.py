"""SQLite online store: config and writer.

Feast's SQLite online store is not thread-safe through a shared store object (errors and lost
writes with several threads), so every write goes through ONE writer: :class:`Rows`, run by the
worker's writer process (:mod:`driftrec.feature_store.process` says why a process and not a thread).
Readers (other threads, other processes) open their own connections.

Feast's ``online_write_batch`` issues one ``execute`` per (entity, feature) from a Python loop;
:func:`upsert_statement` and :func:`upsert_params` give the *same* upsert (same table, columns,
entity-key serialization, value bytes and stored timestamps) for ``executemany``, which is several
times cheaper per row. Configurations that need more columns (vector search, the
OpenAI-compatible store) go through Feast's own method. Tests compare what both paths write with
``FeatureStore.get_online_features``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from driftrec.core.settings import Settings
from driftrec.feature_store.backends.base import Backend, OnlineStoreConfig, RowStore
from driftrec.feature_store.codec import Row, RowCodec, event_datetime

STORE = "sqlite"


def db_path(settings: Settings) -> Path:
    f = settings.feast
    return Path(f.sqlite_path).resolve() if f.sqlite_path else Path(f.repo_dir).resolve() / "online.db"


@dataclass(frozen=True)
class SqliteConfig(OnlineStoreConfig):
    path: Path

    def __post_init__(self) -> None:
        if not self.path.is_absolute():
            raise ValueError(f"the SQLite online store path must be absolute, not {self.path}")

    def as_feast(self) -> dict:
        return {"type": "sqlite", "path": str(self.path)}


def online_store():
    from feast.infra.online_stores.sqlite import SqliteOnlineStore

    return SqliteOnlineStore()


def _fast_path_ok(config) -> bool:
    oc = config.online_store
    return not getattr(oc, "vector_enabled", False) and not getattr(oc, "enable_openai_compatible_store", False)


def upsert_statement(config, view) -> str:
    """The upsert Feast's SQLite store runs for ``view`` (same table and columns), conditional on event time.

    A stored row whose event time is newer than the new one's is kept: after a rebalance the previous
    owner of an entity's partition may still write a row it computed before, and a killed writer
    process's write can land after its retry. ``event_ts`` holds Feast's epoch seconds (an INTEGER:
    :func:`feast_epoch`), so rows within the same second tie - and a tie writes (a late event changes
    a row without moving its event time).
    """
    from feast.infra.online_stores.sqlite import _quote_id, _table_id

    table = _quote_id(_table_id(config.project, view, config.registry.enable_online_feature_view_versioning))
    return (
        f"INSERT INTO {table} (entity_key, feature_name, value, value_text, event_ts, created_ts) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(entity_key, feature_name) DO UPDATE SET "
        "value = excluded.value, value_text = excluded.value_text, event_ts = excluded.event_ts, "
        f"created_ts = excluded.created_ts WHERE excluded.event_ts >= {table}.event_ts OR {table}.event_ts IS NULL;"
    )


def feast_epoch(ts: datetime) -> int:
    """What Feast's SQLite datetime adapter stores for an aware timestamp (int epoch of the naive UTC time)."""
    from feast.infra.online_stores.sqlite import adapt_datetime_epoch

    return adapt_datetime_epoch(ts.astimezone(timezone.utc).replace(tzinfo=None))


def upsert_params(codec: RowCodec, rows: Sequence[Row], version: int, created_epoch: int) -> list[tuple]:
    """Rows -> upsert parameters, one per (entity, feature), as Feast's ``online_write_batch`` would bind them."""
    params = []
    add = params.append
    key_of, join_key, texts = codec.entity_key, codec.join_key, codec.texts
    for row in rows:
        key_bin = key_of(row[join_key], version)
        ts = feast_epoch(event_datetime(row))
        for name, encode, text in texts:
            v = row[name]
            add((key_bin, name, encode(v), text(v), ts, created_epoch))
    return params


class Rows(RowStore):
    """The SQLite backend's row store: one connection, one transaction per batch (blocking).

    Run by the writer process (:mod:`driftrec.feature_store.process`), which is the single writer Feast's
    SQLite store needs. Readers (other processes) open their own connections; with WAL they never
    block the writer nor see half a batch.
    """

    def __init__(self, fs) -> None:
        super().__init__(fs)
        self.online = online_store()
        conn = self.online._get_conn(self.config)
        # WAL: readers (the scorer, other processes) never block the writer or see a torn batch;
        # synchronous=NORMAL: no fsync per batch (durability comes from the changelogged state -
        # rows are re-derivable from it; a power loss can lose the newest rows, not corrupt the file).
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        self.statements = [upsert_statement(self.config, v) for v in self.views]

    def write(self, user_rows: Sequence[Row], item_rows: Sequence[Row]) -> None:
        config, online = self.config, self.online
        work = [(n, rows) for n, rows in enumerate((user_rows, item_rows)) if rows]
        if not _fast_path_ok(config):
            created = datetime.now(tz=timezone.utc)
            for n, rows in work:
                online.online_write_batch(config, self.views[n], self.codecs[n].protos(rows, created), None)
            return
        conn = online._get_conn(config)
        version = config.entity_key_serialization_version
        created = feast_epoch(datetime.now(tz=timezone.utc))
        try:
            for n, rows in work:
                conn.executemany(self.statements[n], upsert_params(self.codecs[n], rows, version, created))
            conn.commit()  # both views in one transaction: readers see the whole batch or none of it
        except BaseException:
            conn.rollback()
            raise

    def close(self) -> None:
        conn = getattr(self.online, "_conn", None)
        if conn is not None:
            conn.close()
            self.online._conn = None


class SqliteBackend(Backend):
    name = STORE
    rows_class = Rows

    def config(self, settings: Settings) -> SqliteConfig:
        return SqliteConfig(db_path(settings))

    def online_store(self):
        return online_store()


BACKEND = SqliteBackend()
