"""The features stage in process (no broker): rejections, idempotence, forwarding, ordering, item step.

The broker, the Faust tables and the online store are replaced by in-memory stand-ins here; the
same stage runs against the real ones in tests/test_features_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from driftrec.core.settings import Settings
from driftrec.feature_store.writer import FeatureWriter
from driftrec.streams.agents.features import FeaturesStage, item_partition
from driftrec.core.contracts import Click, Item, Rating
from driftrec.streams.pipeline import Accepted
from driftrec.streams.state import ItemState, UserState


class _Topic:
    """Records sends; each send's future is done when ``ack`` says so (the broker acknowledged)."""

    def __init__(self):
        self.sent = []
        self.markers = []  # barriers of the local item path: (partition, marker)
        self.futures = []
        self.auto_ack = True

    async def send(self, *, key, value, partition, force=False):
        body = json.loads(value)
        if "m" in body:
            self.markers.append((partition, body["m"]))
        else:
            self.sent.append((partition, body["d"]))
        fut = asyncio.get_running_loop().create_future()
        if self.auto_ack:
            fut.set_result(None)
        self.futures.append(fut)
        return fut

    def ack_all(self):
        for f in self.futures:
            if not f.done():
                f.set_result(None)


class _Store:
    """A state store: a dict per partition; ``writes`` logs what was persisted, in order."""

    def __init__(self):
        self.data: dict[int, dict[bytes, bytes]] = {}
        self.writes: list[tuple[int, dict[bytes, bytes]]] = []

    def get(self, key, partition):
        return self.data.get(partition, {}).get(key)

    async def write(self, partition, values):
        self.data.setdefault(partition, {}).update(values)
        self.writes.append((partition, dict(values)))
        return None


class _Catalogue:
    def __init__(self, items):
        self.items = {i.item_id: i for i in items}

    def __contains__(self, item_id):
        return item_id in self.items

    def get(self, item_id):
        return self.items.get(item_id)

    async def wait_caught_up(self, timeout=None):
        return True


class _App:
    def __init__(self, settings, catalogue):
        self.settings = settings
        self.catalogue = catalogue
        self.events = _Topic()

    def topic(self, name, **kw):
        return self.events


class _Writer(FeatureWriter):
    store_name = "sqlite"

    def __init__(self, settings):
        super().__init__(settings)
        self.users, self.items = {}, {}
        self.user_times, self.item_times = [], []  # event times the rows carried (freshness per event)
        self.batches = 0

    async def _start(self):
        return None

    async def _write(self, user_data, item_data):
        return None

    async def write_batch(self, user_rows, item_rows, *, user_times=None, item_times=None):
        self.batches += 1
        self.user_times += list(user_times or ())
        self.item_times += list(item_times or ())
        for r in user_rows:
            self.users[r["user_id"]] = r
        for r in item_rows:
            self.items[r["item_id"]] = r


@pytest.fixture
def stage():
    settings = Settings(stream={"unknown_item_grace_s": 0.0})
    items = [Item(event_id=f"it{k}", event_time=1.0, item_id=f"i{k}", title=f"t{k}", genres=["drama"] if k % 2 else ["comedy"])
             for k in range(5)]
    app = _App(settings, _Catalogue(items))
    return FeaturesStage(app, writer=_Writer(settings), stores=(_Store(), _Store()))


def _acc(ev, offset, topic="driftrec.clicks", partition=1):
    return Accepted(ev, topic, partition, offset, b"{}")


async def _done(result):
    await asyncio.gather(*result.durable)
    return result


def _forwarded_messages(stage):
    return [("driftrec.events", p, json.dumps({"d": ds}).encode()) for p, ds in stage.app.events.sent]


async def test_rejections_state_rows_and_forwarding(stage):
    now = time.time()
    good = [_acc(Click(event_id=f"c{k}", event_time=now - 10 + k, user_id="u1", item_id=f"i{k}"), k) for k in range(3)]
    rating = _acc(Rating(event_id="r0", event_time=now - 1, user_id="u1", item_id="i1", rating=4.0), 0, "driftrec.ratings")
    bad = [
        _acc(Click(event_id="x1", event_time=now, user_id="u1", item_id="nope"), 10),
        _acc(Click(event_id="x2", event_time=now + 10 * 86400, user_id="u1", item_id="i1"), 11),
        _acc(Rating(event_id="x3", event_time=now, user_id="u1", item_id="i1", rating=float("nan")), 12, "driftrec.ratings"),
    ]
    result = await _done(await stage.process_interactions(good + [rating] + bad))
    assert sorted(r.reason for _, r in result.rejected) == ["bad_value", "future_time", "unknown_item"]
    row = stage.writer.users["u1"]
    assert (row["click_count"], row["rating_count"], row["mean_rating"]) == (3, 1, 4.0)
    assert json.loads(row["recent_items"]) == ["i1", "i2", "i0"]
    assert json.loads(row["genre_profile"]) == pytest.approx({"comedy": 2 / 3, "drama": 1 / 3}, abs=1e-5)
    stored = UserState.loads(stage.user_store.get(b"u1", 1))  # what a restarted worker recovers
    assert (stored.click_count, stored.rating_count) == (3, 1)
    forwarded = [d for _, ds in stage.app.events.sent for d in ds]
    assert len(forwarded) == 4
    assert all(p == item_partition(ds[0][0], 4) for p, ds in stage.app.events.sent)
    # one freshness observation per accepted event (its own time), not one per row: the 4 events share a row
    assert sorted(stage.writer.user_times) == sorted(a.event.event_time for a in good + [rating])

    # the item step: apply what was forwarded; a replayed forward changes nothing (nor counts again)
    msgs = _forwarded_messages(stage)
    await asyncio.gather(*await stage.process_item_messages(msgs))
    await asyncio.gather(*await stage.process_item_messages(msgs))
    assert stage.writer.items["i1"]["popularity_total"] == 2
    assert stage.writer.items["i1"]["rating_count"] == 1
    assert sorted(stage.writer.item_times) == sorted(a.event.event_time for a in good + [rating])

    # crash replay (same positions): nothing counted again, nothing forwarded again (the forwards were
    # durable before the state was), but the user's state and row are written again
    stage.app.events.sent.clear()
    stage.writer.users.clear()
    writes_before = len(stage.user_store.writes)
    await _done(await stage.process_interactions(good + [rating]))
    assert stage.app.events.sent == []
    assert stage.writer.users["u1"]["click_count"] == 3
    assert len(stage.user_store.writes) == writes_before + 1

    # a producer duplicate (same ids, new offsets): neither counted nor forwarded nor written
    stage.writer.users.clear()
    dupes = [_acc(a.event, a.offset + 100) for a in good]
    result = await _done(await stage.process_interactions(dupes))
    assert result.rejected == [] and result.durable == []
    assert stage.app.events.sent == [] and stage.writer.users == {}


async def test_state_is_persisted_only_after_its_forwards_are_acknowledged(stage):
    now = time.time()
    stage.app.events.auto_ack = False
    result = await stage.process_interactions([_acc(Click(event_id="a", event_time=now, user_id="u3", item_id="i2"), 0)])
    persist = result.durable[0]
    await asyncio.sleep(0.05)
    assert not persist.done() and stage.user_store.get(b"u3", 1) is None
    stage.app.events.ack_all()
    await asyncio.wait_for(persist, 2)
    assert UserState.loads(stage.user_store.get(b"u3", 1)).click_count == 1


class _Consumer:
    def __init__(self, partitions):
        from faust.types import TP

        self.tps = {TP("driftrec.events", p) for p in partitions}

    def assignment(self):
        return set(self.tps)


class _GatedStore(_Store):
    """A store whose writes become durable only when the test says so."""

    def __init__(self):
        super().__init__()
        self.acks = []
        self.gated = True

    async def write(self, partition, values):
        await super().write(partition, values)
        ack = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        if not self.gated:
            ack.set_result(None)
        return ack

    def open(self):
        self.gated = False
        for ack in self.acks:
            if not ack.done():
                ack.set_result(None)


class _ItemStep:
    """Plays the events partitions: delivers the markers the stage sends (after ``before``, messages
    already waiting in the partition) to the real item step, as the item agent would."""

    def __init__(self, stage, before=(), deliver=True):
        self.stage, self.before, self.deliver = stage, list(before), deliver
        self.task = None

    async def _run(self):
        seen = 0
        while True:
            markers = self.stage.app.events.markers
            if self.deliver and len(markers) > seen:
                msgs, self.before = self.before, []
                msgs += [("driftrec.events", p, json.dumps({"m": m}).encode()) for p, m in markers[seen:]]
                seen = len(markers)
                await asyncio.gather(*await self.stage.process_item_messages(msgs))
            await asyncio.sleep(0.005)

    async def __aenter__(self):
        self.task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc):
        self.task.cancel()


async def test_items_owned_here_are_applied_in_the_user_step(stage):
    """Interactions on items whose events partition this worker owns skip the events topic (after a
    barrier through each owned partition); the user state is persisted only once those item states
    are durable."""
    now = time.time()
    owned = {item_partition("i1", 4), item_partition("i2", 4)}
    stage.app.consumer = _Consumer(owned)
    stage.item_store = _GatedStore()
    stage._item_persist.store = stage.item_store
    items = [f"i{k}" for k in range(5)]
    batch = [_acc(Click(event_id=f"e{k}", event_time=now + k, user_id="u7", item_id=i), k) for k, i in enumerate(items)]
    async with _ItemStep(stage):
        result = await asyncio.wait_for(stage.process_interactions(batch), 5)
    assert sorted(p for p, _ in stage.app.events.markers) == sorted(owned)  # one barrier per owned partition
    forwarded = sorted(d[0] for _, ds in stage.app.events.sent for d in ds)
    assert forwarded == sorted(i for i in items if item_partition(i, 4) not in owned)
    local = [i for i in items if item_partition(i, 4) in owned]
    assert local  # the test's items cover both paths
    await asyncio.sleep(0.05)
    stored = {k.decode() for _, v in stage.item_store.writes for k in v}
    assert stored == set(local)
    assert stage.user_store.get(b"u7", 1) is None  # the item states are not durable yet
    stage.item_store.open()
    await asyncio.wait_for(asyncio.gather(*result.durable), 2)
    assert UserState.loads(stage.user_store.get(b"u7", 1)).click_count == 5
    assert {i for i in local} <= set(stage.writer.items)  # rows written with the user rows
    assert all(stage.writer.items[i]["popularity_total"] == 1 for i in local)
    # the forwarded ones reach the item step as before; a replay of the batch changes nothing
    await asyncio.wait_for(asyncio.gather(*await stage.process_item_messages(_forwarded_messages(stage))), 2)
    assert set(stage.writer.items) == set(items)
    stage.app.events.sent.clear()
    await asyncio.wait_for(asyncio.gather(*(await stage.process_interactions(batch)).durable), 2)
    assert stage.app.events.sent == []
    assert len(stage.app.events.markers) == len(owned)  # same assignment: no new barrier
    assert all(stage.writer.items[i]["popularity_total"] == 1 for i in items)


async def test_the_barrier_lets_waiting_forwards_go_first(stage):
    """Taking over a partition where a forwarded interaction still waits: the local path starts only
    after the item step has applied it, so a newer offset of the same source cannot hide it."""
    now = time.time()
    q = item_partition("i3", 4)
    # the previous owner forwarded clicks offset 7 (source c1) on i3; it still waits in partition q
    waiting = [("driftrec.events", q, json.dumps({"d": [["i3", "c", None, now, "c1", 7]]}).encode())]
    stage.app.consumer = _Consumer({q})
    batch = [_acc(Click(event_id="e8", event_time=now + 1, user_id="u8", item_id="i3"), 8)]
    async with _ItemStep(stage, before=waiting):
        await _done(await asyncio.wait_for(stage.process_interactions(batch), 5))
    assert stage.app.events.sent == []  # applied locally, after the barrier
    assert stage.writer.items["i3"]["popularity_total"] == 2  # both interactions counted
    assert stage.writer.items["i3"]["click_count"] == 2


async def test_a_barrier_that_does_not_come_through_forwards_and_retries(stage):
    now = time.time()
    q = item_partition("i3", 4)
    stage.app.consumer = _Consumer({q})
    stage.settings.stream.local_items_barrier_s = 0.2
    stage.settings.stream.local_items_retry_s = 0.3
    first = [_acc(Click(event_id="e1", event_time=now, user_id="u9", item_id="i3"), 1)]
    second = [_acc(Click(event_id="e2", event_time=now + 1, user_id="u9", item_id="i3"), 2)]
    async with _ItemStep(stage, deliver=False):  # the item step is behind: no marker arrives
        t0 = time.monotonic()
        await _done(await stage.process_interactions(first))
        assert 0.2 <= time.monotonic() - t0 < 2
    assert [d[0] for _, ds in stage.app.events.sent for d in ds] == ["i3"]  # forwarded instead
    assert len(stage.app.events.markers) == 1
    await asyncio.sleep(0.35)
    async with _ItemStep(stage) as step:
        step.before = _forwarded_messages(stage)  # what waits in the partition: the forward of e1
        stage.app.events.markers.clear()
        await _done(await asyncio.wait_for(stage.process_interactions(second), 5))
    assert len(stage.app.events.markers) == 1  # a new barrier after the retry interval
    assert [d[0] for _, ds in stage.app.events.sent for d in ds] == ["i3"]  # e2 applied locally
    assert stage.writer.items["i3"]["popularity_total"] == 2


async def test_persists_keep_batch_order(stage):
    """A later batch's state never lands before an earlier one's, even if its forwards are acked first."""
    now = time.time()
    stage.app.events.auto_ack = False
    first = await stage.process_interactions([_acc(Click(event_id="a", event_time=now, user_id="u4", item_id="i1"), 0)])
    first_fwd = stage.app.events.futures[-1]
    second = await stage.process_interactions([_acc(Click(event_id="b", event_time=now + 1, user_id="u4", item_id="i2"), 1)])
    stage.app.events.futures[-1].set_result(None)  # the second batch's forward is acknowledged first
    await asyncio.sleep(0.05)
    assert not second.durable[0].done() and stage.user_store.writes == []
    first_fwd.set_result(None)
    await asyncio.wait_for(asyncio.gather(first.durable[0], second.durable[0]), 2)
    counts = [UserState.loads(v[b"u4"]).click_count for _, v in stage.user_store.writes]
    assert counts == [1, 2]


async def test_rows_are_coalesced_while_a_write_is_in_flight(stage):
    now = time.time()
    gate = asyncio.Event()
    real = stage.writer.write_batch

    async def slow(users, items, **times):
        await gate.wait()
        await real(users, items, **times)

    stage.writer.write_batch = slow
    results = []
    for k in range(5):
        results.append(await stage.process_interactions([_acc(Click(event_id=f"e{k}", event_time=now + k,
                                                                    user_id="u5", item_id="i1"), k)]))
        await asyncio.sleep(0)  # the sink starts writing the first batch's rows
    gate.set()
    await asyncio.gather(*(d for r in results for d in r.durable))
    assert stage.writer.users["u5"]["click_count"] == 5
    assert stage.writer.batches == 2  # the first batch's write, then the four others merged into one
    assert sorted(stage.writer.user_times) == [now + k for k in range(5)]  # every event's freshness, merged or not


async def test_state_survives_a_cache_reset(stage):
    """The store, not the cache, is the truth (a rebalance clears the cache)."""
    now = time.time()
    batch = [_acc(Click(event_id=f"c{k}", event_time=now - 5 + k, user_id="u2", item_id="i3"), k) for k in range(2)]
    await _done(await stage.process_interactions(batch))
    stage.clear_caches()
    await _done(await stage.process_interactions(batch))  # replay after the "rebalance"
    assert stage.writer.users["u2"]["click_count"] == 2
    msgs = _forwarded_messages(stage)
    await asyncio.gather(*await stage.process_item_messages(msgs))
    stage.clear_caches()
    await asyncio.gather(*await stage.process_item_messages(msgs))
    assert ItemState.loads(stage.item_store.get(b"i3", msgs[0][1])).popularity_total == 2


async def test_a_failed_persist_stops_the_chain_and_the_worker(stage):
    """If a batch's forwards cannot be made durable, neither it nor any later batch is persisted."""
    failures = []
    stage._user_persist.on_failure = failures.append
    now = time.time()
    stage.app.events.auto_ack = False
    first = await stage.process_interactions([_acc(Click(event_id="a", event_time=now, user_id="u6", item_id="i1"), 0)])
    stage.app.events.futures[-1].set_exception(ConnectionError("broker away"))
    second = await stage.process_interactions([_acc(Click(event_id="b", event_time=now + 1, user_id="u6", item_id="i2"), 1)])
    stage.app.events.ack_all()
    for result in (first, second):
        with pytest.raises(Exception):
            await asyncio.wait_for(result.durable[0], 2)
    assert stage.user_store.writes == []
    assert len(failures) == 1 and isinstance(failures[0], ConnectionError)


async def test_row_sink_retries_until_the_store_is_back(stage, monkeypatch):
    from driftrec.feature_store import sink

    monkeypatch.setattr(sink, "RETRY_PAUSES_S", (0.01,))
    real, calls = stage.writer.write_batch, []

    async def flaky(users, items, **times):
        calls.append(len(users))
        if len(calls) < 3:
            raise ConnectionError("store away")
        await real(users, items, **times)

    stage.writer.write_batch = flaky
    done = stage.rows.submit([{"user_id": "u7", "last_event_time": 1.0}], [])
    await asyncio.wait_for(done, 2)
    assert calls == [1, 1, 1] and stage.writer.users["u7"]["last_event_time"] == 1.0


# --- a stage exception isolates the event at fault ------------------------------------------------


async def test_a_poison_event_is_isolated_and_the_rest_applied_once(stage):
    """The stage raises on one event after applying it (half-applied); the pipeline retries halves
    until it stands alone: only it is rejected (naming the stage and the exception), the others -
    its user's included - are applied exactly once, also over a state whose persist is still pending."""
    from driftrec.streams.pipeline import Pipeline

    now = time.time()
    # a first batch whose user state is persisted only once its forwards are acknowledged: pending
    stage.app.events.auto_ack = False
    first = await stage.process_interactions([_acc(Click(event_id="p0", event_time=now - 20, user_id="u1",
                                                        item_id="i0"), 0)])
    assert stage.user_store.get(b"u1", 1) is None and b"u1" in stage._user_persist.pending
    stage.app.events.auto_ack = True
    stage._poison = "bad"
    pipe = Pipeline()
    pipe.register("features", stage.process_interactions)
    events = [_acc(Click(event_id=f"e{k}", event_time=now - 10 + k, user_id=f"u{k % 2}", item_id=f"i{k % 5}"), 1 + k)
              for k in range(9)]
    events.insert(4, _acc(Click(event_id="bad", event_time=now - 5, user_id="u1", item_id="i3"), 50))
    result = await pipe.dispatch(events)
    stage.app.events.ack_all()
    await asyncio.gather(*first.durable, *result.durable)
    assert [(a.event.event_id, r.reason) for a, r in result.rejected] == [("bad", "processing")]
    assert "'features'" in result.rejected[0][1].detail and "InjectedFault" in result.rejected[0][1].detail
    u1, u0 = UserState.loads(stage.user_store.get(b"u1", 1)), UserState.loads(stage.user_store.get(b"u0", 1))
    assert u1.click_count == 1 + 4 and u0.click_count == 5  # p0 + e1,e3,e5,e7 ; e0,e2,e4,e6,e8
    assert stage.writer.users["u1"]["click_count"] == 5
    forwarded = [d for _, ds in stage.app.events.sent for d in ds]
    msgs = _forwarded_messages(stage)
    await asyncio.gather(*await stage.process_item_messages(msgs))
    assert sum(stage.writer.items[i]["click_count"] for i in stage.writer.items) == 10
    assert len({(d[4], d[5]) for d in forwarded}) == 10  # the poison event never reached the items


async def test_a_stage_failing_on_every_event_alone_is_not_the_events_fault():
    from driftrec.streams.pipeline import Pipeline, StageFailed

    async def broken(batch):
        raise OSError("store down")

    pipe = Pipeline()
    pipe.register("broken", broken)
    now = time.time()
    with pytest.raises(StageFailed):
        await pipe.dispatch([_acc(Click(event_id=f"e{k}", event_time=now, user_id="u", item_id="i1"), k)
                             for k in range(4)])


def test_offset_marks_of_another_broker_epoch_do_not_alias():
    from driftrec.core.interactions import Interaction
    from driftrec.streams.state import source_code

    def ev(eid, offset, epoch):
        return Interaction("u", "i1", None, 100.0 + offset, eid, None, None, source_code("c", 3, epoch), offset)

    old = UserState()
    assert old.apply(ev("a", 5, None)).value == "new"  # a state written before epochs existed
    state = UserState.loads(old.dumps())
    assert state.hw == {"c3": 5}
    assert state.apply(ev("b", 0, "e1")).value == "new"  # offset 0 of a new broker: not a redelivery
    assert state.hw == {"c3@e1": 0}  # the old mark is retired
    assert state.apply(ev("b", 0, "e1")).value == "redelivered"
    assert state.apply(ev("c", 0, "e2")).value == "new"
    assert UserState.loads(state.dumps()).hw == {"c3@e2": 0}
    item = ItemState()
    from driftrec.streams.state import ItemDelta

    assert item.apply(ItemDelta("i1", "click", None, 1.0, "c3", 7), half_life_s=60)
    assert item.apply(ItemDelta("i1", "click", None, 2.0, "c3@e1", 0), half_life_s=60)
    assert not item.apply(ItemDelta("i1", "click", None, 2.0, "c3@e1", 0), half_life_s=60)
    assert item.hw == {"c3@e1": 0} and item.click_count == 2
