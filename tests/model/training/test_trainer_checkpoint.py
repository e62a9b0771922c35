"""A trainer run produces a valid checkpoint the scorer loads; training resumes after a restart."""

from __future__ import annotations

import json

import pytest
import torch

from driftrec.core import metrics
from driftrec.model.adapters import AdapterRegistry, verify_checkpoint
from tests.trainer_support import make_worker, one_torch_thread, tiny_world, trainer_settings


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def _counter(c, **labels) -> float:
    return c.labels(**labels)._value.get()


def test_run_produces_checkpoint_the_scorer_serves(tmp_path):
    from driftrec.model.serving.scorer import LMScorer
    from tests.scorer_support import base_model_and_tokenizer

    world = tiny_world()
    settings = trainer_settings(tmp_path / "adapters", gate_tolerance=1.0, multitask=True, adversarial_eps=0.5,
                                augment=True)
    worker = make_worker(settings, world)
    assert worker.serving_version == "base"
    promoted_before = _counter(metrics.TRAINER_RUNS, outcome="promoted")
    result = worker.run_once(list(world.events(160)))
    assert result.outcome == "promoted", result
    assert result.stats["steps"] == 2 and result.examples >= 4 and result.holdout >= 1
    assert _counter(metrics.TRAINER_RUNS, outcome="promoted") == promoted_before + 1
    version = result.version
    ckpt = verify_checkpoint(tmp_path / "adapters" / "default" / version, tmp_path / "adapters")
    assert ckpt.manifest["parent"] == "base" and "hr@10" in ckpt.manifest["metrics"]
    assert ckpt.manifest["training_window"]["events"] == 160
    assert AdapterRegistry(tmp_path / "adapters").active("default") == version
    [ann] = result.announcements
    assert (ann.action, ann.version, ann.domain) == ("activate", version, "default")

    base, tok = base_model_and_tokenizer()
    scorer = LMScorer(settings, base_model=base, tokenizer=tok)
    try:
        scorer.catalogue.upsert(world.items)
        scorer.start()
        snap = scorer.activate("default", version)
        assert snap.adapter_version == version
        from driftrec.model.base import HistoryEntry, UserContext

        res = scorer.score(UserContext("u1", (HistoryEntry(world.items[0].item_id, None),)), [it.item_id for it in world.items[:5]])
        assert res.adapter_version == version and len(res.scores) == 5
        assert all(torch.isfinite(torch.tensor(res.scores)))
    finally:
        scorer.close()


def test_training_resumes_from_last_active_checkpoint(tmp_path):
    world = tiny_world(seed=5)
    settings = trainer_settings(tmp_path / "adapters", gate_tolerance=1.0)
    events = list(world.events(300))
    first = make_worker(settings, world)
    r1 = first.run_once(events[:150])
    assert r1.outcome == "promoted" and r1.version == "v00001"
    saved = {k: v.clone() for k, v in first.trainer.lora_state().items()}
    del first

    # A restart: a new worker object on the same adapter dir picks the active version and continues.
    second = make_worker(settings, world)
    assert second.serving_version == "v00001"
    assert second.trainer.parent_version == "v00001"
    for k, v in second.trainer.lora_state().items():
        assert torch.equal(v, saved[k]), k
    r2 = second.run_once(events[150:])
    assert r2.outcome == "promoted" and r2.version == "v00002"
    manifest = json.loads((tmp_path / "adapters" / "default" / "v00002" / "manifest.json").read_text())
    assert manifest["parent"] == "v00001"
    reg = AdapterRegistry(tmp_path / "adapters")
    assert reg.active("default") == "v00002" and reg.previous("default") == "v00001"
