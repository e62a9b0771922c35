"""The event backbone end to end: real Tansu broker over TCP, real Faust workers in subprocesses."""

from __future__ import annotations

import base64
import json
import random
import time

import pytest

from driftrec.model.evaluation.world import World
from tests.support import Proc, committed_offsets, env_for, produce_raw, read_json_topic, wait_until

pytestmark = pytest.mark.slow


def start_worker(settings, name="worker", **env) -> Proc:
    w = Proc(["worker"], env_for(settings, **env), name=name)
    w.metrics_port  # waits until it is up
    return w


def wire(ev, **over) -> bytes:
    data = ev.to_wire()
    data["event_time"] = time.time()
    data.update(over)
    return json.dumps(data).encode()


def catalogue_records(settings, world):
    return [(settings.topics.items.name, it.item_id.encode(), wire(it)) for it in world.items]


def request_records(settings, world, n, prefix, seed=1):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        user = world.user_id(rng.randrange(world.n_users))
        body = {"type": "recommendation_request", "event_id": f"{prefix}-{i}", "event_time": time.time(),
                "user_id": user, "k": 3}
        out.append((settings.topics.requests.name, user.encode(), json.dumps(body).encode()))
    return out


def answered(bootstrap, settings, min_count=0, timeout=60):
    recs = read_json_topic(bootstrap, settings.topics.recommendations.name, min_count=min_count, timeout=timeout)
    return [r["request_id"] for r in recs], recs


def malformed_payloads(settings, world, n, rng):
    """n malformed records of many kinds, on the topics apps produce to."""
    t = settings.topics
    now = time.time()
    good_click = {"type": "click", "event_id": "x", "event_time": now, "user_id": "u1", "item_id": world.items[0].item_id}
    makers = [
        lambda i: (t.clicks.name, b"\x00\xffgarbage" + str(i).encode()),
        lambda i: (t.ratings.name, b"{not json " + str(i).encode()),
        lambda i: (t.clicks.name, json.dumps([i]).encode()),
        lambda i: (t.clicks.name, json.dumps({**good_click, "event_id": f"m{i}", "type": "purchase"}).encode()),
        lambda i: (t.clicks.name, json.dumps({k: v for k, v in {**good_click, "event_id": f"m{i}"}.items() if k != "user_id"}).encode()),
        lambda i: (t.ratings.name, json.dumps({**good_click, "type": "rating", "event_id": f"m{i}", "rating": "five"}).encode()),
        lambda i: (t.ratings.name, json.dumps({**good_click, "type": "rating", "event_id": f"m{i}", "rating": 1e9}).encode()),
        lambda i: (t.clicks.name, json.dumps({**good_click, "event_id": f"m{i}", "event_time": now + 10 * 365 * 86400}).encode()),
        lambda i: (t.clicks.name, json.dumps({**good_click, "event_id": f"m{i}", "user_id": "u" * 100_000}).encode()),
        lambda i: (t.requests.name, json.dumps({"type": "recommendation_request", "event_id": f"m{i}", "event_time": now,
                                                 "user_id": "u1", "k": -3}).encode()),
        lambda i: (t.items.name, json.dumps({"type": "item", "event_id": f"m{i}", "event_time": now, "item_id": f"bad{i}"}).encode()),
        lambda i: (t.clicks.name, json.dumps({**good_click, "event_id": f"m{i}", "type": "rating", "rating": 3}).encode()),
    ]
    return [(topic, f"k{i}".encode(), value) for i in range(n) for topic, value in [makers[i % len(makers)](i)]]


def test_mixed_valid_and_malformed_events(kafka):
    """1,000 events: every valid one processed, every malformed one dead-lettered with a reason."""
    bootstrap, settings = kafka
    world = World(n_users=30, n_items=60, seed=3)
    rng = random.Random(0)
    valid = catalogue_records(settings, world)
    t = settings.topics
    for ev in world.events(440):
        topic = t.clicks.name if ev.TYPE == "click" else t.ratings.name
        valid.append((topic, ev.user_id.encode(), wire(ev)))
    valid += request_records(settings, world, 1000 - 400 - len(valid), "req")
    bad = malformed_payloads(settings, world, 400, rng)
    mixed = valid[: len(world.items)] + rng.sample(valid[len(world.items):] + bad, len(valid) - len(world.items) + len(bad))
    assert len(mixed) == 1000

    worker = start_worker(settings)
    try:
        produce_raw(bootstrap, mixed)
        n_requests = sum(1 for topic, _, _ in valid if topic == t.requests.name)
        wait_until(lambda: worker.metric("driftrec_events_ingested_total", {"outcome": "ok"}) >= len(valid), 90,
                   message="all valid events processed")
        wait_until(lambda: worker.metric("driftrec_events_ingested_total", {"outcome": "dead_lettered"}) >= len(bad), 30,
                   message="all malformed events dead-lettered")
        assert worker.metric("driftrec_events_ingested_total", {"outcome": "ok"}) == len(valid)
        assert worker.metric("driftrec_events_ingested_total", {"outcome": "dead_lettered"}) == len(bad)

        letters = read_json_topic(bootstrap, t.dead_letters.name, min_count=len(bad))
        assert len(letters) == len(bad)
        originals = sorted(base64.b64decode(d["original_b64"]) for d in letters)
        assert originals == sorted(v for _, _, v in bad)
        for d in letters:
            assert d["reason"] and ":" in d["reason"], d
            assert d["source_topic"] in {t.clicks.name, t.ratings.name, t.items.name, t.requests.name}
            assert d["source_offset"] is not None and d["source_partition"] is not None
        reasons = {d["reason"].split(":")[0] for d in letters}
        assert {"not_json", "not_object", "unknown_type", "missing_field", "wrong_type", "bad_value",
                "future_time", "oversized", "wrong_topic"} <= reasons

        ids, _ = answered(bootstrap, settings, min_count=n_requests)
        assert sorted(ids) == sorted(f"req-{i}" for i in range(n_requests))
        assert worker.proc.poll() is None, "the worker must survive malformed input"
    finally:
        worker.stop()


def test_two_workers_share_the_partitions(kafka):
    bootstrap, settings = kafka
    world = World(n_users=40, n_items=30, seed=4)
    produce_raw(bootstrap, catalogue_records(settings, world))
    w1 = start_worker(settings, "worker-1")
    w2 = start_worker(settings, "worker-2")
    sent = []
    try:
        def both_busy():
            batch = request_records(settings, world, 20, f"r{len(sent)}", seed=len(sent))
            produce_raw(bootstrap, batch)
            sent.extend(json.loads(v)["event_id"] for _, _, v in batch)
            return all(w.metric("driftrec_recommendations_published_total") > 0 for w in (w1, w2))

        wait_until(both_busy, timeout=120, interval=1.0, message="both workers to answer requests")
        ids, _ = answered(bootstrap, settings, min_count=len(sent), timeout=90)
        assert set(ids) == set(sent)
        total = sum(w.metric("driftrec_recommendations_published_total") for w in (w1, w2))
        assert total >= len(sent)
    finally:
        w1.stop()
        w2.stop()


def test_restarted_worker_keeps_committed_progress(kafka):
    """SIGKILL after offsets were committed: the new worker neither loses nor redoes that work."""
    bootstrap, settings = kafka
    world = World(n_users=20, n_items=30, seed=5)
    produce_raw(bootstrap, catalogue_records(settings, world))
    first = request_records(settings, world, 40, "before", seed=1)
    second = request_records(settings, world, 40, "after", seed=2)

    w1 = start_worker(settings, "worker-1")
    try:
        produce_raw(bootstrap, first)
        wait_until(lambda: w1.metric("driftrec_recommendations_published_total") >= 40, 90, message="first batch answered")
        # kill only once the offsets are committed (a fixed sleep is not enough on a loaded machine)
        wait_until(lambda: sum(committed_offsets(bootstrap, settings.stream.app_id,
                                                 [settings.topics.requests.name]).values()) >= 40,
                   90, interval=1.0, message="the first batch's offsets committed")
    finally:
        w1.kill()

    w2 = start_worker(settings, "worker-2")
    try:
        produce_raw(bootstrap, second)
        wait_until(lambda: w2.metric("driftrec_recommendations_published_total") >= 40, 120, message="second batch answered")
        time.sleep(2)
        ids, _ = answered(bootstrap, settings, min_count=80)
        assert sorted(ids) == sorted([f"before-{i}" for i in range(40)] + [f"after-{i}" for i in range(40)])
        assert w2.metric("driftrec_recommendations_published_total") == 40, "committed work was redone"
    finally:
        w2.stop()
