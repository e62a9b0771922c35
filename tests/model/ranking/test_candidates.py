"""Candidate sources: the seam's contract (every implementation) and each source's own behaviour."""

from __future__ import annotations

import math

import numpy as np
import pytest

from driftrec.model.ranking.sources import (
    ALL_SOURCES,
    CandidateSource,
    DecayedPopularitySource,
    ItemKNNSource,
    LMTextNeighbourSource,
    PopularitySource,
)

ITEMS = [f"i{n}" for n in range(8)]


def make(cls) -> CandidateSource:
    if cls is LMTextNeighbourSource:
        rng = np.random.default_rng(0)
        v = rng.normal(size=(len(ITEMS), 6))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return cls(ITEMS, v)
    return cls(ITEMS)


def feed(src: CandidateSource) -> None:
    stream = [("a", "i0"), ("a", "i1"), ("b", "i0"), ("b", "i2"), ("c", "i1"), ("c", "i2"), ("a", "i3")]
    for t, (u, i) in enumerate(stream):
        src.learn_one(u, i, 5.0, float(t))


@pytest.mark.parametrize("cls", ALL_SOURCES, ids=lambda c: c.__name__)
class TestContract:
    def test_is_a_source(self, cls):
        assert issubclass(cls, CandidateSource)
        assert make(cls).item_ids == ITEMS

    def test_score_all_aligned(self, cls):
        src = make(cls)
        feed(src)
        scores = src.score_all("a")
        assert isinstance(scores, np.ndarray) and scores.shape == (len(ITEMS),)
        assert np.all(np.isfinite(scores))

    def test_candidates_exclude_seen_and_excluded(self, cls):
        src = make(cls)
        feed(src)
        got = src.candidates("a", n=10, exclude=["i7"])
        ids = [i for i, _ in got]
        assert not set(ids) & {"i0", "i1", "i3", "i7"}
        assert len(ids) == len(set(ids)) == len(ITEMS) - 4
        scores = [s for _, s in got]
        assert scores == sorted(scores, reverse=True)

    def test_candidates_n_and_unknown_user(self, cls):
        src = make(cls)
        feed(src)
        assert len(src.candidates("a", n=2)) == 2
        assert src.candidates("a", n=0) == []
        assert len(src.candidates("nobody", n=3)) == 3

    def test_new_item_grows_catalogue(self, cls):
        src = make(cls)
        feed(src)
        src.learn_one("z", "brand-new", 4.0, 100.0)
        assert "brand-new" in src.item_ids
        assert src.score_all("a").shape == (len(ITEMS) + 1,)
        assert "brand-new" in src.seen("z")

    def test_deterministic(self, cls):
        a, b = make(cls), make(cls)
        feed(a)
        feed(b)
        assert a.candidates("c", n=5) == b.candidates("c", n=5)

    def test_history_order(self, cls):
        src = make(cls)
        feed(src)
        assert src.history("a") == ["i0", "i1", "i3"]


def test_popularity_counts():
    src = PopularitySource(ITEMS)
    feed(src)
    assert src.candidates("new", n=3) == [("i0", 2.0), ("i1", 2.0), ("i2", 2.0)]


def test_decayed_popularity_half_life():
    src = DecayedPopularitySource(["x", "y"], half_life_s=10.0)
    src.learn_one("u", "x", 5, 0.0)
    src.learn_one("v", "y", 5, 10.0)
    s = src.score_all("w", ts=10.0)
    assert s[0] == pytest.approx(0.5) and s[1] == pytest.approx(1.0)
    s = src.score_all("w", ts=20.0)
    assert s[0] == pytest.approx(0.25) and s[1] == pytest.approx(0.5)
    # far in the future the reference time moves, values stay finite and ordered
    src.learn_one("v", "x", 5, 10_000.0)
    s = src.score_all("w", ts=10_000.0)
    assert math.isfinite(s[0]) and s[0] == pytest.approx(1.0) and s[1] < 1e-100


def test_itemknn_cosine_and_recency():
    src = ItemKNNSource(["a", "b", "c", "d"])
    for u in ("u1", "u2", "u3"):
        src.learn_one(u, "a", 5, 0)
        src.learn_one(u, "b", 5, 1)
    src.learn_one("u4", "c", 5, 2)
    src.learn_one("u4", "d", 5, 3)
    # a and b always co-occur: cosine 1
    assert src.neighbours("a", 1) == [("b", pytest.approx(1.0))]
    src.learn_one("me", "a", 5, 4)
    assert src.candidates("me", n=1)[0][0] == "b"
    # user-side recency weighting favours the neighbours of the latest item
    rec = ItemKNNSource(["a", "b", "c", "d"], user_decay=0.5)
    for u, seq in {"u1": "ab", "u2": "ab", "u3": "cd"}.items():
        for t, i in enumerate(seq):
            rec.learn_one(u, i, 5, t)
    rec.learn_one("me", "a", 5, 10)
    rec.learn_one("me", "c", 5, 11)
    assert rec.candidates("me", n=1)[0][0] == "d"


def test_lm_neighbours_scores_cold_items():
    v = np.eye(4, dtype=np.float32)
    v[1] = [0.9, 0.1, 0, 0]
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    src = LMTextNeighbourSource(["a", "b", "c", "d"], v)
    src.learn_one("me", "a", 5, 0)
    # b was never interacted with but its text is close to a's
    assert src.candidates("me", n=1)[0][0] == "b"
    src.set_item_vectors(["c"], np.array([[1.0, 0, 0, 0]]))
    assert src.candidates("me", n=1)[0][0] == "c"
