"""Batched writes to Faust tables: the local store directly, the changelog in one produce per partition.

``table[key] = value`` makes Faust queue one changelog message per key and hand them to the Kafka
producer one by one (tens of µs each in Python). The features stage changes hundreds of keys per
batch, so it writes them here instead, with the same result on the broker:

* the values go into the table's local store (memory or RocksDB) in the partition's context, as a
  table write would;
* the changelog records - the key and the value bytes, exactly what Faust's own changelog holds -
  are appended to Kafka record batches and sent with the producer's batch API, one request per
  changelog partition;
* once the broker has acknowledged them, the store's persisted offset moves to the last record, as
  after Faust's own changelog writes (RocksDB recovery then reads only what came after).

Recovery is Faust's own: it reads these changelog records like any others. The returned awaitable
is what the batch's acknowledgement waits on (:mod:`driftrec.streams.batching`), so committed offsets imply
a durable changelog.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Iterator, Mapping, Protocol

if TYPE_CHECKING:  # pragma: no cover
    import faust


# --- Faust's current-event context -------------------------------------------------------------


@dataclass
class _Message:
    topic: str
    partition: int


class _PartitionEvent:
    """Stands in for a Faust event where stores only look at ``event.message.{topic,partition}``."""

    __slots__ = ("message", "__weakref__")

    def __init__(self, topic: str, partition: int) -> None:
        self.message = _Message(topic, partition)


@contextlib.contextmanager
def in_partition(topic: str, partition: int) -> Iterator[None]:
    """Table reads and writes inside go to ``partition`` (store and changelog), as for a record of it."""
    from faust.streams import _current_event

    ev = _PartitionEvent(topic, partition)
    token = _current_event.set(weakref.ref(ev))
    try:
        yield
    finally:
        _current_event.reset(token)


# --- the writer --------------------------------------------------------------------------------


class StateStore(Protocol):
    """Where a stage keeps keyed state bytes, by partition."""

    def get(self, key: bytes, partition: int) -> bytes | None: ...

    async def write(self, partition: int, values: Mapping[bytes, bytes]) -> Awaitable[None] | None:
        """Store ``values``, in call order; the returned awaitable (if any) is done when they are durable.

        The coroutine itself returns as soon as the writes are issued, so that writes of several
        batches can be in flight at once and still reach the store and the changelog in order.
        """


class TableWriter:
    """Writes many keys of one raw-bytes Faust table at once."""

    def __init__(self, app: "faust.App", table: "faust.Table") -> None:
        self.app = app
        self.table = table

    @property
    def topic(self) -> str:
        return self.table.changelog_topic_name

    def get(self, key: bytes, partition: int) -> bytes | None:
        with in_partition(self.topic, partition):
            return self.table.data.get(key)

    async def write(self, partition: int, values: Mapping[bytes, bytes]) -> "asyncio.Future[None] | None":
        """Store ``values`` locally and hand their changelog records to the producer (in call order);
        the returned future is done when the broker has acknowledged them."""
        if not values:
            return None
        self._store_locally(partition, values)
        producer = self.app.producer._ensure_producer()  # the app's aiokafka producer
        topic = self.topic
        sent = []  # (future, records in its batch)
        batch, count = producer.create_batch(), 0
        for key, value in values.items():
            if batch.append(key=key, value=value, timestamp=None) is None:
                sent.append((await producer.send_batch(batch, topic, partition=partition), count))
                batch, count = producer.create_batch(), 0
                if batch.append(key=key, value=value, timestamp=None) is None:
                    raise ValueError(f"a {len(value)}-byte value does not fit in a producer batch of {topic}")
            count += 1
        if count:
            sent.append((await producer.send_batch(batch, topic, partition=partition), count))
        return asyncio.ensure_future(self._acknowledged(partition, sent))

    def _store_locally(self, partition: int, values: Mapping[bytes, bytes]) -> None:
        data = self.table.data
        db_for = getattr(data, "_db_for_partition", None)
        if db_for is not None:
            # RocksDB: one write batch for the partition, as Faust's own changelog recovery writes it
            # (``Store.apply_changelog_batch``: no per-key index either - reads here always name the
            # partition), instead of a put per key.
            from faust.stores import rocksdb as faust_rocksdb

            batch = (faust_rocksdb.rocksdict.WriteBatch(raw_mode=True) if data.use_rocksdict
                     else faust_rocksdb.rocksdb.WriteBatch())
            for key, value in values.items():
                batch.put(key, value)
            db_for(partition).write(batch)
            return
        with in_partition(self.topic, partition):
            for key, value in values.items():
                data[key] = value

    async def _acknowledged(self, partition: int, sent: list) -> None:
        last = None
        for fut, n in sent:
            meta = await fut
            last = meta.offset + n - 1
        if last is not None:
            from faust.types import TP

            self.table.data.set_persisted_offset(TP(self.topic, partition), last)
