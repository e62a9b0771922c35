"""The knowledge model's trainer (``model/knowledge/seqrec.py``) on a small synthetic world: a trainer
draws its training randomness from its own stream, so what other models train in the same process in
between (the evaluation's ablations and baselines, one after another) does not change its weights.
"""

from __future__ import annotations

import pytest
import torch

from driftrec.model.evaluation.world import World
from driftrec.model.knowledge.seqrec import KnowledgeTrainer


@pytest.fixture(scope="module")
def world():
    w = World(n_users=60, n_items=80, seed=11)
    items = {it.item_id: it for it in w.items}
    hist: dict[str, list] = {}
    for ev in w.events(3000):
        r = getattr(ev, "rating", None)
        hist.setdefault(ev.user_id, []).append((ev.item_id, 5.0 if r is None else float(r)))
    return items, list(hist.items())


SMALL = dict(dim=16, blocks=1, init_epochs=3, epochs=1, batch_size=16)


def _weights(trainer: KnowledgeTrainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.net.parameters()]


def test_a_fit_does_not_depend_on_other_models_training_in_between(world):
    items, hist = world
    alone = KnowledgeTrainer(items, list(items), text=False, seed=3, **SMALL)
    alone.fit(hist, initial=True)
    alone.fit(hist)
    beside = KnowledgeTrainer(items, list(items), text=False, seed=3, **SMALL)
    other = KnowledgeTrainer(items, list(items), text=False, seed=4, **SMALL)
    beside.fit(hist, initial=True)
    other.fit(hist, initial=True)  # draws dropout masks from the global generator's position ...
    torch.rand(1000)  # ... and so does anything else in the process
    beside.fit(hist)
    for a, b in zip(_weights(alone), _weights(beside)):
        assert torch.equal(a, b)
    # the stream is the trainer's: another seed trains other weights
    assert not all(torch.equal(a, b) for a, b in zip(_weights(alone), _weights(other)))
