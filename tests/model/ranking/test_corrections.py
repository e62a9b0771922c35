"""Correctors: the seam's contract (every implementation), online learning and drift detection."""

from __future__ import annotations

import random

import numpy as np
import pytest

from driftrec.model.ranking.corrections import ALL_CORRECTORS, Corrector, DriftEvent, DriftMonitor, LinearBlendCorrector, RiverCorrector


def make(cls) -> Corrector:
    if cls is LinearBlendCorrector:
        return cls({"a": 1.0, "b": -0.5}, min_updates=50)
    return cls(min_updates=50)


def planted(n: int, seed: int = 0, flip: bool = False):
    rng = random.Random(seed)
    for _ in range(n):
        x = {"a": rng.gauss(0, 1), "b": rng.gauss(0, 1), "noise": rng.gauss(0, 1)}
        y = 1.0 if x["a"] - 0.5 * x["b"] + rng.gauss(0, 0.3) > 0 else 0.0
        yield x, (1.0 - y if flip else y)


@pytest.mark.parametrize("cls", ALL_CORRECTORS, ids=lambda c: c.__name__)
class TestContract:
    def test_is_a_corrector(self, cls):
        assert issubclass(cls, Corrector)

    def test_predict_before_learning(self, cls):
        p = make(cls).predict_one({"a": 1.0, "b": 2.0})
        assert isinstance(p, float) and 0.0 <= p <= 1.0

    def test_learn_one_returns_error_and_counts(self, cls):
        c = make(cls)
        for x, y in planted(20):
            err = c.learn_one(x, y)
            assert 0.0 <= err <= 1.0
        assert c.n_learned == 20
        assert c.drift_count == 0 and c.drift_detected is False

    def test_predict_many_matches_predict_one(self, cls):
        c = make(cls)
        for x, y in planted(300):
            c.learn_one(x, y)
        names = ["a", "b", "noise"]
        X = np.random.default_rng(1).normal(size=(25, 3))
        many = c.predict_many(X, names)
        one = [c.predict_one(dict(zip(names, map(float, row)))) for row in X]
        assert many.shape == (25,)
        np.testing.assert_allclose(many, one, rtol=1e-6, atol=1e-9)

    def test_on_drift_hook_called_by_its_monitor(self, cls):
        c = make(cls)
        seen: list[DriftEvent] = []
        c.on_drift(seen.append)
        for e in [0.0] * 1000 + [1.0] * 300:
            c.monitor.update(e)
        assert seen and c.drift_count == len(seen) >= 1
        assert seen[0].name == c.name and seen[0].update > 1000


def ranking_examples(n: int, seed: int = 0, size: int = 7):
    """Ranking examples over features (a, b, noise): the liked item (row 0) has the highest a - 0.5 b."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        X = rng.normal(size=(size, 3))
        yield X[np.argsort(-(X[:, 0] - 0.5 * X[:, 1]))]


@pytest.mark.parametrize("cls", ALL_CORRECTORS, ids=lambda c: c.__name__)
def test_learn_group_ranks_the_liked_item_first(cls):
    """The policy's learning step (the liked item against the items it was ranked against): a learning
    corrector puts the liked item first far above chance (1/7) afterwards; the fixed blend learns nothing
    but must accept the call."""
    names = ["a", "b", "noise"]
    c = make(cls)
    for X in ranking_examples(2000):
        c.learn_group(X, names)
    top1 = np.mean([np.argmax(c.predict_many(X, names)) == 0 for X in ranking_examples(300, seed=9)])
    if cls is LinearBlendCorrector:
        assert c.n_learned == 2000 * 12
    else:
        assert top1 > 0.7


def test_river_corrector_learns_planted_signal():
    c = RiverCorrector(min_updates=10**9)
    errors = [c.learn_one(x, y) for x, y in planted(3000)]
    early, late = np.mean(errors[:200]), np.mean(errors[-500:])
    assert late < early - 0.15
    # the planted weights' signs are recovered, the noise feature stays small
    w = c.weights()
    assert w["a"] > 0 > w["b"] and abs(w["noise"]) < 0.5 * abs(w["a"])


def test_drift_monitor_fires_on_abrupt_change_only_after_warm_up():
    rng = np.random.default_rng(0)
    stationary = DriftMonitor(min_updates=500)
    for e in rng.binomial(1, 0.2, 4000):
        stationary.update(float(e))
    assert stationary.drift_count == 0

    changing = DriftMonitor(min_updates=500)
    fired_at = []
    changing.on_drift(lambda ev: fired_at.append(ev.update))
    for e in rng.binomial(1, 0.1, 2000):
        changing.update(float(e))
    assert changing.drift_count == 0
    for e in rng.binomial(1, 0.7, 1000):
        changing.update(float(e))
    assert changing.drift_count >= 1
    assert fired_at and 2000 < fired_at[0] < 2300


def test_drift_ignored_during_warm_up():
    mon = DriftMonitor(min_updates=10_000)
    for e in [0.0] * 300 + [1.0] * 300:
        mon.update(e)
    assert mon.drift_count == 0 and not mon.drift_detected


def test_corrector_drift_on_concept_flip_calls_callbacks():
    c = RiverCorrector(min_updates=500)
    events: list[DriftEvent] = []
    c.on_drift(events.append)
    for x, y in planted(2000, seed=1):
        c.learn_one(x, y)
    assert c.drift_count == 0
    for x, y in planted(1000, seed=2, flip=True):
        c.learn_one(x, y)
    assert c.drift_count >= 1 and events and events[0].name == "river"


def test_failing_callback_does_not_break_learning():
    mon = DriftMonitor(min_updates=0)

    def boom(ev):
        raise RuntimeError("listener bug")

    mon.on_drift(boom)
    for e in [0.0] * 1000 + [1.0] * 500:
        mon.update(e)
    assert mon.drift_count >= 1


def test_river_corrector_group_fast_path_is_rivers_own_arithmetic():
    """RiverCorrector.learn_group (plain floats on River's state) against the generic path through
    River's Pipeline.learn_one, example by example: same scaler statistics, weights, intercept, iteration
    count and drift detections (drift in the data halfway), up to float summation order."""
    from driftrec.model.base import Corrector
    from driftrec.model.ranking.corrections import RiverCorrector

    rng = np.random.default_rng(0)
    names = [f"f{j}" for j in range(14)]
    fast = RiverCorrector(learning_rate=0.005, min_updates=50)
    river = RiverCorrector(learning_rate=0.005, min_updates=50)
    for t in range(3000):
        X = rng.normal(size=(7, 14)) * rng.uniform(0.1, 5, size=14)
        X[:, 3] = 1.0  # a constant feature: zero variance, standardised to 0
        if t > 1500:
            X[0] += 0.8
        fast.learn_group(X, names)
        Corrector.learn_group(river, X, names)
    (fs, fl), (rs, rl) = fast._linear_parts(), river._linear_parts()
    for n in names:
        assert fast.weights()[n] == pytest.approx(river.weights()[n], rel=1e-9, abs=1e-12)
        assert fs.means[n] == pytest.approx(rs.means[n], rel=1e-12) and fs.vars[n] == pytest.approx(rs.vars[n], rel=1e-12)
    assert fl.intercept == pytest.approx(rl.intercept, abs=1e-12)
    assert fl.optimizer.n_iterations == rl.optimizer.n_iterations == fast.n_learned == river.n_learned == 36000
    assert fast.drift_count == river.drift_count > 0
    X = rng.normal(size=(50, 14))
    np.testing.assert_allclose(fast.predict_many(X, names), river.predict_many(X, names), rtol=1e-9)
