"""Batch delivery and acknowledgement in process (no broker).

* ``batch_agent`` is registered on a stand-in app that captures the agent, the acker task and the
  revoke handler Faust would run; the tests drive them with batches whose outputs are futures they
  resolve themselves, and watch what reaches ``consumer.ack``.
* ``BatchingConsumer._drain_messages`` runs on a stand-in for Faust's consumer that serves canned
  fetches, to check how records are routed: one batch per fetch and route, offset order, the
  per-message path for other topics, records already read skipped, a rebalance dropping the fetch.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from types import SimpleNamespace

import pytest
from faust.types import TP

from driftrec.streams.batching import BatchingConsumer, BatchRoute, MessageBatch, Retry, _durable, batch_agent


# --- stand-ins ---------------------------------------------------------------------------------


class _Channel:
    def __init__(self, maxsize=None):
        self.maxsize = maxsize
        self.subscriber_count = 0
        self.put_values: list = []

    async def put(self, value):
        self.put_values.append(value)


class _Signal:
    def __init__(self):
        self.receivers = []

    def connect(self, fn):
        self.receivers.append(fn)


class _Consumer:
    def __init__(self):
        self.acked: list = []

    def ack(self, message):
        self.acked.append(message)


class _Topics:
    def __init__(self):
        self.added = []

    def add(self, t):
        self.added.append(t)


class _App:
    """What ``batch_agent`` and the acker use of a Faust app."""

    def __init__(self):
        self.consumer = _Consumer()
        self.consumer_generation_id = 1
        self.topics = _Topics()
        self.tasks: list = []
        self.agents: dict = {}
        self.on_partitions_revoked = _Signal()
        self.conf = SimpleNamespace(broker_session_timeout=0.2)  # revoke waits max(0.1, 1.0) = 1 s

    def channel(self, maxsize=None):
        return _Channel(maxsize)

    def task(self, fn):
        self.tasks.append(fn)
        return fn

    def agent(self, channel, name):
        def register(fn):
            self.agents[name] = (channel, fn)
            return fn

        return register


class _Msg:
    def __init__(self, offset, generation_id=1, topic="driftrec.clicks", partition=0):
        self.offset = offset
        self.generation_id = generation_id
        self.topic = topic
        self.partition = partition

    def __repr__(self):
        return f"<msg {self.topic}:{self.partition}@{self.offset} g{self.generation_id}>"


class _Stream:
    """An agent's stream: yields what the test puts in, ends on ``None``."""

    def __init__(self):
        self.q: asyncio.Queue = asyncio.Queue()

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.q.get()
        if item is None:
            raise StopAsyncIteration
        return item


class _Harness:
    """One registered batch agent, its acker running and its agent consuming ``stream``."""

    def __init__(self, handler, max_in_flight=64, name="test.batches", crash=None, **stream):
        self.app = _App()
        if crash is not None:
            self.app.crash_soon = crash
        if stream:
            self.app.settings = SimpleNamespace(stream=SimpleNamespace(
                output_retries=stream.get("retries", 5), output_retry_backoff_s=stream.get("backoff_s", 0.5),
                output_timeout_s=stream.get("timeout_s", 300.0)))
        self.topic = SimpleNamespace(topics=["driftrec.clicks", "driftrec.ratings"])
        self.route = batch_agent(self.app, [self.topic], name=name, handler=handler, max_in_flight=max_in_flight)
        self.stream = _Stream()
        _, agent_fn = self.app.agents[name]
        (acker_fn,) = self.app.tasks
        self.acker_task = asyncio.ensure_future(acker_fn())
        self.agent_task = asyncio.ensure_future(agent_fn(self.stream))

    @property
    def acked(self):
        return self.app.consumer.acked

    async def close(self):
        for t in (self.agent_task, self.acker_task):
            t.cancel()
        await asyncio.gather(self.agent_task, self.acker_task, return_exceptions=True)


async def _settle(n=10):
    for _ in range(n):
        await asyncio.sleep(0)


async def _until(cond, timeout=2.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


def _batch(*offsets, generation=1):
    return MessageBatch([_Msg(o, generation) for o in offsets])


# --- registration ------------------------------------------------------------------------------


async def test_batch_agent_routes_its_topics_and_registers_agent_acker_and_revoke_handler():
    async def handler(batch):
        return []

    app = _App()
    topic = SimpleNamespace(topics=["a", "b"])
    route = batch_agent(app, [topic], name="x.y", handler=handler)
    assert isinstance(route, BatchRoute)
    assert app.batch_routes == {"a": route, "b": route}
    assert route.topics == frozenset({"a", "b"})
    assert app.topics.added == [topic]
    assert app.agents["x.y"][0] is route.channel
    assert [t.__name__ for t in app.tasks] == ["ack_x_y"]
    assert len(app.on_partitions_revoked.receivers) == 1
    # A topic can feed one batch agent only.
    with pytest.raises(ValueError, match="routed to 'x.y' already"):
        batch_agent(app, [SimpleNamespace(topics=["b"])], name="other", handler=handler)


# --- acknowledgement ---------------------------------------------------------------------------


async def test_a_batch_is_acknowledged_only_once_its_outputs_are_durable():
    outputs: list[list[asyncio.Future]] = []

    async def handler(batch):
        futs = [asyncio.get_running_loop().create_future() for _ in range(2)]
        outputs.append(futs)
        return futs

    h = _Harness(handler)
    try:
        b = _batch(0, 1, 2)
        await h.stream.q.put(b)
        await _until(lambda: len(outputs) == 1)
        await _settle()
        assert h.acked == []
        outputs[0][0].set_result(None)
        await _settle()
        assert h.acked == []  # one output still in flight
        outputs[0][1].set_result(None)
        await _until(lambda: len(h.acked) == 3)
        assert h.acked == b.messages  # every message, in offset order
    finally:
        await h.close()


async def test_batches_are_acknowledged_in_batch_order_even_when_later_ones_finish_first():
    outputs: list[asyncio.Future] = []

    async def handler(batch):
        fut = asyncio.get_running_loop().create_future()
        outputs.append(fut)
        return [fut]

    h = _Harness(handler)
    try:
        batches = [_batch(0, 1), _batch(2, 3), _batch(4)]
        for b in batches:
            await h.stream.q.put(b)
        await _until(lambda: len(outputs) == 3)  # the agent went on processing without waiting
        outputs[2].set_result(None)
        outputs[1].set_result(None)
        await _settle()
        assert h.acked == []  # batch 0 is not durable yet, so nothing after it may be acked
        outputs[0].set_result(None)
        await _until(lambda: len(h.acked) == 5)
        assert [m.offset for m in h.acked] == [0, 1, 2, 3, 4]
    finally:
        await h.close()


async def test_a_batch_without_outputs_is_acknowledged_right_away():
    async def handler(batch):
        return None

    h = _Harness(handler)
    try:
        b = _batch(7, 8)
        await h.stream.q.put(b)
        await _until(lambda: len(h.acked) == 2)
        assert h.acked == b.messages
    finally:
        await h.close()


async def test_a_batch_whose_outputs_failed_is_never_acknowledged_and_stops_the_worker(caplog):
    """A failed output must not stall commits silently: neither it nor any later batch is acknowledged
    (a commit past it would lose it), and the app is told to crash (a supervisor restarts the worker)."""
    outputs: list[asyncio.Future] = []

    async def handler(batch):
        fut = asyncio.get_running_loop().create_future()
        outputs.append(fut)
        return [fut]

    crashed: list[BaseException] = []
    h = _Harness(handler, name="test.fail", crash=crashed.append)
    try:
        await h.stream.q.put(_batch(0, 1))
        await h.stream.q.put(_batch(2))
        await _until(lambda: len(outputs) == 2)
        with caplog.at_level(logging.ERROR, logger="driftrec.streams.batching"):
            outputs[0].set_exception(OSError("store down"))
            outputs[1].set_result(None)
            await _until(lambda: len(crashed) == 1)
            await _settle(50)
        assert h.acked == []
        assert "store down" in repr(crashed[0])
        assert "test.fail: a batch's outputs failed" in caplog.text
    finally:
        await h.close()


async def test_a_retryable_output_is_reissued_with_backoff_then_the_batch_is_acknowledged():
    attempts = []

    async def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise OSError("broker said no")

    async def handler(batch):
        return [Retry(flaky, "a dead letter")]

    crashed: list[BaseException] = []
    h = _Harness(handler, name="test.retry", crash=crashed.append, retries=3, backoff_s=0.01)
    try:
        await h.stream.q.put(_batch(0))
        await _until(lambda: len(h.acked) == 1)
        assert len(attempts) == 3 and not crashed
    finally:
        await h.close()


async def test_a_retryable_output_that_keeps_failing_stops_the_worker():
    async def broken():
        raise OSError("broker said no")

    async def handler(batch):
        return [Retry(broken)]

    crashed: list[BaseException] = []
    h = _Harness(handler, name="test.giveup", crash=crashed.append, retries=2, backoff_s=0.01)
    try:
        await h.stream.q.put(_batch(0))
        await _until(lambda: len(crashed) == 1)
        assert h.acked == [] and "broker said no" in repr(crashed[0])
    finally:
        await h.close()


async def test_an_output_stuck_past_the_timeout_stops_the_worker():
    async def handler(batch):
        return [asyncio.get_running_loop().create_future()]  # never done

    crashed: list[BaseException] = []
    h = _Harness(handler, name="test.stuck", crash=crashed.append, timeout_s=0.1)
    try:
        await h.stream.q.put(_batch(0))
        await _until(lambda: len(crashed) == 1)
        assert h.acked == [] and "not durable in time" in repr(crashed[0])
    finally:
        await h.close()


async def test_messages_fetched_before_a_rebalance_are_not_acknowledged():
    outputs: list[asyncio.Future] = []

    async def handler(batch):
        fut = asyncio.get_running_loop().create_future()
        outputs.append(fut)
        return [fut]

    h = _Harness(handler)
    try:
        stale = MessageBatch([_Msg(0, 1), _Msg(1, 1)])
        await h.stream.q.put(stale)
        await _until(lambda: len(outputs) == 1)
        h.app.consumer_generation_id = 2  # a rebalance happened while the outputs were written
        fresh = MessageBatch([_Msg(5, 2)])
        await h.stream.q.put(fresh)
        await _until(lambda: len(outputs) == 2)
        outputs[0].set_result(None)
        outputs[1].set_result(None)
        await _until(lambda: len(h.acked) == 1)
        await _settle()
        assert h.acked == fresh.messages
    finally:
        await h.close()


async def test_a_batch_fetched_before_a_rebalance_is_dropped_unprocessed():
    """A batch that reaches the agent after a rebalance began (it was being put on the channel meanwhile)
    is not handed to the handler: its partition may be another worker's now, which reads it again from
    the committed offsets. Faust's streams drop a message of an older generation the same way."""
    from driftrec.core import metrics

    seen: list = []

    async def handler(batch):
        seen.append(batch)
        return []

    h = _Harness(handler, name="test.stale")
    dropped = metrics.STALE_BATCHES.labels(agent="test.stale")
    before = dropped._value.get()
    try:
        h.app.consumer_generation_id = 2
        stale = _batch(0, 1, generation=1)
        fresh = _batch(5, 6, generation=2)
        await h.stream.q.put(stale)
        await h.stream.q.put(fresh)
        await _until(lambda: len(h.acked) == 2)
        assert seen == [fresh]
        assert h.acked == fresh.messages
        h.app.flow_control = SimpleNamespace(is_active=lambda: False)  # a rebalance under way: flow suspended
        await h.stream.q.put(_batch(7, generation=2))
        await _until(lambda: dropped._value.get() == before + 2)
        assert seen == [fresh] and h.acked == fresh.messages
    finally:
        await h.close()


async def test_at_most_max_in_flight_batches_wait_for_their_outputs():
    outputs: list[asyncio.Future] = []
    handled = []

    async def handler(batch):
        handled.append(batch)
        fut = asyncio.get_running_loop().create_future()
        outputs.append(fut)
        return [fut]

    h = _Harness(handler, max_in_flight=2)
    try:
        for i in range(4):
            await h.stream.q.put(_batch(i))
        await _until(lambda: len(handled) == 3)
        await _settle(20)
        # Two batches in flight; the third was handled but its submit waits for a slot, so the
        # agent does not take the fourth.
        assert len(handled) == 3
        assert h.stream.q.qsize() == 1
        outputs[0].set_result(None)
        await _until(lambda: len(handled) == 4)
        for f in outputs[1:]:
            f.set_result(None)
        await _until(lambda: len(h.acked) == 4)
        assert [m.offset for m in h.acked] == [0, 1, 2, 3]
    finally:
        await h.close()


async def test_revoke_waits_for_batches_already_taken_to_become_durable():
    outputs: list[asyncio.Future] = []

    async def handler(batch):
        fut = asyncio.get_running_loop().create_future()
        outputs.append(fut)
        return [fut]

    h = _Harness(handler)
    (on_revoked,) = h.app.on_partitions_revoked.receivers
    try:
        await h.stream.q.put(_batch(0))
        await _until(lambda: len(outputs) == 1)
        revoking = asyncio.ensure_future(on_revoked(set()))
        await _settle()
        assert not revoking.done()  # the partitions may not move on yet
        outputs[0].set_result(None)
        await asyncio.wait_for(revoking, 1)
        assert [m.offset for m in h.acked] == [0]
        # Idle: a revoke returns at once.
        await asyncio.wait_for(on_revoked(set()), 0.5)
    finally:
        await h.close()


async def test_revoke_gives_up_after_the_timeout_with_a_warning(caplog):
    async def handler(batch):
        return [asyncio.get_running_loop().create_future()]  # never durable

    h = _Harness(handler, name="test.stuck")
    (on_revoked,) = h.app.on_partitions_revoked.receivers
    try:
        await h.stream.q.put(_batch(0))
        await _settle()
        assert not await h.route.acker.wait_idle(0.01)
        with caplog.at_level(logging.WARNING, logger="driftrec.streams.batching"):
            await asyncio.wait_for(on_revoked(set()), 3)  # timeout max(0.2 * 0.5, 1.0) = 1 s
        assert "test.stuck: batches still not durable" in caplog.text
        assert h.acked == []
    finally:
        await h.close()


async def test_durable_reports_failure_when_any_output_failed():
    loop = asyncio.get_running_loop()
    ok1, ok2 = loop.create_future(), loop.create_future()
    ok1.set_result(1)
    ok2.set_result(2)
    assert await _durable([ok1, ok2], "n") is None
    bad = loop.create_future()
    bad.set_exception(ValueError("x"))
    ok3 = loop.create_future()
    ok3.set_result(3)
    assert isinstance(await _durable([ok3, bad], "n"), ValueError)
    stuck = loop.create_future()
    assert isinstance(await _durable([stuck], "n", timeout=0.05), TimeoutError)


async def test_route_delivery_waits_for_a_subscriber():
    app = _App()
    route = BatchRoute(app, "r", ["t"], maxsize=3)
    assert route.channel.maxsize == 3
    b = _batch(0)
    delivering = asyncio.ensure_future(route.deliver(b))
    await asyncio.sleep(0.03)
    assert not delivering.done() and route.channel.put_values == []  # not dropped, waiting
    route.channel.subscriber_count = 1
    await asyncio.wait_for(delivering, 1)
    assert route.channel.put_values == [b]


# --- the consumer's drain loop -----------------------------------------------------------------


class _Event:
    def __init__(self):
        self.flag = False

    def is_set(self):
        return self.flag

    def set(self):
        self.flag = True

    async def wait(self):
        await asyncio.Event().wait()  # flow never suspended here


class _FakeConsumer:
    """What ``BatchingConsumer._drain_messages`` uses of Faust's aiokafka consumer."""

    consumer_stopped_errors = (RuntimeError,)

    def __init__(self, app, fetches, *, on_fetch=None):
        self.app = app
        self._fetches = list(fetches)
        self._on_fetch = on_fetch
        self._stopped = _Event()
        self._read_offset: defaultdict[TP, int | None] = defaultdict(lambda: None)  # as Faust's
        self._buffered_partitions: set = set()
        self.flow_active = True
        self.should_stop = False
        self.suspend_flow = _Event()
        self.callbacked: list = []
        self.gaps: list = []
        self.diag = SimpleNamespace(set_flag=lambda f: None, unset_flag=lambda f: None)
        self.transport = SimpleNamespace(app=app)
        self.log = logging.getLogger("test.consumer")

    async def callback(self, message):
        self.callbacked.append(message)

    async def _wait_next_records(self, timeout):
        if not self._fetches:
            self._stopped.set()
            return {}, None
        records = self._fetches.pop(0)
        if self._on_fetch is not None:
            self._on_fetch(self)
        return records, None

    async def sleep(self, s):
        await asyncio.sleep(s)

    _driftrec_seeks = 0  # BatchingConsumer's count of seeks begun (the test bumps it to simulate one)
    seeks = 0

    async def perform_seek(self):
        self.seeks += 1

    def _is_changelog_tp(self, tp):
        return tp.topic.endswith("-changelog")

    def _to_message(self, tp, rec):
        return _Msg(rec.offset, self.app.consumer_generation_id, tp.topic, tp.partition)

    def highwater(self, tp):
        return 1000

    async def _add_gap(self, tp, start, end):
        self.gaps.append((tp, start, end))

    async def wait_first(self, *coros):
        first, *rest = coros
        for c in rest:
            c.close()
        await first


def _drain_app(routed=("driftrec.clicks", "driftrec.ratings")):
    app = _App()
    app.should_stop = False
    app.monitor = SimpleNamespace(track_tp_end_offset=lambda tp, off: None)
    app.topics.acks_enabled_for = lambda topic: True
    route = BatchRoute(app, "r", routed)
    route.channel.subscriber_count = 1
    app.batch_routes = {t: route for t in routed}
    return app, route


def _recs(*offsets):
    return [SimpleNamespace(offset=o) for o in offsets]


async def _drain(consumer):
    fetcher = SimpleNamespace(_stopped=_Event())
    await asyncio.wait_for(BatchingConsumer._drain_messages(consumer, fetcher), 5)


async def test_drain_delivers_one_batch_per_fetch_in_offset_order_and_other_topics_one_by_one():
    app, route = _drain_app()
    clicks0, clicks1, ratings0 = TP("driftrec.clicks", 0), TP("driftrec.clicks", 1), TP("driftrec.ratings", 0)
    other = TP("driftrec.items", 0)
    fetches = [
        {clicks0: _recs(0, 1, 2), ratings0: _recs(0), other: _recs(10, 11), clicks1: _recs(5)},
        {clicks0: _recs(3)},
    ]
    c = _FakeConsumer(app, fetches)
    await _drain(c)
    batches = route.channel.put_values
    assert [type(b) for b in batches] == [MessageBatch, MessageBatch]  # one per fetch, all partitions
    assert [(m.topic, m.partition, m.offset) for m in batches[0].messages] == [
        ("driftrec.clicks", 0, 0), ("driftrec.clicks", 0, 1), ("driftrec.clicks", 0, 2),
        ("driftrec.ratings", 0, 0), ("driftrec.clicks", 1, 5),
    ]
    assert [(m.topic, m.offset) for m in batches[1].messages] == [("driftrec.clicks", 3)]
    # The unrouted topic took Faust's per-message path.
    assert [(m.topic, m.offset) for m in c.callbacked] == [("driftrec.items", 10), ("driftrec.items", 11)]
    assert c._read_offset[clicks0] == 3 and c._read_offset[other] == 11


async def test_drain_skips_records_already_read_and_reports_gaps():
    app, route = _drain_app()
    tp = TP("driftrec.clicks", 0)
    c = _FakeConsumer(app, [{tp: _recs(3, 4, 5, 9)}])
    c._read_offset[tp] = 4
    await _drain(c)
    (batch,) = route.channel.put_values
    assert [m.offset for m in batch.messages] == [4, 5, 9]  # 3 was read before
    assert c.gaps == [(tp, 6, 9)]
    assert c._read_offset[tp] == 9


async def test_drain_delivers_nothing_of_a_fetch_during_which_a_rebalance_began():
    app, route = _drain_app()
    tp0, tp1 = TP("driftrec.clicks", 0), TP("driftrec.clicks", 1)

    def rebalance_after_first_partition(consumer):
        orig = app.monitor.track_tp_end_offset

        def track(tp, off):
            orig(tp, off)
            app.consumer_generation_id = 2  # bumped while the fetch is being split

        app.monitor.track_tp_end_offset = track

    c = _FakeConsumer(app, [{tp0: _recs(0, 1), tp1: _recs(0)}], on_fetch=rebalance_after_first_partition)
    await _drain(c)
    assert route.channel.put_values == []


async def test_input_records_of_a_fetch_that_was_out_during_a_seek_are_dropped_and_the_partitions_sought_again():
    """The Kafka client fetches on its own thread: a fetch out while the rebalance's recovery seeks the
    partitions to their committed offsets can return input records from the positions before that
    seek. Taking them would move the read offset past records fetched again next and then skipped as
    already read (never processed, never acknowledged). The drain loop drops those records and seeks
    again; changelog records of the same fetch (a recovery or a standby reading) are delivered as usual -
    dropping them would leave the recovery waiting for records it never gets."""
    app, route = _drain_app()
    tp, changelog = TP("driftrec.clicks", 0), TP("driftrec-features-items-changelog", 2)

    def sought_during_fetch(consumer):
        if consumer._fetches:  # the first fetch: the end of a rebalance sought while it was out
            consumer._driftrec_seeks += 1
            consumer._read_offset[tp] = 99  # the seek: committed offset 100 (Faust's convention)

    c = _FakeConsumer(app, [{tp: _recs(250, 251), changelog: _recs(7, 8)}, {tp: _recs(100, 101)}],
                      on_fetch=sought_during_fetch)
    await _drain(c)
    assert c.seeks == 1
    (batch,) = route.channel.put_values
    assert [m.offset for m in batch.messages] == [100, 101]  # the records after the committed offset, not skipped
    assert [(m.topic, m.offset) for m in c.callbacked] == [(changelog.topic, 7), (changelog.topic, 8)]
    assert c.gaps == []


async def test_a_fetch_with_no_seek_meanwhile_is_taken_whole_and_seeks_nothing():
    app, route = _drain_app()
    tp = TP("driftrec.clicks", 0)
    c = _FakeConsumer(app, [{tp: _recs(5, 6)}])
    await _drain(c)
    assert c.seeks == 0
    assert [m.offset for m in route.channel.put_values[0].messages] == [5, 6]
