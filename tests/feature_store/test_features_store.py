"""Feast repository, writers and reader on both online stores (SQLite file; the real Redis)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest

from driftrec.core import metrics
from driftrec.core.settings import Settings
from driftrec.feature_store.reader import FeatureReader, decay_popularity
from driftrec.feature_store.process import create_writer

REDIS_URL = "127.0.0.1:6379"


def _settings(tmp_path, store: str) -> Settings:
    if store == "redis":
        from driftrec.feature_store.backends.redis import ping

        if not ping(REDIS_URL):
            pytest.skip(f"Redis is not reachable at {REDIS_URL} (the Redis online-store tests need it)")
    return Settings(feast={
        "repo_dir": str(tmp_path / "feast"), "online_store": store, "redis_url": REDIS_URL,
        "redis_key_ttl_s": 3600,  # test keys clean themselves up
        "project": f"t_{uuid.uuid4().hex[:12]}",  # parallel runs never share keys or tables
        "popularity_half_life_s": 600.0,
    })


def _user(uid, t, clicks=1, recent=("a",)):
    return {"user_id": uid, "recent_items": json.dumps(list(recent)), "click_count": clicks, "rating_count": 1,
            "mean_rating": 3.5, "last_event_time": t, "genre_profile": json.dumps({"Drama": 1.0})}


def _item(iid, t, clicks=1):
    return {"item_id": iid, "click_count": clicks, "rating_count": 0, "popularity_total": clicks,
            "popularity_decayed": 1.5, "popularity_time": t, "mean_rating": 0.0, "last_event_time": t}


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store_settings(request, tmp_path):
    return _settings(tmp_path, request.param)


async def test_write_then_read_one_call(store_settings):
    t = time.time()
    writer = create_writer(store_settings)
    def freshness_sum():
        return sum(metrics.FEATURE_FRESHNESS_SECONDS.labels(store=writer.store_name, feature_view=v)._sum.get()
                   for v in ("user_features", "item_features"))

    before = freshness_sum()
    async with writer:
        res = await writer.write_batch([_user("u1", t, recent=("b", "a"))], [_item("a", t - 5), _item("b", t, 3)])
        assert (res.user_rows, res.item_rows) == (1, 2)
        reader = FeatureReader(store_settings)
        user, items = reader.get_user_and_items("u1", ["a", "b", "unknown"])
        assert user["recent_items"] == ["b", "a"] and user["genre_profile"] == {"Drama": 1.0}
        assert (user["click_count"], user["rating_count"], user["mean_rating"]) == (1, 1, 3.5)
        assert user["last_event_time"] == pytest.approx(t)
        assert set(items) == {"a", "b"}
        assert items["b"]["click_count"] == 3 and items["b"]["popularity_total"] == 3
        assert items["a"]["popularity_now"] == pytest.approx(
            decay_popularity(1.5, t - 5, time.time(), 600.0), rel=1e-3)
        assert reader.get_user_and_items("nobody", []) == (None, {})
        async_user, async_items = await reader.get_user_and_items_async("u1", ["a", "b", "unknown"])
        assert async_user["click_count"] == 1 and set(async_items) == {"a", "b"}
        reader.close()
    # freshness observed per entity row once the write returned
    assert freshness_sum() > before
    assert metrics.FEATURE_NEWEST_EVENT_LAG_SECONDS.labels(store=writer.store_name)._value.get() < 60


def _freshness(store: str, view: str) -> tuple[float, float]:
    """(observations, sum of seconds) of the freshness histogram so far."""
    child = metrics.FEATURE_FRESHNESS_SECONDS.labels(store=store, feature_view=view)
    count = sum(b.get() for b in child._buckets)
    return count, child._sum.get()


async def test_freshness_is_observed_per_event_not_per_row(tmp_path):
    """A row that coalesces three events counts three freshness observations, each from its own event
    time (the older events of a batch waited longer than the row's newest); through the row sink, rows
    of two batches merged into one write still count every event; rows without event times count once."""
    from driftrec.feature_store.sink import RowSink

    settings = _settings(tmp_path, "sqlite")
    writer = create_writer(settings)
    async with writer:
        t = time.time()
        n0, s0 = _freshness(writer.store_name, "user_features")
        await writer.write_batch([_user("u1", t)], [], user_times=[t - 20.0, t - 10.0, t])
        n1, s1 = _freshness(writer.store_name, "user_features")
        assert n1 - n0 == 3
        assert 30.0 <= s1 - s0 < 30.0 + 3 * (time.time() - t) + 1e-6  # 20 + 10 + 0, plus the write time each

        sink = RowSink(writer)
        first = sink.submit([_user("u2", t - 5.0)], [_item("a", t - 5.0)], user_times=[t - 5.0],
                            item_times=[t - 5.0])
        second = sink.submit([_user("u2", t)], [], user_times=[t - 1.0, t])  # same user: one row written
        await asyncio.gather(first, second)
        n2, _ = _freshness(writer.store_name, "user_features")
        i2, _ = _freshness(writer.store_name, "item_features")
        assert n2 - n1 == 3
        await sink.submit([_user("u3", t), _user("u4", t)], [])  # no event times: one per row
        n3, _ = _freshness(writer.store_name, "user_features")
        assert n3 - n2 == 2
    assert i2 >= 1


async def test_reader_matches_feast_get_online_features(store_settings):
    from driftrec.feature_store.definitions import RANKING_SERVICE
    from driftrec.feature_store.repo import open_store

    t = time.time()
    async with create_writer(store_settings) as writer:
        await writer.write_batch([_user("u2", t, clicks=7)], [_item("x", t, 4)])
    fs = await asyncio.to_thread(open_store, store_settings, None, apply=False)
    resp = fs.get_online_features(features=fs.get_feature_service(RANKING_SERVICE), full_feature_names=True,
                                  entity_rows=[{"user_id": "u2", "item_id": "x"}]).to_dict()
    got = {k: v[0] for k, v in resp.items()}
    user, items = FeatureReader(store_settings).get_user_and_items("u2", ["x"])
    for name in ("click_count", "rating_count", "mean_rating", "last_event_time"):
        assert got[f"user_features__{name}"] == pytest.approx(user[name])
    assert json.loads(got["user_features__recent_items"]) == user["recent_items"]
    assert json.loads(got["user_features__genre_profile"]) == user["genre_profile"]
    for name in ("click_count", "popularity_total", "popularity_decayed", "popularity_time", "mean_rating"):
        assert got[f"item_features__{name}"] == pytest.approx(items["x"][name])


async def test_newer_state_with_same_or_older_event_time_still_lands(store_settings):
    """A late event changes the state without moving the row's event time: the write must not be skipped."""
    t = time.time()
    async with create_writer(store_settings) as writer:
        await writer.write_batch([_user("u3", t, clicks=1)], [])
        await writer.write_batch([_user("u3", t, clicks=2)], [])  # same event time
        user, _ = FeatureReader(store_settings).get_user_and_items("u3", [])
        assert user["click_count"] == 2


async def test_concurrent_batches_are_serialised(store_settings):
    t = time.time()
    async with create_writer(store_settings) as writer:
        await asyncio.gather(*[
            writer.write_batch([_user(f"c{k}-{j}", t) for j in range(20)], [_item(f"ci{k}-{j}", t) for j in range(20)])
            for k in range(8)
        ])
    reader = FeatureReader(store_settings)
    for k in range(8):
        user, items = reader.get_user_and_items(f"c{k}-19", [f"ci{k}-{j}" for j in range(20)])
        assert user is not None and len(items) == 20


def test_repo_config_generated(tmp_path):
    import yaml

    from driftrec.feature_store.repo import write_repo_config

    s = _settings(tmp_path, "sqlite")
    repo = write_repo_config(s)
    cfg = yaml.safe_load((repo / "feature_store.yaml").read_text())
    assert cfg["entity_key_serialization_version"] == 3
    assert cfg["online_store"]["type"] == "sqlite" and cfg["offline_store"]["type"] == "file"
    assert cfg["registry"]["path"].endswith("registry.db") and cfg["project"] == s.feast.project


def test_wire_encodings_equal_feasts_protos():
    """The writers' direct encodings are byte for byte what Feast's protos serialize to."""
    import random
    from datetime import datetime, timezone

    from feast.protos.feast.types.Value_pb2 import Value
    from google.protobuf.timestamp_pb2 import Timestamp

    from driftrec.feature_store.backends.redis import encode_timestamp
    from driftrec.feature_store.codec import encode_double, encode_int64, encode_string

    rng = random.Random(3)
    strings = ["", "a", "héllo", "x" * 127, "y" * 128, "z" * 20000, json.dumps(["m1", "m2"]), "\u2603" * 50]
    for v in strings:
        assert encode_string(v) == Value(string_val=v).SerializeToString()
    ints = [0, 1, 127, 128, 300, 2**31, 2**63 - 1, -1, -(2**63)] + [rng.randrange(-10**12, 10**12) for _ in range(200)]
    for v in ints:
        assert encode_int64(v) == Value(int64_val=v).SerializeToString()
    doubles = [0.0, -0.0, 1.5, 1e-300, 3.141592653589793, float(2**53)] + [rng.uniform(-1e9, 1e9) for _ in range(200)]
    for v in doubles:
        assert encode_double(v) == Value(double_val=v).SerializeToString()
    for t in [0.0, 1.0, 1_700_000_000.123456, time.time()] + [rng.uniform(0, 2e9) for _ in range(200)]:
        dt = datetime.fromtimestamp(t, tz=timezone.utc)
        ts = Timestamp()
        ts.FromDatetime(dt)
        assert encode_timestamp(dt) == ts.SerializeToString()


def test_fast_rows_equal_feasts_own_writes(store_settings, tmp_path):
    """Rows written by driftrec's writer read back exactly like the same rows written by Feast itself."""
    from datetime import datetime, timezone

    from driftrec.feature_store.definitions import ITEM_VIEW, RANKING_SERVICE, USER_VIEW
    from driftrec.feature_store.repo import open_store
    from driftrec.feature_store.codec import ITEM_CODEC, USER_CODEC

    t = time.time()
    users = [_user(f"fu{k}", t - k, clicks=k, recent=(f"m{k}", "m0")) for k in range(5)]
    items = [_item(f"fi{k}", t - k, clicks=k * 3) for k in range(5)]
    async def fast():
        async with create_writer(store_settings) as writer:
            await writer.write_batch(users, items)
    asyncio.run(fast())
    fs = open_store(store_settings)
    rows = [{"user_id": u["user_id"], "item_id": i["item_id"]} for u, i in zip(users, items)]

    def read():
        return fs.get_online_features(features=fs.get_feature_service(RANKING_SERVICE), full_feature_names=True,
                                      entity_rows=rows).to_dict()

    ours = read()
    created = datetime.now(tz=timezone.utc)
    provider = fs._get_provider()  # Feast's own write path, with the same rows as Feast protos
    provider.online_write_batch(fs.config, fs.get_feature_view(USER_VIEW), USER_CODEC.protos(users, created), None)
    provider.online_write_batch(fs.config, fs.get_feature_view(ITEM_VIEW), ITEM_CODEC.protos(items, created), None)
    theirs = read()
    assert ours == theirs


def test_reading_an_empty_sqlite_store_is_no_features(tmp_path):
    """Before the first write (the writer still starting) a SQLite store has no tables: no features, no error."""
    reader = FeatureReader(_settings(tmp_path, "sqlite"))
    assert reader.get_user_and_items("u1", ["i1"]) == (None, {})
    reader.close()


def test_repo_config_is_replaced_atomically_under_concurrent_writers(tmp_path):
    """Workers, their writer processes and the scorer all write the same feature_store.yaml."""
    import threading

    import yaml

    from driftrec.feature_store.repo import write_repo_config

    s = _settings(tmp_path, "sqlite")
    variants = [s, s.model_copy(update={"feast": s.feast.model_copy(update={"sqlite_path": tmp_path / "other.db"})})]
    repo = write_repo_config(s)
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(n):
        try:
            for k in range(200):  # alternating contents: every call replaces the file
                write_repo_config(variants[(k + n) % 2])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def reader():
        while not stop.is_set():
            try:
                text = (repo / "feature_store.yaml").read_text()
            except FileNotFoundError:
                continue
            if yaml.safe_load(text) is None or "project" not in yaml.safe_load(text):
                errors.append(AssertionError(f"a torn file: {text!r}"))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    r = threading.Thread(target=reader)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    r.join()
    assert errors == []
    assert not list(repo.glob(".*.tmp"))


# --- writes conditional on event time (a late row from a previous partition owner) ------------------


def _feast_read(settings, user_id, item_id):
    from driftrec.feature_store.definitions import RANKING_SERVICE
    from driftrec.feature_store.repo import open_store

    fs = open_store(settings, None, apply=False)
    resp = fs.get_online_features(features=fs.get_feature_service(RANKING_SERVICE), full_feature_names=True,
                                  entity_rows=[{"user_id": user_id, "item_id": item_id}]).to_dict()
    return {k: v[0] for k, v in resp.items()}


async def test_an_older_row_never_overwrites_a_newer_one(store_settings):
    """A row with an older event time (written late, e.g. by a partition's previous owner after a
    rebalance) leaves the stored newer row as it is; a newer row still replaces an older one; Feast's
    own reads see the kept values."""
    t = float(int(time.time()))  # whole seconds: SQLite stores Feast's epoch seconds
    async with create_writer(store_settings) as writer:
        await writer.write_batch([_user("late", t, clicks=9, recent=("new",))], [_item("li", t, clicks=9)])
        await writer.write_batch([_user("late", t - 120, clicks=4, recent=("old",))], [_item("li", t - 120, clicks=4)])
        reader = FeatureReader(store_settings)
        user, items = reader.get_user_and_items("late", ["li"])
        assert (user["click_count"], user["recent_items"], user["last_event_time"]) == (9, ["new"], pytest.approx(t))
        assert items["li"]["click_count"] == 9 and items["li"]["last_event_time"] == pytest.approx(t)
        got = await asyncio.to_thread(_feast_read, store_settings, "late", "li")
        assert got["user_features__click_count"] == 9 and got["item_features__click_count"] == 9
        assert json.loads(got["user_features__recent_items"]) == ["new"]

        await writer.write_batch([_user("late", t + 60, clicks=11)], [_item("li", t + 60, clicks=12)])
        user, items = reader.get_user_and_items("late", ["li"])
        assert user["click_count"] == 11 and items["li"]["click_count"] == 12
        got = await asyncio.to_thread(_feast_read, store_settings, "late", "li")
        assert got["user_features__click_count"] == 11 and got["item_features__click_count"] == 12
        reader.close()


async def test_conditional_write_keeps_newer_rows_within_one_batch_and_across_entities(store_settings):
    """Per entity: in one batch some rows are older than what is stored (kept) and some newer (written)."""
    t = float(int(time.time()))
    async with create_writer(store_settings) as writer:
        await writer.write_batch([_user(f"m{k}", t, clicks=100 + k) for k in range(10)], [])
        # even entities get an older row, odd ones a newer one
        await writer.write_batch([_user(f"m{k}", t - 30 if k % 2 == 0 else t + 30, clicks=k) for k in range(10)], [])
        reader = FeatureReader(store_settings)
        for k in range(10):
            user, _ = reader.get_user_and_items(f"m{k}", [])
            assert user["click_count"] == (100 + k if k % 2 == 0 else k), k
        reader.close()


def test_redis_conditional_write_compares_feasts_own_timestamps(tmp_path):
    """The Lua script decodes the ``_ts`` field Feast itself writes: a row Feast wrote with a newer event
    time is kept, one with an older event time is replaced."""
    from datetime import datetime, timezone

    from driftrec.feature_store.codec import USER_CODEC
    from driftrec.feature_store.definitions import USER_VIEW
    from driftrec.feature_store.repo import open_store

    settings = _settings(tmp_path, "redis")
    fs = open_store(settings)
    provider = fs._get_provider()
    t = float(int(time.time())) + 0.25
    created = datetime.now(tz=timezone.utc)
    provider.online_write_batch(fs.config, fs.get_feature_view(USER_VIEW),
                                USER_CODEC.protos([_user("fa", t, clicks=50), _user("fb", t - 100, clicks=50)], created), None)

    async def ours():
        async with create_writer(settings) as writer:
            await writer.write_batch([_user("fa", t - 0.1, clicks=1), _user("fb", t - 99.9, clicks=2)], [])
    asyncio.run(ours())
    reader = FeatureReader(settings)
    assert reader.get_user_and_items("fa", [])[0]["click_count"] == 50  # Feast's newer row kept (nanos compared)
    assert reader.get_user_and_items("fb", [])[0]["click_count"] == 2
    reader.close()
