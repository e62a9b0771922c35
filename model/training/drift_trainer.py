"""The trainer with the drift-following options: hard negatives, multi-task heads, FGM, resume.

:class:`DriftTrainer` extends :class:`driftrec.model.training.trainer.Trainer` (same LoRA layout, same replay buffer, same
bounded :meth:`~driftrec.model.training.trainer.Trainer.update`) and replaces only its loss:

* **click head** (always): InfoNCE of the user text against its chosen item, the other items of the batch,
  sampled catalogue negatives and the *hard negatives* of the example (items shown in the recommendation
  the user answered, not chosen).
* **rating head** (``trainer.multitask``): a linear regression on the element-wise product of the user and
  item vectors, predicting the (centred) rating, on every rated example, low ratings included; weight
  ``trainer.rating_weight``. The head is a training aid: it is not part of the checkpoint (the served
  score stays the two-tower dot product).
* **adversarial perturbation** (``trainer.adversarial_eps`` > 0): FGM on the input embeddings. The clean
  loss is differentiated w.r.t. the word-embedding outputs, those are moved by ``eps * g / ||g||`` (per
  example) and the loss on the perturbed inputs is added.

:meth:`load_adapter` makes the trainer continue from a saved (verified) checkpoint, which is how a
restarted worker resumes from the registry's active version.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from driftrec.model.lm import embed_texts
from driftrec.model.training.trainer import Trainer, TrainingExample

log = logging.getLogger(__name__)


class DriftTrainer(Trainer):
    def __init__(self, settings=None, *, multitask: bool | None = None, rating_weight: float | None = None,
                 adversarial_eps: float | None = None, **kwargs: Any) -> None:
        ts = getattr(settings, "trainer", None)
        if ts is not None:
            kwargs.setdefault("negatives", ts.negatives)
            kwargs.setdefault("user_max_length", ts.user_max_length)
            kwargs.setdefault("item_max_length", ts.item_max_length)
        super().__init__(settings, **kwargs)
        self.multitask = bool(multitask if multitask is not None else (ts.multitask if ts else False))
        self.rating_weight = float(rating_weight if rating_weight is not None else (ts.rating_weight if ts else 0.5))
        self.adversarial_eps = float(adversarial_eps if adversarial_eps is not None else (ts.adversarial_eps if ts else 0.0))
        self.rating_head: torch.nn.Module | None = None
        if self.multitask:
            hidden = int(self.model.get_base_model().config.hidden_size)
            self.rating_head = torch.nn.Linear(hidden, 1).to(self.plan.device)
            torch.nn.init.zeros_(self.rating_head.bias)
            self.optimizer.add_param_group({"params": list(self.rating_head.parameters()), "lr": self.learning_rate * 10})
        self._fgm: dict[str, Any] | None = None
        self.parent_version: str | None = None

    # ------------------------------------------------------------------------------ resume
    def load_adapter(self, path: str | Path, adapter_dir: str | Path) -> str:
        """Continue from a verified checkpoint (LoRA tensors copied into the trainable model)."""
        from peft import set_peft_model_state_dict

        from driftrec.model.adapters import CheckpointError, base_fingerprint, verify_checkpoint

        base = self.model.get_base_model()
        ckpt = verify_checkpoint(path, adapter_dir, base_fingerprint=base_fingerprint(base.config))
        own = self.lora_state()
        if {k: tuple(v.shape) for k, v in own.items()} != {k: tuple(v.shape) for k, v in ckpt.tensors.items()}:
            raise CheckpointError("shape", f"checkpoint {ckpt.path} has another LoRA layout than the trainer")
        set_peft_model_state_dict(self.model, {k: v.to(self.plan.device) for k, v in ckpt.tensors.items()})
        self.parent_version = ckpt.version
        return ckpt.version

    def lora_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def restore_lora_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state)

    # -------------------------------------------------------------------------------- loss
    def _embed_pair(self, users: Sequence[str], items: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            u = embed_texts(self.model, self.tokenizer, list(users), batch_size=len(users) or 1,
                            max_length=self.user_max_length, grad=True)
            v = embed_texts(self.model, self.tokenizer, list(items), batch_size=len(items) or 1,
                            max_length=self.item_max_length, grad=True)
        return u.float(), v.float()

    def _task_loss(self, batch: Sequence[TrainingExample], negatives: Sequence[str]) -> torch.Tensor:
        pos = [ex for ex in batch if getattr(ex, "positive", True)]
        rated = [ex for ex in batch if self.rating_head is not None and getattr(ex, "rating", None) is not None]
        users: dict[str, int] = {}
        for ex in pos + rated:
            users.setdefault(ex.user_text, len(users))
        uniq: dict[str, int] = {}
        for t in [ex.item_text for ex in pos]:
            uniq.setdefault(t, len(uniq))
        for ex in pos:
            for t in getattr(ex, "hard_negatives", ()):
                uniq.setdefault(t, len(uniq))
        for t in list(negatives) + [ex.item_text for ex in rated]:
            uniq.setdefault(t, len(uniq))
        if not users:
            return torch.zeros((), device=self.plan.device, requires_grad=True)
        u, v = self._embed_pair(list(users), list(uniq))
        loss = torch.zeros((), device=self.plan.device)
        if pos:
            ui = torch.tensor([users[ex.user_text] for ex in pos], device=self.plan.device)
            targets = torch.tensor([uniq[ex.item_text] for ex in pos], device=self.plan.device)
            logits = (u[ui] @ v.T) / self.temperature
            # Another positive of the same user text in this batch is not a negative for it.
            same = torch.zeros_like(logits, dtype=torch.bool)
            for r, ex in enumerate(pos):
                for c, other in enumerate(pos):
                    if other.user_text == ex.user_text and other.item_text != ex.item_text:
                        same[r, uniq[other.item_text]] = True
            logits = logits.masked_fill(same, float("-inf"))
            loss = loss + torch.nn.functional.cross_entropy(logits, targets)
        if rated:
            ui = torch.tensor([users[ex.user_text] for ex in rated], device=self.plan.device)
            ii = torch.tensor([uniq[ex.item_text] for ex in rated], device=self.plan.device)
            pred = self.rating_head(u[ui] * v[ii]).squeeze(-1)
            target = torch.tensor([(float(ex.rating) - 3.0) / 2.0 for ex in rated], device=self.plan.device)
            loss = loss + self.rating_weight * torch.nn.functional.mse_loss(pred, target)
        return loss

    def _fgm_hook(self, module, inputs, output):
        st = self._fgm
        if st is None:
            return output
        if st["mode"] == "record":
            out = output.detach().requires_grad_(True)
            st["outs"].append(out)
            return out
        delta = st["deltas"][st["i"]]
        st["i"] += 1
        return output + delta

    def _loss(self, batch: Sequence[TrainingExample], negatives: Sequence[str]) -> torch.Tensor:
        if self.adversarial_eps <= 0 or not torch.is_grad_enabled():
            return self._task_loss(batch, negatives)
        emb = self.model.get_base_model().get_input_embeddings()
        handle = emb.register_forward_hook(self._fgm_hook)
        try:
            self._fgm = {"mode": "record", "outs": []}
            clean = self._task_loss(batch, negatives)
            outs = self._fgm["outs"]
            grads = torch.autograd.grad(clean, outs, retain_graph=True, allow_unused=True)
            deltas = []
            for out, g in zip(outs, grads):
                if g is None:
                    deltas.append(torch.zeros_like(out))
                    continue
                norm = g.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *([1] * (g.dim() - 1)))
                deltas.append((self.adversarial_eps * g / norm).detach())
            self._fgm = {"mode": "perturb", "deltas": deltas, "i": 0}
            adv = self._task_loss(batch, negatives)
        finally:
            self._fgm = None
            handle.remove()
        return clean + adv
