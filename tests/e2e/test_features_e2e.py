"""Streaming features end to end: real embedded broker, a real worker subprocess, the online store.

5,000 clicks and ratings -> features equal a ground truth computed here, directly from the events
(independently of driftrec.streams.state); a replay of the same events changes nothing; a worker SIGKILLed
mid-stream and restarted still ends at the ground truth.
"""

from __future__ import annotations

import json
import math
import random
import time
import uuid

import pytest

from driftrec.model.evaluation.world import World
from driftrec.feature_store.reader import FeatureReader
from tests.support import Proc, committed_offsets, env_for, produce_raw, read_json_topic, scrape, settings_for, wait_until

pytestmark = pytest.mark.slow

N_EVENTS = 5000
HALF_LIFE = 600.0
RECENT = 20


def _settings(bootstrap, tmp_path, store="sqlite"):
    return settings_for(bootstrap, tmp_path, feast={
        "project": f"e2e_{uuid.uuid4().hex[:10]}", "online_store": store, "popularity_half_life_s": HALF_LIFE,
        "redis_key_ttl_s": 3600,
    }, stream={"recent_items": RECENT})


def _events(world: World, n: int, seed: int = 11) -> list[dict]:
    rng = random.Random(seed)
    t0 = time.time() - 600.0
    out = []
    for i in range(n):
        user = world.user_id(rng.randrange(world.n_users))
        item = world.items[min(int(rng.paretovariate(1.2)) - 1, world.n_items - 1) if rng.random() < 0.5
                           else rng.randrange(world.n_items)].item_id
        ev = {"event_id": f"ev-{seed}-{i}", "event_time": round(t0 + i * 0.1, 3), "user_id": user, "item_id": item}
        if rng.random() < 0.35:
            ev.update(type="rating", rating=float(rng.randint(1, 10)) / 2)
        else:
            ev["type"] = "click"
        out.append(ev)
    return out


def _records(settings, events):
    t = settings.topics
    return [(t.ratings.name if e["type"] == "rating" else t.clicks.name, e["user_id"].encode(),
             json.dumps(e).encode()) for e in events]


def _catalogue(settings, world):
    return [(settings.topics.items.name, it.item_id.encode(), json.dumps(it.to_wire()).encode()) for it in world.items]


def ground_truth(events, genres: dict[str, list[str]]):
    users: dict[str, dict] = {}
    items: dict[str, dict] = {}
    for e in events:
        u = users.setdefault(e["user_id"], {"clicks": 0, "ratings": [], "times": {}, "last": 0.0})
        i = items.setdefault(e["item_id"], {"clicks": 0, "ratings": [], "times": []})
        if e["type"] == "rating":
            u["ratings"].append(e["rating"])
            i["ratings"].append(e["rating"])
        else:
            u["clicks"] += 1
            i["clicks"] += 1
        u["times"][e["item_id"]] = max(u["times"].get(e["item_id"], 0.0), e["event_time"])
        u["last"] = max(u["last"], e["event_time"])
        i["times"].append(e["event_time"])
    out_u = {}
    for uid, u in users.items():
        recent = [iid for iid, _ in sorted(u["times"].items(), key=lambda kv: (-kv[1], kv[0]))][:RECENT]
        mass: dict[str, float] = {}
        for iid in recent:
            gs = genres[iid]
            for g in gs:
                mass[g] = mass.get(g, 0.0) + 1.0 / len(gs)
        top = sorted(mass.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        total = sum(w for _, w in top)
        out_u[uid] = {
            "click_count": u["clicks"], "rating_count": len(u["ratings"]),
            "mean_rating": sum(u["ratings"]) / len(u["ratings"]) if u["ratings"] else 0.0,
            "last_event_time": u["last"], "recent_items": recent,
            "genre_profile": {g: w / total for g, w in top},
        }
    out_i = {}
    for iid, i in items.items():
        newest = max(i["times"])
        out_i[iid] = {
            "click_count": i["clicks"], "rating_count": len(i["ratings"]), "popularity_total": len(i["times"]),
            "popularity_decayed": sum(2 ** (-(newest - t) / HALF_LIFE) for t in i["times"]),
            "popularity_time": newest, "last_event_time": newest,
            "mean_rating": sum(i["ratings"]) / len(i["ratings"]) if i["ratings"] else 0.0,
        }
    return out_u, out_i


def diff_features(reader: FeatureReader, truth) -> list[str]:
    """Human-readable differences between the online store and the ground truth (empty = equal)."""
    users, items = truth
    problems = []
    item_ids = list(items)
    for n, (uid, want) in enumerate(users.items()):
        got, got_items = reader.get_user_and_items(uid, item_ids if n == 0 else [])
        if got is None:
            problems.append(f"user {uid} missing")
            continue
        for k, v in want.items():
            g = got[k]
            if k == "genre_profile":
                ok = set(g) == set(v) and all(math.isclose(g[x], v[x], abs_tol=1e-5) for x in v)
            elif isinstance(v, float):
                ok = math.isclose(g, v, rel_tol=1e-9, abs_tol=1e-9)
            else:
                ok = g == v
            if not ok:
                problems.append(f"user {uid} {k}: {g!r} != {v!r}")
        if n == 0:
            for iid, want_i in items.items():
                got_i = got_items.get(iid)
                if got_i is None:
                    problems.append(f"item {iid} missing")
                    continue
                for k, v in want_i.items():
                    if not math.isclose(got_i[k], v, rel_tol=1e-9, abs_tol=1e-9):
                        problems.append(f"item {iid} {k}: {got_i[k]!r} != {v!r}")
    return problems


def _wait_equal(reader, truth, timeout, what, worker=None):
    deadline = time.monotonic() + timeout
    last: list[str] = []
    while time.monotonic() < deadline:
        if worker is not None and worker.proc.poll() is not None:
            raise AssertionError(f"the worker exited ({worker.proc.returncode}):\n{worker.output()[-3000:]}")
        try:
            last = diff_features(reader, truth)
        except Exception as exc:  # noqa: BLE001 - e.g. the store's tables not created yet
            last = [f"read failed: {exc!r}"]
        if not last:
            return
        time.sleep(1.0)
    tail = worker.output()[-3000:] if worker is not None else ""
    if worker is not None:  # where the stream stands, to tell a stall from a wrong value
        try:
            lines = [line for line in scrape(worker.metrics_port).splitlines()
                     if line.startswith(("driftrec_events_ingested_total", "driftrec_consumer_",
                                         "driftrec_feature_", "driftrec_stage_")) and "_bucket" not in line]
            tail += "\nworker metrics:\n" + "\n".join(lines)[:6000]
        except Exception as exc:  # noqa: BLE001 - the report must not hide the timeout
            tail += f"\nworker metrics unavailable: {exc!r}"
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; {len(last)} differences, "
                         f"first: {last[:8]}\n{tail}")


def _start_worker(settings, name="worker") -> Proc:
    w = Proc(["worker"], env_for(settings), name=name)
    w.metrics_port
    return w


@pytest.mark.parametrize("store", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_features_equal_ground_truth_and_replay_changes_nothing(kafka, tmp_path, store):
    bootstrap, base = kafka
    settings = _settings(bootstrap, tmp_path, store)
    if store == "redis":
        from driftrec.feature_store.backends.redis import ping

        if not ping(settings.feast.redis_url):
            pytest.skip(f"Redis is not reachable at {settings.feast.redis_url}")
    world = World(n_users=60, n_items=150, seed=21)
    events = _events(world, N_EVENTS)
    truth = ground_truth(events, {it.item_id: it.genres for it in world.items})
    unknown = [{"type": "click", "event_id": f"unk-{k}", "event_time": time.time() - 1, "user_id": world.user_id(0),
                "item_id": f"not-in-catalogue-{k}"} for k in range(25)]
    produce_raw(bootstrap, _catalogue(settings, world))
    worker = _start_worker(settings)
    reader = FeatureReader(settings)
    try:
        produce_raw(bootstrap, _records(settings, events) + _records(settings, unknown))
        _wait_equal(reader, truth, 40, "features to equal the ground truth", worker)
        letters = read_json_topic(bootstrap, settings.topics.dead_letters.name, min_count=25, timeout=30)
        assert sorted(d["reason"].split(":")[0] for d in letters) == ["unknown_item"] * 25

        # redelivery: the same events again (same ids, new offsets) change nothing
        produce_raw(bootstrap, _records(settings, events))
        wait_until(lambda: worker.metric("driftrec_feature_events_skipped_total", {"reason": "duplicate"}) >= N_EVENTS,
                   60, message="the replayed events to be recognised")
        assert not diff_features(reader, truth)
        assert worker.metric("driftrec_feature_freshness_seconds_count", {"store": store}) > 0
    finally:
        worker.stop()
        reader.close()


@pytest.mark.faults  # issue 9 fault suite
def test_worker_killed_mid_stream_ends_at_ground_truth(kafka, tmp_path):
    """SIGKILL mid-stream; the restarted worker recovers the tables from their changelogs (Tansu's
    end-offset quirk patched) and replays what was not committed: the features end at the truth."""
    bootstrap, base = kafka
    settings = _settings(bootstrap, tmp_path)
    world = World(n_users=60, n_items=150, seed=22)
    events = _events(world, N_EVENTS, seed=12)
    truth = ground_truth(events, {it.item_id: it.genres for it in world.items})
    committed, in_flight, after = events[:1500], events[1500:3000], events[3000:]
    produce_raw(bootstrap, _catalogue(settings, world))
    w1 = _start_worker(settings, "worker-1")
    try:
        produce_raw(bootstrap, _records(settings, committed))
        n_items = len(world.items)  # the catalogue is ingested (and counted) too
        wait_until(lambda: w1.metric("driftrec_events_ingested_total", {"outcome": "ok"}) >= n_items + len(committed), 90,
                   message="the first 1,500 events to be processed")
        t = settings.topics
        # a batch is acknowledged (committable) only once its state, forwards and rows are durable
        wait_until(lambda: sum(committed_offsets(bootstrap, settings.stream.app_id,
                                                 [t.clicks.name, t.ratings.name]).values()) >= len(committed),
                   90, interval=1.0, message="the first 1,500 events' offsets to be committed")
        produce_raw(bootstrap, _records(settings, in_flight))
        wait_until(lambda: w1.metric("driftrec_events_ingested_total", {"outcome": "ok"}) >= n_items + len(committed) + 200,
                   60, interval=0.02, message="the first worker to be mid-stream")
    finally:
        w1.kill()
    w2 = _start_worker(settings, "worker-2")
    reader = FeatureReader(settings)
    try:
        produce_raw(bootstrap, _records(settings, after))
        _wait_equal(reader, truth, 110, "features after the restart to equal the ground truth", w2)
        time.sleep(2)
        assert not diff_features(reader, truth), "features moved after reaching the ground truth"
    finally:
        w2.stop()
        reader.close()


def test_two_workers_split_the_items_and_end_at_ground_truth(kafka, tmp_path):
    """Two workers: each applies interactions on the items it owns in its user step and forwards the
    others through the events topic to the owner; across the rebalance that splits the partitions the
    features still end at the ground truth, and both paths were taken."""
    bootstrap, base = kafka
    settings = _settings(bootstrap, tmp_path)
    world = World(n_users=60, n_items=150, seed=23)
    events = _events(world, N_EVENTS, seed=13)
    truth = ground_truth(events, {it.item_id: it.genres for it in world.items})
    produce_raw(bootstrap, _catalogue(settings, world))
    workers = [_start_worker(settings, "worker-1"), _start_worker(settings, "worker-2")]
    reader = FeatureReader(settings)

    def updates(w, path=None):
        return w.metric("driftrec_feature_item_updates_total", {"source": path} if path else None)

    try:
        sent = 0

        def both_working() -> bool:  # events go out 100 at a time until both workers have partitions
            nonlocal sent
            if sent < len(events) // 2:
                produce_raw(bootstrap, _records(settings, events[sent:sent + 100]))
                sent += 100
            return all(updates(w) > 0 for w in workers)

        wait_until(both_working, 150, interval=1.0, message="both workers to apply interactions")
        produce_raw(bootstrap, _records(settings, events[sent:]))
        _wait_equal(reader, truth, 90, "features from two workers to equal the ground truth")
        assert all(w.proc.poll() is None for w in workers)
        assert sum(updates(w, "local") for w in workers) > 0
        assert sum(updates(w, "forwarded") for w in workers) > 0
    finally:
        for w in workers:
            w.stop()
        reader.close()


class _Feeder:
    """Produces records from a thread at a steady pace (``chunk`` every ``every`` s) with one producer;
    the last ``held`` records wait until :meth:`release` (so the stream is still flowing at a fault)."""

    def __init__(self, bootstrap: str, records: list, chunk: int, every: float, held: int) -> None:
        import threading

        self.bootstrap, self.records, self.chunk, self.every = bootstrap, records, chunk, every
        self.until = len(records) - held
        self.sent = 0
        self.error: BaseException | None = None
        self._released = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import asyncio

        from aiokafka import AIOKafkaProducer

        async def main() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=False,
                                        linger_ms=5)
            await producer.start()
            try:
                while self.sent < len(self.records):
                    if self.sent >= self.until and not self._released.is_set():
                        await asyncio.sleep(0.05)
                        continue
                    part = self.records[self.sent:self.sent + self.chunk]
                    await asyncio.gather(*[await producer.send(t, key=k, value=v) for t, k, v in part])
                    self.sent += len(part)
                    await asyncio.sleep(self.every)
            finally:
                await producer.stop()

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.error = exc

    @property
    def flowing(self) -> bool:
        return self._thread.is_alive() and self.sent < self.until

    def release(self) -> None:
        self._released.set()

    def join(self, timeout: float) -> None:
        self.release()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the feeder did not finish"
        if self.error is not None:
            raise AssertionError(f"the feeder failed: {self.error!r}")


@pytest.mark.faults  # issue 19 fault 5
def test_a_rebalance_with_batches_in_flight_then_a_killed_worker_ends_at_ground_truth(kafka, tmp_path):
    """Events flow without a pause while a second worker joins (the first has batches in flight when its
    partitions are revoked) and while the first is then SIGKILLed (its uncommitted batches are redelivered to
    the survivor): the survivor ends at the ground truth - nothing lost, nothing counted twice."""
    bootstrap, base = kafka
    settings = _settings(bootstrap, tmp_path)
    world = World(n_users=60, n_items=150, seed=24)
    events = _events(world, 7000, seed=14)
    truth = ground_truth(events, {it.item_id: it.genres for it in world.items})
    produce_raw(bootstrap, _catalogue(settings, world))
    n_items = len(world.items)
    w1 = _start_worker(settings, "worker-1")
    w2 = None
    reader = FeatureReader(settings)
    feeder = _Feeder(bootstrap, _records(settings, events), chunk=20, every=0.25, held=1500)  # 80 events/s: ~70 s of flow

    def ingested(w) -> float:
        return w.metric("driftrec_events_ingested_total", {"outcome": "ok"})

    try:
        wait_until(lambda: ingested(w1) >= n_items + 600, 90, message="the first worker to be mid-stream")
        w2 = _start_worker(settings, "worker-2")
        wait_until(lambda: w2.metric("driftrec_feature_item_updates_total") > 0, 150, interval=1.0,
                   message="the second worker to get partitions while events flow")
        assert feeder.flowing, "the stream ended before the rebalance: the fault was not injected mid-stream"
        before = ingested(w1)
        wait_until(lambda: ingested(w1) > before, 60, interval=0.05, message="the first worker to take a new batch")
        w1.kill()
        assert feeder.flowing, "the stream ended before the kill: the fault was not injected mid-stream"
        time.sleep(2.0)
        feeder.join(120)
        _wait_equal(reader, truth, 150, "the survivor's features to equal the ground truth", w2)
        time.sleep(2)
        assert not diff_features(reader, truth), "features moved after reaching the ground truth"
    finally:
        feeder.release()
        w1.kill()
        if w2 is not None:
            w2.stop()
        reader.close()
