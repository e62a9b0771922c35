"""The feature-writer seam: how the streaming features stage gets rows into the online store.

:class:`FeatureWriter` takes one batch of *entity rows* (one row per user / item, already merged
over the batch; ``last_event_time`` is the row's event time) and writes them to the online store
as a unit. Backends (one module each, Feast's style): :mod:`feature_store.sqlite` (one writer
thread: Feast's SQLite store is not thread-safe) and :mod:`feature_store.redis` (Feast's async
Redis API on the caller's event loop).

Rows are converted to Feast protos here and handed to the online store's ``online_write_batch``
directly (no DataFrame, no registry lookup per call: ``FeatureStore.write_to_online_store`` and
``push`` cost milliseconds more per call). After a write returns, the rows are readable; that is
when freshness (now - event time, per entity row) is observed.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

from driftrec import metrics
from driftrec.settings import Settings
from feature_store.definitions import ITEM_FEATURES, ITEM_VIEW, USER_FEATURES, USER_VIEW

log = logging.getLogger(__name__)

Row = Mapping[str, Any]


@dataclass
class WriteResult:
    user_rows: int
    item_rows: int
    seconds: float
    newest_event_time: float | None


def _protos():
    """Feast's proto classes, imported on first use (``import feast`` is slow)."""
    global _EntityKey, _Value
    if _Value is None:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        _EntityKey, _Value = EntityKey, Value
    return _EntityKey, _Value


_EntityKey = _Value = None


class _Converter:
    """Rows (dicts) -> Feast online rows (entity key proto, {feature: Value proto}, ts, created)."""

    def __init__(self, join_key: str, features: dict[str, Any]) -> None:
        self.join_key = join_key
        self.features = [(name, _kind(dtype)) for name, dtype in features.items()]

    def __call__(self, rows: Sequence[Row], created: datetime) -> list[tuple]:
        EntityKey, Value = _protos()
        join_key = self.join_key
        strings = [n for n, k in self.features if k == "String"]
        ints = [n for n, k in self.features if k == "Int64"]
        doubles = [n for n, k in self.features if k == "Float64"]
        fromts = datetime.fromtimestamp
        utc = timezone.utc
        out: list[tuple] = []
        for row in rows:
            key = EntityKey(join_keys=[join_key], entity_values=[Value(string_val=str(row[join_key]))])
            values = {n: Value(string_val=str(row[n])) for n in strings}
            for n in ints:
                values[n] = Value(int64_val=int(row[n]))
            for n in doubles:
                values[n] = Value(double_val=float(row[n]))
            out.append((key, values, fromts(float(row["last_event_time"]), tz=utc), created))
        return out


class FeatureWriter(abc.ABC):
    """Writes batches of user and item feature rows to one online store."""

    store_name: str = ""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._user_conv = _Converter("user_id", USER_FEATURES)
        self._item_conv = _Converter("item_id", ITEM_FEATURES)
        self._fresh = metrics.FEATURE_FRESHNESS_SECONDS.labels(store=self.store_name)
        self._lag = metrics.FEATURE_NEWEST_EVENT_LAG_SECONDS.labels(store=self.store_name)
        self._rows_user = metrics.FEATURE_ROWS_WRITTEN.labels(store=self.store_name, feature_view=USER_VIEW)
        self._rows_item = metrics.FEATURE_ROWS_WRITTEN.labels(store=self.store_name, feature_view=ITEM_VIEW)
        self._write_seconds = metrics.FEATURE_WRITE_SECONDS.labels(store=self.store_name)
        self.newest_event_time: float | None = None
        self.started = False
        self._start_lock: asyncio.Lock | None = None

    # -- lifecycle
    async def start(self) -> None:
        """Open the store (apply the definitions) - idempotent."""
        if self.started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if not self.started:
                await self._start()
                self.started = True

    async def close(self) -> None:
        if self.started:
            await self._close()
            self.started = False

    async def __aenter__(self) -> "FeatureWriter":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- the seam
    async def write_batch(self, user_rows: Sequence[Row], item_rows: Sequence[Row]) -> WriteResult:
        """Write one batch (at most one row per entity); returns when the rows are readable."""
        if not (user_rows or item_rows):
            return WriteResult(0, 0, 0.0, None)
        await self.start()
        created = datetime.now(tz=timezone.utc)
        user_data = self._user_conv(user_rows, created) if user_rows else []
        item_data = self._item_conv(item_rows, created) if item_rows else []
        t0 = time.perf_counter()
        await self._write(user_data, item_data)
        elapsed = time.perf_counter() - t0
        now = time.time()
        newest = None
        for rows in (user_rows, item_rows):
            for row in rows:
                t = float(row["last_event_time"])
                self._fresh.observe(max(now - t, 0.0))
                if newest is None or t > newest:
                    newest = t
        if newest is not None and (self.newest_event_time is None or newest > self.newest_event_time):
            self.newest_event_time = newest
        if self.newest_event_time is not None:
            self._lag.set(max(now - self.newest_event_time, 0.0))
        self._write_seconds.observe(elapsed)
        self._rows_user.inc(len(user_rows))
        self._rows_item.inc(len(item_rows))
        return WriteResult(len(user_rows), len(item_rows), elapsed, newest)

    @abc.abstractmethod
    async def _start(self) -> None: ...

    @abc.abstractmethod
    async def _write(self, user_data: list[tuple], item_data: list[tuple]) -> None:
        """Write converted rows of both views; return once they are readable."""

    async def _close(self) -> None:  # pragma: no cover - default: nothing to release
        return None


def _kind(dtype: Any) -> str:
    """'String' | 'Int64' | 'Float64' for a Feast type object."""
    name = str(dtype)
    if "String" in name:
        return "String"
    if "Int" in name:
        return "Int64"
    return "Float64"


def create_writer(settings: Settings, store: str | None = None) -> FeatureWriter:
    """The writer for ``store`` (default ``settings.feast.online_store``)."""
    from feature_store.repo import backend_module

    return backend_module(store or settings.feast.online_store).Writer(settings)
