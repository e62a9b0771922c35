"""The trainer core: a small incremental LoRA update changes the adapter's embeddings and lowers the loss.

Uses the packaged local MiniLM weights (no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from driftrec.model.evaluation.movielens import make_item
from driftrec.model.text import render_user_text
from driftrec.model.training.trainer import Trainer, TrainingExample

GENRES = ["Action", "Comedy", "Drama", "Horror", "Sci-Fi"]


@pytest.fixture(scope="module")
def trainer():
    torch.set_num_threads(2)
    return Trainer(max_steps=8, batch_size=10, learning_rate=3e-3, replay_buffer=100, negatives=4,
                   device="cpu", seed=0)


def examples():
    items = [make_item(str(n), f"Film {n}", [GENRES[n % 5]], 1980 + n) for n in range(20)]
    out = []
    for n, it in enumerate(items):
        hist = [(items[(n + 7) % 20], 5.0), (items[(n + 3) % 20], 4.0)]
        out.append(TrainingExample(render_user_text(hist), it.text()))
    return items, out


def test_render_user_text_newest_first():
    a, b = make_item("1", "Alien", ["Sci-Fi"], 1979), make_item("2", "Heat", ["Crime"], 1995)
    text = render_user_text([(a, 5.0), (b, 3.0)])
    assert text.index("Heat (1995)") < text.index("Alien (1979)")
    assert "rated 5" in text and "[Sci-Fi]" in text
    assert render_user_text([]) == "new user"


def test_update_changes_embeddings_and_lowers_loss(trainer):
    items, exs = examples()
    trainer.negative_pool = [it.text() for it in items]
    before_vec = trainer.embed_items(items[:5])
    before = trainer.loss(exs)
    stats = trainer.update(exs)
    after = trainer.loss(exs)
    after_vec = trainer.embed_items(items[:5])
    assert 1 <= stats.steps <= 8 and stats.examples == 20 and stats.version == 1
    assert after < before
    assert not np.allclose(before_vec, after_vec)
    np.testing.assert_allclose(np.linalg.norm(after_vec, axis=1), 1.0, atol=1e-3)
    assert len(trainer.replay) == 20
    # the next update continues from the current adapter and mixes in replayed examples
    stats2 = trainer.update(exs[:4], max_steps=2)
    assert stats2.version == 2 and stats2.steps == 2 and stats2.replayed > 0
    assert trainer.embed_users([exs[0].user_text]).shape == (1, before_vec.shape[1])


def test_save_checkpoint(trainer, tmp_path):
    path = trainer.save(tmp_path, "default", "v-test")
    assert (path / "adapter_model.safetensors").is_file() and (path / "manifest.json").is_file()
