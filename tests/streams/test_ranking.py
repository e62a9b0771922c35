"""The recommend stage's ranking policy in process: LoopRanker with a fake scorer and feature reader.

No broker, no scorer worker, no Feast: the app is a stand-in with real settings and a small
catalogue, the interaction follower is fed by hand (``follower._deliver``, what it does for every
record it reads), the scorer client and the feature reader are replaced by fakes that record what
they were asked. The candidate sources and the River correction are the real ones.
"""

from __future__ import annotations

import logging
import time

import pytest

from driftrec.core import metrics
from driftrec.core.contracts import Click, Item, Rating, RecommendationRequest
from driftrec.core.settings import Settings
from driftrec.model.drift import DriftEvent
from driftrec.streams.rankers import build_ranker
from driftrec.streams.ranking import LoopRanker, Ranked, Ranker
from driftrec.streams.scorer_client import LMRanking, ScorerUnavailable

ITEMS = ["a", "b", "c", "d", "x", "y", "z"]
NOW = time.time()
_ids = iter(range(10**9))


# --- stand-ins ---------------------------------------------------------------------------------


class _Catalogue:
    def __init__(self):
        self.items: dict[str, Item] = {}
        self._callbacks = []

    def on_item(self, cb):
        self._callbacks.append(cb)

    def add(self, item_id, event_time):
        it = Item(event_id=f"item-{item_id}", event_time=event_time, item_id=item_id, title=item_id)
        self.items[item_id] = it
        for cb in self._callbacks:
            cb(it)


class _App:
    def __init__(self):
        self.settings = Settings(ranking={"engine": "loop"})  # these tests are of the LM-scorer loop
        self.catalogue = _Catalogue()
        self.bootstrap_servers = "127.0.0.1:1"  # never connected to: the follower's task is not run
        self.tasks = []

    def task(self, fn):
        self.tasks.append(fn)
        return fn


class _Scorer:
    """The scorer client: answers ``items`` (best first) whatever it is asked, or raises ``error``."""

    def __init__(self, items=(), error=None):
        self.items = list(items)
        self.error = error
        self.calls = []

    async def recommend(self, user_id, history, *, k, domain, exclude):
        self.calls.append({"user_id": user_id, "history": list(history), "k": k, "domain": domain,
                           "exclude": list(exclude)})
        if self.error is not None:
            raise self.error
        n = len(self.items)
        return LMRanking(
            [{"item_id": i, "score": round(0.9 - 0.1 * r, 3), "reason": f"lm likes {i}"}
             for r, i in enumerate(self.items[:k])] if n else [],
            adapter_version="adapter-7", model_version="lm-test", domain=domain or "default")


class _Reader:
    """The Feast reader: per-user recent items, per-item features."""

    def __init__(self, history=None, item_features=None, fail=False):
        self.history = history or {}
        self.item_features = item_features or {}
        self.fail = fail
        self.calls = []

    async def get_user_and_items_async(self, user_id, item_ids):
        self.calls.append((user_id, list(item_ids)))
        if self.fail:
            raise ConnectionError("online store down")
        ufeat = {"recent_items": self.history[user_id]} if user_id in self.history else None
        return ufeat, {i: self.item_features[i] for i in item_ids if i in self.item_features}


def _make(scorer=None, reader=None, items=ITEMS):
    app = _App()
    ranker = build_ranker(app)
    assert isinstance(ranker, LoopRanker)
    for n, i in enumerate(items):
        app.catalogue.add(i, event_time=NOW - 1000 + n)  # later in the list = newer
    ranker.scorer = scorer if scorer is not None else _Scorer()
    ranker._reader = reader if reader is not None else _Reader()
    return ranker


def _click(user, item, t=None):
    return Click(event_id=f"c{next(_ids)}", event_time=t if t is not None else NOW, user_id=user, item_id=item)


def _rating(user, item, rating):
    return Rating(event_id=f"r{next(_ids)}", event_time=NOW, user_id=user, item_id=item, rating=rating)


def _global(ranker, *events):
    """What the interaction follower delivers from the clicks and ratings topics."""
    for ev in events:
        ranker.follower._deliver(ev)


def _req(user, k=10, **kw):
    return RecommendationRequest(event_id=f"q{next(_ids)}", event_time=NOW, user_id=user, k=k, **kw)


def _ids_of(ranked: Ranked):
    return [it.item_id for it in ranked.items]


def _counter(metric, **labels):
    return metric.labels(**labels)._value.get()


# --- construction ------------------------------------------------------------------------------


def test_the_ranker_registers_its_follower_and_learns_the_catalogue():
    ranker = _make()
    assert [t.__name__ for t in ranker.app.tasks] == ["follow_interactions"]
    assert all(src.n_items == len(ITEMS) for src in ranker.sources)
    assert ranker.lm_k == 100


# --- the blend before the correction has learnt ------------------------------------------------


async def test_before_feedback_the_lm_order_decides_with_co_visitation_as_tie_break():
    scorer = _Scorer(["a", "b", "c"])
    reader = _Reader(history={"u": ["x"]})
    ranker = _make(scorer, reader)
    # Other users who chose x also chose c (and only c); u chose x.
    _global(ranker, _click("o1", "x"), _click("o1", "c"), _click("o2", "x"), _click("o2", "c"), _click("u", "x"))

    ranked = await ranker.rank(_req("u", k=3))

    assert ranked.fallback is False
    assert (ranked.model_version, ranked.adapter_version, ranked.domain) == ("lm-test", "adapter-7", "default")
    # 0.7 * 1/(1 + lm rank) + 0.3 * itemknn / best itemknn: c (LM's third, 0.233 + 0.3) passes b (0.35).
    assert _ids_of(ranked) == ["a", "c", "b"]
    assert [it.score for it in ranked.items] == pytest.approx([0.7, 0.7 / 3 + 0.3, 0.35], abs=1e-6)
    reasons = {it.item_id: it.reason for it in ranked.items}
    assert reasons["a"] == "lm likes a"
    assert reasons["c"] == "people who chose your recent items also chose this"
    # The LM reads the Feast history and is told what to leave out.
    (call,) = scorer.calls
    assert call["history"] == [{"item_id": "x"}]
    assert call["exclude"] == ["x"]
    assert call["k"] == 100
    # What was shown is remembered with its features, for the feedback.
    assert set(ranker.shown["u"]["features"]) == {"a", "b", "c"}
    assert ranker.shown["u"]["rank"] == {"a": 0, "c": 1, "b": 2}


async def test_candidates_from_co_visitation_and_popularity_join_the_lms():
    scorer = _Scorer(["a"])
    ranker = _make(scorer, _Reader(history={"u": ["x"]}))
    _global(ranker, _click("o1", "x"), _click("o1", "y"), _click("u", "x"), _click("o3", "z"), _click("o4", "z"))
    ranked = await ranker.rank(_req("u", k=10))
    ids = _ids_of(ranked)
    assert ids[0] == "a"  # the LM's only item leads
    assert {"y", "z"} <= set(ids)  # co-visited and popular items are candidates too
    assert "x" not in ids


# --- exclusion of seen items ---------------------------------------------------------------------


async def test_seen_items_are_excluded_even_when_the_scorer_returns_them():
    scorer = _Scorer(["x", "a", "y", "b"])  # ignores the exclude list it is given
    reader = _Reader(history={"u": ["x"]})
    ranker = _make(scorer, reader)
    ranker.learn(_click("u", "y"))  # seen on this worker, not yet in the online store

    ranked = await ranker.rank(_req("u", k=10))
    assert scorer.calls[0]["exclude"] == ["x", "y"]
    assert "x" not in _ids_of(ranked) and "y" not in _ids_of(ranked)
    assert _ids_of(ranked)[:2] == ["a", "b"]

    kept = await ranker.rank(_req("u", k=10, exclude_seen=False))
    assert scorer.calls[1]["exclude"] == []
    assert _ids_of(kept)[:4] == ["x", "a", "y", "b"]


async def test_requested_candidates_are_ranked_without_the_seen_ones():
    scorer = _Scorer(["b", "a"])
    ranker = _make(scorer, _Reader(history={"u": ["c"]}))
    ranked = await ranker.rank(_req("u", k=10, candidates=["a", "c", "z", "b"]))
    # Only the candidates asked for, seen c dropped; the LM's order first, then the rest.
    assert _ids_of(ranked) == ["b", "a", "z"]
    assert ranked.items[2].score == 0.0


async def test_a_failed_feature_read_still_ranks_from_an_empty_history(caplog):
    scorer = _Scorer(["a", "b"])
    ranker = _make(scorer, _Reader(fail=True))
    with caplog.at_level(logging.ERROR, logger="driftrec.streams.ranking"):
        ranked = await ranker.rank(_req("u", k=2))
    assert ranked.fallback is False and _ids_of(ranked) == ["a", "b"]
    assert scorer.calls[0]["history"] == []
    assert "feature read failed" in caplog.text


# --- fallback ----------------------------------------------------------------------------------


async def test_scorer_unavailable_falls_back_to_popularity_flagged_and_counted():
    scorer = _Scorer(error=ScorerUnavailable("scorer_timeout", "no answer within 0.2s"))
    ranker = _make(scorer)
    _global(ranker, *[_click(f"o{n}", "b") for n in range(3)], *[_click(f"o{n}", "c") for n in range(2)],
            _click("o9", "d"))
    ranker.learn(_click("u", "b"))  # u has seen the most popular item
    before = _counter(metrics.FALLBACKS, reason="scorer_timeout")

    ranked = await ranker.rank(_req("u", k=2))

    assert ranked.fallback is True
    assert ranked.model_version == "popularity"
    assert _ids_of(ranked) == ["c", "d"]
    assert all(it.reason == "popular right now (scorer unavailable: scorer_timeout)" for it in ranked.items)
    assert ranked.items[0].score > ranked.items[1].score > 0
    assert _counter(metrics.FALLBACKS, reason="scorer_timeout") == before + 1
    assert "u" not in ranker.shown  # a fallback teaches the correction nothing


async def test_fallback_with_nothing_learnt_serves_the_newest_catalogue_items():
    ranker = _make(_Scorer(error=ScorerUnavailable("scorer_unavailable")))
    ranked = await ranker.rank(_req("u", k=3))
    assert ranked.fallback is True
    assert _ids_of(ranked) == ["z", "y", "x"]  # newest first
    assert {it.reason for it in ranked.items} == {"new in the catalogue"}


async def test_fallback_ranks_requested_candidates_by_popularity():
    ranker = _make(_Scorer(error=ScorerUnavailable("scorer_error")))
    _global(ranker, _click("o1", "a"), _click("o2", "z"), _click("o3", "z"))
    ranker.learn(_click("u", "y"))
    ranked = await ranker.rank(_req("u", k=5, candidates=["a", "y", "z", "b"]))
    assert ranked.fallback is True
    assert _ids_of(ranked) == ["z", "a", "b"]  # y was seen; b never chosen, last


async def test_plain_ranker_is_the_fallback():
    app = _App()
    ranker = Ranker(app)
    for n, i in enumerate(ITEMS):
        app.catalogue.add(i, event_time=NOW + n)
    ranker.learn(_click("o", "a"))
    ranker.learn(_rating("o", "b", 1.0))  # a dislike is not popularity
    ranked = await ranker.rank(_req("u", k=2))
    assert ranked.fallback is True
    assert [(it.item_id, it.reason) for it in ranked.items] == [("a", "popular right now"),
                                                                ("z", "new in the catalogue")]


# --- the River correction learning from feedback -----------------------------------------------


def _feedback_world():
    """The LM ranks a > b > c > d, but users always choose d, the best rated."""
    feats = {i: {"mean_rating": 1.0, "rating_count": 2, "click_count": 1, "popularity_now": 0.5} for i in "abc"}
    feats["d"] = {"mean_rating": 5.0, "rating_count": 2, "click_count": 1, "popularity_now": 0.5}
    return _make(_Scorer(["a", "b", "c", "d"]), _Reader(item_features=feats))


async def test_feedback_on_shown_items_teaches_the_correction():
    ranker = _feedback_world()
    await ranker.rank(_req("u1", k=4))
    ranker.learn(_click("u1", "d"))
    # The chosen item is a positive, up to three items shown beside it are negatives.
    assert ranker.corrector.n_learned == 4
    assert ranker.shown["u1"]["features"] == {}
    ranker.learn(_click("u1", "d"))  # the same feedback again teaches nothing more
    assert ranker.corrector.n_learned == 4
    assert len(ranker.errors) == 1

    await ranker.rank(_req("u2", k=4))
    ranker.learn(_rating("u2", "a", 1.0))  # a low rating on a shown item: one negative
    assert ranker.corrector.n_learned == 5
    assert set(ranker.shown["u2"]["features"]) == {"b", "c", "d"}

    ranker.learn(_click("stranger", "a"))  # feedback on nothing shown
    assert ranker.corrector.n_learned == 5


async def test_after_enough_feedback_the_correction_reorders_against_the_lm():
    ranker = _feedback_world()
    assert ranker.MIN_LEARNED == 100
    rounds = 0
    while ranker.corrector.n_learned + 4 < ranker.MIN_LEARNED:
        ranked = await ranker.rank(_req(f"u{rounds}", k=4))
        assert _ids_of(ranked) == ["a", "b", "c", "d"]  # still the blend: the LM's order
        assert [it.score for it in ranked.items] == pytest.approx([0.7, 0.35, 0.7 / 3, 0.175], abs=1e-6)
        ranker.learn(_click(f"u{rounds}", "d"))
        rounds += 1
    assert ranker.corrector.n_learned == 96

    # One more round crosses the threshold ...
    await ranker.rank(_req(f"u{rounds}", k=4))
    ranker.learn(_click(f"u{rounds}", "d"))
    assert ranker.corrector.n_learned == 100

    # ... and the learnt correction scores: the well-rated item the users keep choosing comes first.
    ranked = await ranker.rank(_req("new-user", k=4))
    assert ranked.fallback is False
    assert _ids_of(ranked)[0] == "d"
    scores = [it.score for it in ranked.items]
    assert all(0.0 < s < 1.0 for s in scores)
    assert scores == sorted(scores, reverse=True)
    assert ranker.errors and all(0.0 <= e <= 1.0 for e in ranker.errors)


# --- drift -------------------------------------------------------------------------------------


class _AlwaysDrift:
    drift_detected = True

    def update(self, x):
        return self


def test_drift_event_is_logged_with_its_update_and_count(caplog):
    ranker = _make()
    before = _counter(metrics.DRIFT_DETECTIONS, domain="default", detector="adwin")
    with caplog.at_level(logging.WARNING, logger="driftrec.streams.ranking"):
        ranker._on_drift(DriftEvent(name="river", update=250, count=2, error_mean=0.4))
    assert "drift in the correction error after 250 updates (#2)" in caplog.text
    assert _counter(metrics.DRIFT_DETECTIONS, domain="default", detector="adwin") == before + 1


async def test_drift_detected_while_learning_from_feedback_reaches_the_ranker(caplog):
    ranker = _feedback_world()
    monitor = ranker.corrector.monitor
    monitor.detector = _AlwaysDrift()
    monitor.min_updates = 1
    await ranker.rank(_req("u", k=4))
    before = _counter(metrics.DRIFT_DETECTIONS, domain="default", detector="adwin")
    with caplog.at_level(logging.INFO):
        ranker.learn(_click("u", "d"))  # 4 updates, each a detection
    assert "drift callback failed" not in caplog.text
    for n in range(1, 5):
        assert f"drift in the correction error after {n} updates (#{n})" in caplog.text
    assert _counter(metrics.DRIFT_DETECTIONS, domain="default", detector="adwin") == before + 4
    assert ranker.corrector.drift_count == 4


def test_online_quality_is_the_mean_of_its_window():
    """The running sums give the plain mean of the last ``window`` positives, however long the stream."""
    import math
    import random

    from driftrec.core import metrics
    from driftrec.streams.ranking import OnlineQuality

    rnd = random.Random(3)
    q = OnlineQuality(window=50)
    marks = []
    for _ in range(1237):
        rank = rnd.choice([None, None, 0, 3, 9, 10, 40])
        marks.append((1.0, 1.0 / math.log2(rank + 2)) if rank is not None and rank < 10 else (0.0, 0.0))
        hr, ndcg = q.add(rank)
        last = marks[-50:]
        assert hr == pytest.approx(sum(h for h, _ in last) / len(last), abs=1e-12)
        assert ndcg == pytest.approx(sum(g for _, g in last) / len(last), abs=1e-12)
    assert len(q) == 50
    q.publish()
    assert metrics.ONLINE_HR_AT_10.labels(model="served")._value.get() == pytest.approx(hr)
    assert OnlineQuality().means() == (0.0, 0.0)
