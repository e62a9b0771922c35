"""Example building, augmentation, the online monitor and the recovery measure (no model needed)."""

from __future__ import annotations

import math
import random

from driftrec.model.base import HistoryEntry
from driftrec.model.evaluation.drift_experiment import recovery_events
from driftrec.model.training.gate import Gate, OnlineMonitor
from driftrec.model.training.examples import MASK_TOKEN, ExampleBuilder, augment_history, build_training_set
from driftrec.model.training.worker import split_context
from tests.trainer_support import tiny_world


def test_examples_use_history_before_the_event_and_hard_negatives():
    world = tiny_world()
    items = {it.item_id: it for it in world.items}
    b = ExampleBuilder(items.get, hard_negatives=2)
    ids = [it.item_id for it in world.items]
    assert b.add({"type": "click", "user_id": "u1", "item_id": ids[0], "event_time": 1.0})[0].user_text.startswith("A new user")
    b.observe_recommendation({"user_id": "u1", "request_id": "q1", "items": [{"item_id": i} for i in ids[1:5]]})
    [ex] = b.add({"type": "rating", "user_id": "u1", "item_id": ids[2], "rating": 5, "event_time": 2.0,
                  "recommendation_id": "q1"})
    assert ex.positive and ex.rating == 5 and items[ids[0]].title in ex.user_text
    assert ex.item_text == items[ids[2]].text()
    assert ex.hard_negatives == (items[ids[1]].text(), items[ids[3]].text())
    [low] = b.add({"type": "rating", "user_id": "u1", "item_id": ids[6], "rating": 2, "event_time": 3.0})
    assert not low.positive and low.hard_negatives == ()
    assert b.add({"type": "click", "user_id": "u1", "item_id": "unknown", "event_time": 4.0}) == []


def test_holdout_is_newest_and_augmentation_only_in_training():
    world = tiny_world()
    items = {it.item_id: it for it in world.items}
    events = list(world.events(200))
    tset = build_training_set(events, ExampleBuilder(items.get, augment=True, augment_prob=1.0), holdout_frac=0.25)
    assert tset.window["events"] == 200 and tset.holdout
    assert min(c.event_index for c in tset.holdout) >= 150
    assert len(tset.examples) > 150  # augmented copies added


def test_augment_history_kinds():
    rng = random.Random(0)
    hist = tuple(HistoryEntry(f"i{n}") for n in range(8))
    dropped, _ = augment_history(hist, rng, "dropout", rate=0.5)
    assert 1 <= len(dropped) < 8 and set(h.item_id for h in dropped) <= {h.item_id for h in hist}
    reordered, _ = augment_history(hist, rng, "reorder", rate=0.5)
    assert sorted(h.item_id for h in reordered) == sorted(h.item_id for h in hist) and reordered != hist
    masked, _ = augment_history(hist, rng, "mask", rate=0.5)
    assert any(h.item_id == MASK_TOKEN for h in masked) and len(masked) == 8


def test_gate_and_online_monitor():
    gate = Gate(0.02)
    assert gate.decide({"hr@10": 0.49, "ndcg@10": 0.3, "n": 10}, {"hr@10": 0.5, "ndcg@10": 0.3}).promote
    assert not gate.decide({"hr@10": 0.4, "ndcg@10": 0.3, "n": 10}, {"hr@10": 0.5, "ndcg@10": 0.3}).promote
    assert not gate.decide({"hr@10": 0.9, "ndcg@10": 0.9, "n": 0}, {"hr@10": 0.5, "ndcg@10": 0.3}).promote
    mon = OnlineMonitor(window=50, min_updates=30)
    fired = []
    mon.on_drift(fired.append)
    for n in range(200):
        mon.record("v1", 1.0 if n % 10 < 8 else 0.0)
    for n in range(200):
        mon.record("v2", 0.0)
    assert fired, "ADWIN on the online error should fire after the drop"
    assert mon.metrics("v2")[0] == 0.0 and mon.metrics("v2")[2] == 50


def test_recovery_events_and_split_context():
    series = [{"start": s, "end": s + 100, "hr": v} for s, v in zip(range(0, 1000, 100), [.5, .5, .1, .2, .3, .46, .47, .5, .5, .5])]
    assert recovery_events(series, 200, 0.5, 0.9, 2, "hr") == 500  # (.46 + .47) / 2 >= .45 at event 700
    assert recovery_events(series, 200, 0.9, 0.9, 2, "hr") is None
    assert recovery_events(series, 200, math.nan, 0.9, 2, "hr") is None
    evs = [{"type": "click"}, {"type": "recommendation"}, {"type": "click"}, {"type": "rating"}]
    ctx, win = split_context(evs, 2)
    assert ctx == evs[:1] and win == evs[1:]  # the recommendation shown before the window stays with it
    assert split_context(evs, 5) == ([], evs)
