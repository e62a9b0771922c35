"""The gate refuses a bad candidate; a promotion that does worse online is rolled back."""

from __future__ import annotations

import random

import pytest

from driftrec.core import metrics
from driftrec.model.adapters import AdapterRegistry
from driftrec.model.training.examples import DriftExample, build_training_set
from tests.trainer_support import make_worker, one_torch_thread, tiny_world, trainer_settings


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def _counter(c, **labels) -> float:
    return c.labels(**labels)._value.get()


@pytest.mark.faults  # issue 9 fault suite
def test_gate_rejects_candidate_trained_on_shuffled_labels(tmp_path):
    world = tiny_world(seed=11)
    settings = trainer_settings(tmp_path / "adapters", max_steps=6, learning_rate=0.01, gate_tolerance=0.0,
                                replay_buffer=0, hard_negatives=0, negatives=0)
    worker = make_worker(settings, world)
    tset = build_training_set(list(world.events(400)), worker.builder(), holdout_frac=0.25)
    assert len(tset.holdout) >= 20
    # Shuffled labels: every user text paired with a random item of another genre than the one chosen.
    rng = random.Random(0)
    by_genre = {}
    for it in world.items:
        by_genre.setdefault(it.genres[0], []).append(it.text())
    genres = sorted(by_genre)
    bad = []
    for ex in tset.examples:
        wrong = [g for g in genres if g not in ex.item_text]
        bad.append(DriftExample(ex.user_text, rng.choice(by_genre[rng.choice(wrong)])))
    before = worker.trainer.lora_state()
    rejects = _counter(metrics.GATE_DECISIONS, decision="reject")
    result = worker.train_and_gate(bad, tset.holdout, trigger="test")
    assert result.outcome == "rejected", result.decision
    assert result.decision["candidate"]["hr@10"] < result.decision["serving"]["hr@10"]
    assert _counter(metrics.GATE_DECISIONS, decision="reject") == rejects + 1
    assert AdapterRegistry(tmp_path / "adapters").versions("default") == []
    assert not result.announcements and worker.serving_version == "base"
    # The trainer is back on the serving weights.
    for k, v in worker.trainer.lora_state().items():
        assert (v == before[k]).all(), k


def _recommendation(user, items, version, t):
    return {"type": "recommendation", "event_id": f"r-{user}-{t}", "event_time": t, "request_id": f"q-{user}-{t}",
            "user_id": user, "items": [{"item_id": i, "score": 1.0} for i in items], "adapter_version": version}


@pytest.mark.faults  # issue 9 fault suite
def test_promotion_with_worse_online_metrics_is_rolled_back(tmp_path):
    world = tiny_world(seed=13)
    settings = trainer_settings(tmp_path / "adapters", gate_tolerance=1.0, rollback_min_count=20)
    worker = make_worker(settings, world)
    r1 = worker.run_once(list(world.events(150)))
    r2 = worker.run_once(list(world.events(150, seed=99)))
    assert (r1.outcome, r2.outcome) == ("promoted", "promoted")
    reg = worker.registry
    assert reg.active("default") == "v00002" and reg.previous("default") == "v00001"
    ids = [it.item_id for it in world.items]
    t = 2e9
    # v00001 served well (every feedback hit the list) ...
    for n in range(30):
        worker.observe(_recommendation(f"u{n % 5}", ids[:10], "v00001", t + n))
        worker.observe({"type": "click", "event_id": f"c1-{n}", "event_time": t + n + 0.5, "user_id": f"u{n % 5}",
                        "item_id": ids[n % 10]})
    assert worker.check_rollback() is None  # v00002 has no online data yet
    # ... v00002 does not (feedback outside the shown lists).
    for n in range(19):
        worker.observe(_recommendation(f"u{n % 5}", ids[:10], "v00002", t + 100 + n))
        worker.observe({"type": "click", "event_id": f"c2-{n}", "event_time": t + 100 + n + 0.5,
                        "user_id": f"u{n % 5}", "item_id": ids[20]})
    assert worker.check_rollback() is None  # below the minimum count
    worker.observe(_recommendation("u0", ids[:10], "v00002", t + 200))
    worker.observe({"type": "rating", "event_id": "c2-last", "event_time": t + 200.5, "user_id": "u0",
                    "item_id": ids[21], "rating": 5.0})
    rollbacks = _counter(metrics.ROLLBACKS, domain="default")
    ann = worker.check_rollback()
    assert ann is not None and ann.action == "rollback" and ann.version == "v00001"
    assert _counter(metrics.ROLLBACKS, domain="default") == rollbacks + 1
    assert AdapterRegistry(tmp_path / "adapters").active("default") == "v00001"
    assert worker.serving_version == "v00001" and worker.trainer.parent_version == "v00001"
    assert worker.check_rollback() is None  # decided once
