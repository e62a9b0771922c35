"""The worker's synchronous API against a running worker (real broker, the default ranking policy): for the
same state and the same time it answers exactly what the topic path answers; bad requests get a 400 that
names the problem, and nothing of the worker is disturbed by them."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from driftrec.model.evaluation.world import World
from tests.e2e.test_streams_e2e import catalogue_records, wire
from tests.support import Proc, env_for, produce_raw, read_json_topic, settings_for, wait_until

pytestmark = pytest.mark.slow


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_the_api_answers_what_the_topic_path_answers(kafka, tmp_path):
    bootstrap, _ = kafka
    settings = settings_for(bootstrap, tmp_path, ranking={"engine": "policy"})
    world = World(n_users=20, n_items=60, seed=5)
    produce_raw(bootstrap, catalogue_records(settings, world))
    worker = Proc(["worker"], env_for(settings), name="api-worker")
    try:
        port = int(worker.wait_for_line(r"api on [^:\s]+:(\d+)").group(1))
        base = f"http://127.0.0.1:{port}"
        assert _get(f"{base}/healthz") == (200, {"ok": True})
        t = settings.topics
        events = list(world.events(800))
        produce_raw(bootstrap, [(t.clicks.name if ev.TYPE == "click" else t.ratings.name, ev.user_id.encode(), wire(ev))
                                for ev in events])
        wait_until(lambda: worker.metric("driftrec_ranking_observed_total") >= len(events), 120,
                   message="the policy to observe every event")
        wait_until(lambda: _get(f"{base}/readyz")[0] == 200, 60, message="the API to be ready")

        at = time.time()
        users = [world.user_id(i) for i in range(6)]
        produce_raw(bootstrap, [(t.requests.name, u.encode(), json.dumps({
            "type": "recommendation_request", "event_id": f"api-{n}", "event_time": at, "user_id": u, "k": 5,
        }).encode()) for n, u in enumerate(users)])
        recs = {r["request_id"]: r for r in read_json_topic(bootstrap, t.recommendations.name, min_count=len(users))}
        for n, user in enumerate(users):
            topic = recs[f"api-{n}"]
            status, body = _get(f"{base}/v1/recommendations/{user}?k=5&at={at!r}")
            assert status == 200, body
            assert not topic["fallback"] and not body["fallback"]
            assert len(body["items"]) == 5
            assert [(i["item_id"], i["score"], i["reason"]) for i in body["items"]] == \
                   [(i["item_id"], i["score"], i["reason"]) for i in topic["items"]], user
            assert body["model_version"] == topic["model_version"] and body["user_id"] == user
        # now (no `at`) and without excluding what the user has seen: a different question, still answered
        status, body = _get(f"{base}/v1/recommendations/{users[0]}?k=3&exclude_seen=false")
        assert status == 200 and len(body["items"]) == 3 and body["at"] >= at

        bad = {
            "?k=0": "k",
            "?k=many": "k must be an integer",
            "?exclude_seen=maybe": "exclude_seen",
            "?colour=red": "unknown query parameter",
            f"?at={time.time() + 10 * settings.stream.max_future_skew_s}": "future",
        }
        for query, words in bad.items():
            status, body = _get(f"{base}/v1/recommendations/{users[0]}{query}")
            assert status == 400 and words in body["error"], (query, body)
        status, body = _get(f"{base}/v1/recommendations/{'u' * 200}")
        assert status == 400 and "user_id" in body["error"]
        assert worker.metric("driftrec_api_requests_total", {"status": "400"}) == len(bad) + 1
        assert worker.metric("driftrec_api_requests_total", {"status": "200"}) == len(users) + 1
        assert worker.metric("driftrec_api_request_seconds_count") == len(bad) + len(users) + 2
        assert worker.proc.poll() is None
    finally:
        worker.stop()
