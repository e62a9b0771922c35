"""The feature-writer seam: how the streaming features stage gets rows into the online store.

:class:`FeatureWriter` takes one batch of *entity rows* (one row per user / item, already merged
over the batch; ``last_event_time`` is the row's event time) and writes them to the online store
as a unit. Backends (one module each, Feast's style) provide a blocking row store, ``Rows``:
:mod:`feature_store.sqlite` and :mod:`feature_store.redis`; :func:`create_writer` runs it in the
worker's writer process (:mod:`feature_store.process`, which says why a process).

Both backends write exactly what Feast's own ``online_write_batch`` writes - same tables or keys,
same entity-key serialization, same value bytes - without building Feast's protobuf objects row by
row: the features stage writes every touched entity on every batch, and at tens of thousands of
events per second Python-side proto building was the largest cost of a write. :class:`RowCodec`
encodes a row's values straight to their protobuf wire bytes (``Value`` has one field per type:
string = field 2, int64 = field 4, double = field 5), and ``tests/test_features_store.py`` checks
every encoding against Feast's protos and every write against ``FeatureStore.get_online_features``.
Configurations the fast paths do not cover go through Feast's own method (:meth:`RowCodec.protos`).

After a write returns, the rows are readable; that is when freshness (now - event time, per
entity row) is observed.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import struct
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Sequence

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


# --- protobuf wire encoding of Feast values ------------------------------------------------------

_pack_double = struct.Struct("<d").pack


def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64: two's complement, ten bytes
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_string(v: Any) -> bytes:
    """``Value(string_val=v).SerializeToString()``."""
    b = str(v).encode()
    n = len(b)
    return (b"\x12" + bytes((n,)) if n < 0x80 else b"\x12" + varint(n)) + b


def encode_int64(v: Any) -> bytes:
    """``Value(int64_val=v).SerializeToString()``."""
    n = int(v)
    return b" " + (bytes((n,)) if 0 <= n < 0x80 else varint(n))


def encode_double(v: Any) -> bytes:
    """``Value(double_val=v).SerializeToString()``."""
    return b")" + _pack_double(float(v))


_ENCODERS: dict[str, Callable[[Any], bytes]] = {"String": encode_string, "Int64": encode_int64, "Float64": encode_double}
# value_text as Feast's SQL stores derive it (helpers.extract_text_and_num): the string, or str(number)
_TEXTS: dict[str, Callable[[Any], str]] = {"String": str, "Int64": lambda v: str(int(v)), "Float64": lambda v: str(float(v))}


def _kind(dtype: Any) -> str:
    """'String' | 'Int64' | 'Float64' for a Feast type object."""
    name = str(dtype)
    if "String" in name:
        return "String"
    if "Int" in name:
        return "Int64"
    return "Float64"


class RowCodec:
    """One feature view's rows: entity ids, feature kinds, and their encodings."""

    def __init__(self, view: str, join_key: str, features: dict[str, Any]) -> None:
        self.view = view
        self.join_key = join_key
        self.features = [(name, _kind(dtype)) for name, dtype in features.items()]
        self.encoders = [(name, _ENCODERS[kind]) for name, kind in self.features]
        self.texts = [(name, _ENCODERS[kind], _TEXTS[kind]) for name, kind in self.features]
        self._keys: dict[tuple[str, int], bytes] = {}

    def entity_key(self, entity_id: str, version: int) -> bytes:
        """Feast's serialized entity key for this view's entity (cached: rows repeat entities)."""
        cache = self._keys
        got = cache.get((entity_id, version))
        if got is None:
            from feast.infra.key_encoding_utils import serialize_entity_key

            if len(cache) > 500_000:
                cache.clear()
            got = cache[(entity_id, version)] = serialize_entity_key(self.entity_key_proto(entity_id),
                                                                     entity_key_serialization_version=version)
        return got

    def entity_key_proto(self, entity_id: str):
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        return EntityKey(join_keys=[self.join_key], entity_values=[Value(string_val=str(entity_id))])

    def protos(self, rows: Sequence[Row], created: datetime) -> list[tuple]:
        """Feast's own row form ``(entity key, {feature: Value}, event ts, created ts)`` (slow path)."""
        from feast.protos.feast.types.Value_pb2 import Value

        out = []
        for row in rows:
            values = {}
            for name, kind in self.features:
                v = row[name]
                values[name] = (Value(string_val=str(v)) if kind == "String" else
                                Value(int64_val=int(v)) if kind == "Int64" else Value(double_val=float(v)))
            out.append((self.entity_key_proto(row[self.join_key]), values, event_datetime(row), created))
        return out


def event_datetime(row: Row) -> datetime:
    """A row's event timestamp (its entity's newest event)."""
    return datetime.fromtimestamp(float(row["last_event_time"]), tz=timezone.utc)


USER_CODEC = RowCodec(USER_VIEW, "user_id", USER_FEATURES)
ITEM_CODEC = RowCodec(ITEM_VIEW, "item_id", ITEM_FEATURES)


# --- the seam --------------------------------------------------------------------------------------


class FeatureWriter(abc.ABC):
    """Writes batches of user and item feature rows to one online store."""

    store_name: str = ""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.codecs = (USER_CODEC, ITEM_CODEC)
        self._fresh = (metrics.FEATURE_FRESHNESS_SECONDS.labels(store=self.store_name, feature_view=USER_VIEW),
                       metrics.FEATURE_FRESHNESS_SECONDS.labels(store=self.store_name, feature_view=ITEM_VIEW))
        self._lag = metrics.FEATURE_NEWEST_EVENT_LAG_SECONDS.labels(store=self.store_name)
        self._rows_user = metrics.FEATURE_ROWS_WRITTEN.labels(store=self.store_name, feature_view=USER_VIEW)
        self._rows_item = metrics.FEATURE_ROWS_WRITTEN.labels(store=self.store_name, feature_view=ITEM_VIEW)
        self._write_seconds = metrics.FEATURE_WRITE_SECONDS.labels(store=self.store_name)
        self.newest_event_time: float | None = None
        self.started = False
        self._start_lock: asyncio.Lock | None = None
        self._write_lock: asyncio.Lock | None = None

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
        """Write one batch (at most one row per entity); returns when the rows are readable.

        Batches are written one at a time, in the order they were submitted.
        """
        if not (user_rows or item_rows):
            return WriteResult(0, 0, 0.0, None)
        await self.start()
        if self._write_lock is None:
            self._write_lock = asyncio.Lock()
        async with self._write_lock:
            t0 = time.perf_counter()
            await self._write(user_rows, item_rows)
            elapsed = time.perf_counter() - t0
        now = time.time()
        newest = None
        for rows, fresh in zip((user_rows, item_rows), self._fresh):
            observe = fresh.observe
            for row in rows:
                t = float(row["last_event_time"])
                observe(max(now - t, 0.0))
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
    async def _write(self, user_rows: Sequence[Row], item_rows: Sequence[Row]) -> None:
        """Write the rows of both views; return once they are readable."""

    async def _close(self) -> None:  # pragma: no cover - default: nothing to release
        return None


def create_writer(settings: Settings, store: str | None = None) -> FeatureWriter:
    """The writer for ``store`` (default ``settings.feast.online_store``): the backend's row store,
    run by a writer process (:mod:`feature_store.process`)."""
    from feature_store.process import ProcessWriter

    return ProcessWriter(settings, store)
