"""The trainer core: incremental LoRA fine-tuning of the LM text tower as a two-tower recommender.

A training example is a pair (user text, item text): the user's recent history rendered as text
(newest first, titles, genres and ratings; :func:`render_user_text`) and the text of the item they went
on to like (``Item.text()``). Both towers are the same LoRA-wrapped encoder (shared weights, masked mean
pooling + L2 norm from :mod:`driftrec.model.lm`). The loss is InfoNCE: each user text against its own item,
the other items of the batch (in-batch negatives) and ``negatives`` extra items sampled from the
catalogue.

:meth:`Trainer.update` runs a bounded number of optimizer steps on the new examples mixed with a
replay buffer of older ones (so the adapter does not forget), continuing from the current adapter.
On CPU it uses bf16 autocast where the CPU supports bf16. The model is created with
:func:`driftrec.model.adapters.create_lora_model` (so trainer and scorer agree on the LoRA layout) and saved
with :func:`driftrec.model.adapters.save_checkpoint`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from driftrec.model.lm import choose_device, cpu_supports_bf16, embed_texts, load_encoder, load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingExample:
    user_text: str
    item_text: str


@dataclass
class UpdateStats:
    steps: int = 0
    examples: int = 0
    replayed: int = 0
    loss_first: float = float("nan")
    loss_last: float = float("nan")
    loss_mean: float = float("nan")
    seconds: float = 0.0
    version: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class Trainer:
    """Incremental LoRA fine-tuning of the shared text tower."""

    def __init__(
        self,
        settings=None,
        *,
        encoder=None,
        tokenizer=None,
        max_steps: int | None = None,
        batch_size: int | None = None,
        learning_rate: float | None = None,
        replay_buffer: int | None = None,
        negatives: int = 16,
        temperature: float = 0.05,
        user_max_length: int = 96,
        item_max_length: int = 40,
        negative_pool: Sequence[str] = (),
        device: str | None = None,
        seed: int = 0,
    ) -> None:
        from driftrec.model.adapters import create_lora_model

        ts = getattr(settings, "trainer", None)
        ms = getattr(settings, "model", None)
        self.max_steps = int(max_steps if max_steps is not None else (ts.max_steps if ts else 50))
        self.batch_size = int(batch_size if batch_size is not None else (ts.batch_size if ts else 32))
        self.learning_rate = float(learning_rate if learning_rate is not None else (ts.learning_rate if ts else 5e-4))
        self.replay_capacity = int(replay_buffer if replay_buffer is not None else (ts.replay_buffer if ts else 5000))
        self.negatives = int(negatives)
        self.temperature = float(temperature)
        self.user_max_length = user_max_length
        self.item_max_length = item_max_length
        self.negative_pool = list(negative_pool)
        self._rng = random.Random(seed)
        torch.manual_seed(seed)

        # Train in float32 weights; bf16 only through autocast (stable optimizer state).
        dev = device or (ms.device if ms else "auto")
        self.plan = choose_device(dev, "float32")
        if encoder is None:
            encoder = load_encoder(ms.model_path if ms and ms.model_path else None, self.plan)
        else:
            encoder = encoder.float()
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(ms.model_path if ms and ms.model_path else None)
        self.model = create_lora_model(
            encoder,
            settings,
            r=ms.lora_r if ms else 8,
            alpha=ms.lora_alpha if ms else 16,
            dropout=ms.lora_dropout if ms else 0.05,
            copy_base=True,
        )
        self.model.to(self.plan.device)
        self.model.eval()
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self._params, lr=self.learning_rate, weight_decay=0.0)
        self.autocast = (self.plan.device.type == "cuda") or cpu_supports_bf16()
        self.replay: list[TrainingExample] = []
        self._seen_examples = 0
        self.version = 0
        self.history: list[UpdateStats] = []

    # ----------------------------------------------------------------------------- helpers

    def _autocast(self):
        return torch.autocast(self.plan.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def _remember(self, examples: Sequence[TrainingExample]) -> None:
        """Reservoir sampling into the replay buffer (uniform over everything ever seen)."""
        cap = self.replay_capacity
        for ex in examples:
            self._seen_examples += 1
            if cap <= 0:
                continue
            if len(self.replay) < cap:
                self.replay.append(ex)
            else:
                j = self._rng.randrange(self._seen_examples)
                if j < cap:
                    self.replay[j] = ex

    def _loss(self, batch: Sequence[TrainingExample], negatives: Sequence[str]) -> torch.Tensor:
        users = [ex.user_text for ex in batch]
        items = [ex.item_text for ex in batch]
        # Distinct item texts: a repeated positive must not count as its own negative.
        uniq: dict[str, int] = {}
        for t in list(items) + list(negatives):
            uniq.setdefault(t, len(uniq))
        targets = torch.tensor([uniq[t] for t in items], device=self.plan.device)
        with self._autocast():
            u = embed_texts(self.model, self.tokenizer, users, batch_size=len(users) or 1,
                            max_length=self.user_max_length, grad=True)
            v = embed_texts(self.model, self.tokenizer, list(uniq), batch_size=len(uniq) or 1,
                            max_length=self.item_max_length, grad=True)
        logits = (u.float() @ v.float().T) / self.temperature
        return torch.nn.functional.cross_entropy(logits, targets)

    def _sample_negatives(self, k: int) -> list[str]:
        if not self.negative_pool or k <= 0:
            return []
        return self._rng.sample(self.negative_pool, min(k, len(self.negative_pool)))

    # ------------------------------------------------------------------------------ public

    def loss(self, examples: Sequence[TrainingExample]) -> float:
        """The contrastive loss on ``examples`` (in-batch negatives only), without learning."""
        self.model.eval()
        with torch.no_grad():
            return float(self._loss(list(examples), []))

    def update(self, examples: Iterable[TrainingExample], *, max_steps: int | None = None) -> UpdateStats:
        """A bounded incremental update on new ``examples`` plus replayed old ones.

        Each step takes up to half the batch from the new examples (cycling through them in a random
        order) and fills the rest from the replay buffer; at most ``max_steps`` steps, and no more
        than about two passes over the new examples.
        """
        t0 = time.perf_counter()
        new = list(examples)
        stats = UpdateStats(examples=len(new))
        if not new:
            return stats
        limit = self.max_steps if max_steps is None else int(max_steps)
        bs = self.batch_size
        replay = list(self.replay)
        n_new = bs if not replay else max(1, bs // 2)
        steps = max(1, min(limit, math.ceil(2 * len(new) / n_new)))
        order = list(range(len(new)))
        self._rng.shuffle(order)
        pos = 0
        losses: list[float] = []
        self.model.train()
        for _ in range(steps):
            batch = []
            for _ in range(min(n_new, len(new))):
                if pos >= len(order):
                    self._rng.shuffle(order)
                    pos = 0
                batch.append(new[order[pos]])
                pos += 1
            if replay and len(batch) < bs:
                extra = self._rng.sample(replay, min(bs - len(batch), len(replay)))
                stats.replayed += len(extra)
                batch.extend(extra)
            loss = self._loss(batch, self._sample_negatives(self.negatives))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self._params, 1.0)
            self.optimizer.step()
            losses.append(float(loss.detach()))
        self.model.eval()
        self._remember(new)
        self.version += 1
        stats.steps = len(losses)
        stats.loss_first, stats.loss_last = losses[0], losses[-1]
        stats.loss_mean = float(np.mean(losses))
        stats.seconds = time.perf_counter() - t0
        stats.version = self.version
        self.history.append(stats)
        log.info("adapter update v%d: %d steps, loss %.3f -> %.3f in %.1fs", self.version, stats.steps,
                 stats.loss_first, stats.loss_last, stats.seconds)
        return stats

    def embed(self, texts: Sequence[str], *, max_length: int | None = None, batch_size: int = 128) -> np.ndarray:
        """Embeddings (float32, L2-normalised) of ``texts`` with the current adapter."""
        self.model.eval()
        with self._autocast():
            vec = embed_texts(self.model, self.tokenizer, list(texts), batch_size=batch_size,
                              max_length=max_length or self.item_max_length)
        return vec.float().cpu().numpy()

    def embed_items(self, items: Sequence[object]) -> np.ndarray:
        """Item-tower vectors for catalogue items (``Item`` records or plain texts)."""
        texts = [it.text() if hasattr(it, "text") else str(it) for it in items]
        return self.embed(texts, max_length=self.item_max_length)

    def embed_users(self, user_texts: Sequence[str]) -> np.ndarray:
        """User-tower vectors for rendered user histories."""
        return self.embed(user_texts, max_length=self.user_max_length, batch_size=64)

    def save(self, adapter_dir: str | Path, domain: str = "default", version: str | None = None,
             manifest_extra: Mapping | None = None) -> Path:
        """Write the current adapter as a versioned checkpoint (see :mod:`driftrec.model.adapters`)."""
        from driftrec.model.adapters import save_checkpoint

        extra = {"trainer_version": self.version, "updates": [s.as_dict() for s in self.history[-5:]]}
        extra.update(manifest_extra or {})
        return save_checkpoint(self.model, adapter_dir, domain, version or f"v{self.version:05d}", extra)
