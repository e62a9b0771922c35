"""TableWriter in process: local store in the partition's context, changelog batches, durability.

Faust's table, its store and the aiokafka producer are replaced by small stand-ins that record what
the writer does; the broker's acknowledgements are futures the tests resolve themselves.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from faust.streams import current_event
from faust.types import TP

from driftrec.streams.changelog import TableWriter, in_partition

TOPIC = "driftrec-user-state-changelog"


def _partition_now():
    ev = current_event()
    return None if ev is None else (ev.message.topic, ev.message.partition)


class _Data(dict):
    """A memory store: remembers the partition context of every write and read."""

    def __init__(self):
        super().__init__()
        self.writes: list[tuple[bytes, bytes, tuple | None]] = []
        self.reads: list[tuple[bytes, tuple | None]] = []
        self.persisted: dict[TP, int] = {}

    def __setitem__(self, key, value):
        self.writes.append((key, value, _partition_now()))
        super().__setitem__(key, value)

    def get(self, key, default=None):
        self.reads.append((key, _partition_now()))
        return super().get(key, default)

    def set_persisted_offset(self, tp, offset):
        self.persisted[tp] = offset


class _Batch:
    def __init__(self, capacity):
        self.capacity = capacity
        self.records: list[tuple[bytes, bytes]] = []

    def append(self, *, key, value, timestamp):
        if len(self.records) >= self.capacity or len(value) > 100:
            return None  # full (or a value larger than any batch)
        self.records.append((key, value))
        return object()  # aiokafka returns the record's metadata


class _Producer:
    """aiokafka's batch API; every send's future is the broker's ack, resolved by the test."""

    def __init__(self, capacity=3, next_offset=100):
        self.capacity = capacity
        self.sent: list[tuple[str, int, list]] = []
        self.acks: list[asyncio.Future] = []
        self.next_offset = next_offset

    def create_batch(self):
        return _Batch(self.capacity)

    async def send_batch(self, batch, topic, *, partition):
        self.sent.append((topic, partition, list(batch.records)))
        fut = asyncio.get_running_loop().create_future()
        fut.base_offset = self.next_offset  # what the broker will assign
        self.next_offset += len(batch.records)
        self.acks.append(fut)
        return fut

    def ack(self, i):
        fut = self.acks[i]
        fut.set_result(SimpleNamespace(offset=fut.base_offset))

    def ack_all(self):
        for i, f in enumerate(self.acks):
            if not f.done():
                self.ack(i)


def _writer(capacity=3, data=None):
    producer = _Producer(capacity)
    app = SimpleNamespace(producer=SimpleNamespace(_ensure_producer=lambda: producer))
    table = SimpleNamespace(changelog_topic_name=TOPIC, data=data if data is not None else _Data())
    return TableWriter(app, table), producer, table.data


async def test_nothing_to_write_sends_nothing():
    w, producer, data = _writer()
    assert await w.write(2, {}) is None
    assert producer.sent == [] and data.writes == []


async def test_values_go_to_the_local_store_in_the_partitions_context():
    w, producer, data = _writer()
    values = {b"u1": b"a", b"u2": b"b"}
    durable = await w.write(5, values)
    assert data.writes == [(b"u1", b"a", (TOPIC, 5)), (b"u2", b"b", (TOPIC, 5))]
    assert _partition_now() is None  # the context does not leak out of the write
    producer.ack_all()
    await durable
    # Reads name their partition too.
    assert w.get(b"u2", 5) == b"b"
    assert w.get(b"nope", 7) is None
    assert data.reads == [(b"u2", (TOPIC, 5)), (b"nope", (TOPIC, 7))]


async def test_changelog_records_are_sent_in_order_in_full_batches_to_the_partition():
    w, producer, _ = _writer(capacity=3)
    values = {f"k{i}".encode(): f"v{i}".encode() for i in range(7)}
    durable = await w.write(1, values)
    assert [(t, p) for t, p, _ in producer.sent] == [(TOPIC, 1)] * 3
    assert [len(r) for _, _, r in producer.sent] == [3, 3, 1]
    flat = [rec for _, _, recs in producer.sent for rec in recs]
    assert flat == list(values.items())  # every record once, in call order
    producer.ack_all()
    await durable


async def test_durable_only_once_the_broker_acknowledged_every_batch():
    w, producer, data = _writer(capacity=2)
    durable = await w.write(3, {b"a": b"1", b"b": b"2", b"c": b"3", b"d": b"4", b"e": b"5"})
    assert len(producer.acks) == 3
    # The last batch acknowledged first: still not durable while an earlier one is outstanding.
    producer.ack(2)
    producer.ack(1)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not durable.done()
    assert data.persisted == {}
    producer.ack(0)
    await asyncio.wait_for(durable, 1)
    # The store's persisted offset is the changelog offset of the last record written (100..104).
    assert data.persisted == {TP(TOPIC, 3): 104}


async def test_a_failed_changelog_send_fails_the_write_and_moves_no_offset():
    w, producer, data = _writer(capacity=2)
    durable = await w.write(0, {b"a": b"1", b"b": b"2", b"c": b"3"})
    producer.ack(0)
    producer.acks[1].set_exception(RuntimeError("broker said no"))
    with pytest.raises(RuntimeError, match="broker said no"):
        await asyncio.wait_for(durable, 1)
    assert data.persisted == {}


async def test_a_value_larger_than_a_producer_batch_is_refused():
    w, producer, _ = _writer(capacity=10)
    with pytest.raises(ValueError, match="does not fit in a producer batch"):
        await w.write(0, {b"small": b"x", b"huge": b"y" * 500})


async def test_successive_writes_keep_their_order_on_the_changelog():
    w, producer, data = _writer(capacity=10)
    first = await w.write(4, {b"u": b"v1"})
    second = await w.write(4, {b"u": b"v2"})
    assert [recs for _, _, recs in producer.sent] == [[(b"u", b"v1")], [(b"u", b"v2")]]
    assert dict.__getitem__(data, b"u") == b"v2"
    producer.ack_all()
    await asyncio.gather(first, second)
    assert data.persisted == {TP(TOPIC, 4): 101}


async def test_rocksdb_store_is_written_as_one_batch_to_the_partitions_database(tmp_path):
    rocksdict = pytest.importorskip("rocksdict")

    class _RocksData:
        use_rocksdict = True

        def __init__(self):
            self.dbs = {}
            self.persisted = {}

        def _db_for_partition(self, partition):
            if partition not in self.dbs:
                self.dbs[partition] = rocksdict.Rdict(str(tmp_path / f"p{partition}"),
                                                      options=rocksdict.Options(raw_mode=True))
            return self.dbs[partition]

        def __setitem__(self, key, value):  # the per-key path must not be taken
            raise AssertionError("per-key write on a RocksDB store")

        def set_persisted_offset(self, tp, offset):
            self.persisted[tp] = offset

    data = _RocksData()
    w, producer, _ = _writer(capacity=10, data=data)
    durable = await w.write(2, {b"k1": b"v1", b"k2": b"v2"})
    try:
        assert set(data.dbs) == {2}
        assert data.dbs[2][b"k1"] == b"v1" and data.dbs[2][b"k2"] == b"v2"
        producer.ack_all()
        await durable
        assert data.persisted == {TP(TOPIC, 2): 101}
    finally:
        for db in data.dbs.values():
            db.close()


def test_in_partition_sets_and_restores_the_current_event():
    assert _partition_now() is None
    with in_partition("t", 1):
        assert _partition_now() == ("t", 1)
        with in_partition("t", 2):
            assert _partition_now() == ("t", 2)
        assert _partition_now() == ("t", 1)
    assert _partition_now() is None
