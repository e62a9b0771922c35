"""The features stage in process (no broker): rejections, idempotence, forwarding, item step."""

from __future__ import annotations

import json
import time

import pytest

from driftrec.settings import Settings
from feature_store.writer import FeatureWriter
from streams.agents.features import FeaturesStage, item_partition
from streams.contracts import Click, Item, Rating
from streams.pipeline import Accepted


class _Topic:
    def __init__(self):
        self.sent = []

    async def send(self, *, key, value, partition, force=False):
        self.sent.append((partition, json.loads(value)["d"]))


class _Producer:
    async def flush(self):
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
        self.producer = _Producer()
        self.events = _Topic()

    def Table(self, name, **kw):  # noqa: N802 - Faust's spelling
        return {}

    def topic(self, name, **kw):
        return self.events


class _Writer(FeatureWriter):
    store_name = "sqlite"

    def __init__(self, settings):
        super().__init__(settings)
        self.users, self.items = {}, {}

    async def _start(self):
        return None

    async def _write(self, user_data, item_data):
        return None

    async def write_batch(self, user_rows, item_rows):
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
    return FeaturesStage(app, writer=_Writer(settings))


def _acc(ev, offset, topic="driftrec.clicks", partition=1):
    return Accepted(ev, topic, partition, offset, b"{}")


async def test_rejections_state_rows_and_forwarding(stage):
    now = time.time()
    good = [_acc(Click(event_id=f"c{k}", event_time=now - 10 + k, user_id="u1", item_id=f"i{k}"), k) for k in range(3)]
    rating = _acc(Rating(event_id="r0", event_time=now - 1, user_id="u1", item_id="i1", rating=4.0), 0, "driftrec.ratings")
    bad = [
        _acc(Click(event_id="x1", event_time=now, user_id="u1", item_id="nope"), 10),
        _acc(Click(event_id="x2", event_time=now + 10 * 86400, user_id="u1", item_id="i1"), 11),
        _acc(Rating(event_id="x3", event_time=now, user_id="u1", item_id="i1", rating=float("nan")), 12, "driftrec.ratings"),
    ]
    rejected = await stage.process_interactions(good + [rating] + bad)
    await stage.drain()
    assert sorted(r.reason for _, r in rejected) == ["bad_value", "future_time", "unknown_item"]
    row = stage.writer.users["u1"]
    assert (row["click_count"], row["rating_count"], row["mean_rating"]) == (3, 1, 4.0)
    assert json.loads(row["recent_items"]) == ["i1", "i2", "i0"]
    assert json.loads(row["genre_profile"]) == pytest.approx({"comedy": 2 / 3, "drama": 1 / 3}, abs=1e-5)
    forwarded = [d for _, ds in stage.app.events.sent for d in ds]
    assert len(forwarded) == 4
    assert all(p == item_partition(ds[0][0], 4) for p, ds in stage.app.events.sent)

    # the item step: apply what was forwarded; a replayed forward changes nothing
    msgs = [("driftrec.events", p, json.dumps({"d": ds}).encode()) for p, ds in stage.app.events.sent]
    await stage.process_item_messages(msgs)
    await stage.process_item_messages(msgs)
    await stage.drain()
    assert stage.writer.items["i1"]["popularity_total"] == 2
    assert stage.writer.items["i1"]["rating_count"] == 1

    # crash replay (same positions): user not counted again, interactions re-forwarded, items skip them
    stage.app.events.sent.clear()
    stage.writer.users.clear()
    await stage.process_interactions(good + [rating])
    await stage.drain()
    assert stage.writer.users == {}
    assert len([d for _, ds in stage.app.events.sent for d in ds]) == 4
    await stage.process_item_messages([("driftrec.events", p, json.dumps({"d": ds}).encode())
                                       for p, ds in stage.app.events.sent])
    await stage.drain()
    assert stage.writer.items["i1"]["popularity_total"] == 2

    # a producer duplicate (same ids, new offsets): neither counted nor forwarded
    stage.app.events.sent.clear()
    dupes = [_acc(a.event, a.offset + 100) for a in good]
    assert await stage.process_interactions(dupes) == []
    await stage.drain()
    assert stage.app.events.sent == [] and stage.writer.users == {}


async def test_state_survives_a_cache_reset(stage):
    """The table, not the cache, is the truth (a rebalance clears the cache)."""
    now = time.time()
    batch = [_acc(Click(event_id=f"c{k}", event_time=now - 5 + k, user_id="u2", item_id="i3"), k) for k in range(2)]
    await stage.process_interactions(batch)
    stage.clear_caches()
    await stage.process_interactions(batch)  # replay after the "rebalance"
    await stage.drain()
    assert stage.writer.users["u2"]["click_count"] == 2
