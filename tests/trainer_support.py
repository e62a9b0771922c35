"""Shared helpers for the trainer tests: tiny settings, a tiny world, one base model per process."""

from __future__ import annotations

from pathlib import Path

from driftrec.core.settings import Settings
from driftrec.model.evaluation.world import World
from tests.scorer_support import base_model_and_tokenizer

MAX_LENGTH = 32


def trainer_settings(adapter_dir: Path, **trainer: object) -> Settings:
    values = {"max_steps": 2, "batch_size": 8, "min_examples": 4, "negatives": 4, "hard_negatives": 2,
              "user_max_length": MAX_LENGTH, "item_max_length": MAX_LENGTH, "window_events": 400,
              "replay_buffer": 64, "rollback_min_count": 20}
    values.update(trainer)
    return Settings(
        model={"adapter_dir": str(adapter_dir), "device": "cpu", "dtype": "float32", "max_length": MAX_LENGTH},
        trainer=values,
    )


def tiny_world(seed: int = 3, shift_at: int | None = None) -> World:
    return World(n_users=24, n_items=32, seed=seed, shift_at=shift_at)


def make_worker(settings: Settings, world: World, **kw):
    from driftrec.model.training.worker import TrainingWorker

    base, tok = base_model_and_tokenizer()
    return TrainingWorker(settings, items=world.items, encoder=base, tokenizer=tok, **kw)


def one_torch_thread():
    """Context: torch on one intra-op thread (much faster than two on a busy 2-core CPU), restored after."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def _ctx():
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return _ctx()
