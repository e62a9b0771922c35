"""A translational (TransE) knowledge-graph loss tied to the trainer's item tower.

Every triple that links an item to another entity is oriented item-first: ``(item, r, x)`` as in the
file when the item is the head, ``(item, r^-1, x)`` when it is the tail (``r^-1`` has its own vector).
The item's embedding is its LM item-tower vector, projected to ``dim`` (:attr:`KGLoss.proj`); other
entities and relations get small embedding tables of their own. With L2-normalised entity vectors,

    d(h, r, t) = || e_h + r - e_t ||,    L_KG = mean(relu(margin + d(h, r, t) - d(h, r, t'))),

where ``t'`` is a corrupted tail drawn among the tails of the same relation (a "type-consistent"
negative: another director, not a language). Items sharing a director are pulled towards the same
point ``e_director - r``, i.e. towards each other, which is the signal the recommender gets from the
graph. Item-item triples (sequel/prequel) are left out, since both ends would be item vectors.

The combined objective is ``L = L_rec + alpha * L_KG`` with ``alpha = settings.trainer.kg_alpha``;
:func:`attach_kg_loss` adds the term to a :class:`driftrec.model.training.trainer.Trainer` without changing its code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from driftrec.model.knowledge.graph import KnowledgeGraph


@dataclass
class TripleBatch:
    """Oriented triples ``(items[head_pos[j]], relations[j], tails[j])`` with corrupted tails."""

    items: list[str]  # the distinct head items; their vectors are what the loss needs
    head_pos: torch.Tensor  # (B,) index into items
    relations: torch.Tensor  # (B,) oriented relation index
    tails: torch.Tensor  # (B,) entity index
    neg_tails: torch.Tensor  # (B, k) entity indices

    def __len__(self) -> int:
        return int(self.head_pos.shape[0])


class KGTripleSampler:
    """Batches of item-first triples, optionally restricted to given items, with corrupted tails."""

    def __init__(self, kg: KnowledgeGraph, seed: int = 0) -> None:
        self.kg = kg
        self.rng = np.random.default_rng(seed)
        R = kg.n_relations
        self.n_relations = 2 * R
        heads: list[str] = []
        rels: list[int] = []
        tails: list[int] = []
        ent_items = kg.entity_items
        for h, r, t in kg.triples:
            he, te = kg.entities[h], kg.entities[t]
            hi, ti = ent_items.get(he), ent_items.get(te)
            if hi and not ti:
                for it in hi:
                    heads.append(it)
                    rels.append(r)
                    tails.append(t)
            elif ti and not hi:
                for it in ti:
                    heads.append(it)
                    rels.append(R + r)
                    tails.append(h)
        self.heads = heads
        self.relations = np.asarray(rels, dtype=np.int64)
        self.tails = np.asarray(tails, dtype=np.int64)
        self.by_item: dict[str, list[int]] = {}
        for j, it in enumerate(heads):
            self.by_item.setdefault(it, []).append(j)
        self.tail_pool: dict[int, np.ndarray] = {}
        for r in np.unique(self.relations):
            self.tail_pool[int(r)] = np.unique(self.tails[self.relations == r])
        non_item = [i for i, e in enumerate(kg.entities) if e not in ent_items]
        self.all_tails = np.asarray(non_item or [0], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.heads)

    def items_with_triples(self, items: Sequence[str]) -> list[str]:
        return [i for i in items if i in self.by_item]

    def sample(self, n: int, items: Sequence[str] | None = None, negatives: int = 1) -> TripleBatch:
        """``n`` triples whose head is one of ``items`` (all items when None or when none is in the
        graph), each with ``negatives`` corrupted tails."""
        pool: list[int] | None = None
        if items:
            pool = [j for it in dict.fromkeys(items) for j in self.by_item.get(it, ())]
        if pool:
            rows = np.asarray(pool)[self.rng.integers(len(pool), size=n)]
        elif len(self.heads):
            rows = self.rng.integers(len(self.heads), size=n)
        else:
            raise ValueError("the knowledge graph holds no item-entity triple")
        rels = self.relations[rows]
        tails = self.tails[rows]
        neg = np.empty((n, negatives), dtype=np.int64)
        for j, (r, t) in enumerate(zip(rels, tails)):
            cand = self.tail_pool.get(int(r))
            if cand is None or len(cand) < 2:
                cand = self.all_tails
            for k in range(negatives):
                c = t
                for _ in range(10):
                    c = cand[self.rng.integers(len(cand))]
                    if c != t:
                        break
                neg[j, k] = c
        heads = [self.heads[j] for j in rows]
        uniq = list(dict.fromkeys(heads))
        pos = {it: p for p, it in enumerate(uniq)}
        return TripleBatch(
            items=uniq,
            head_pos=torch.as_tensor([pos[h] for h in heads], dtype=torch.long),
            relations=torch.as_tensor(rels, dtype=torch.long),
            tails=torch.as_tensor(tails, dtype=torch.long),
            neg_tails=torch.as_tensor(neg, dtype=torch.long),
        )


class KGLoss(nn.Module):
    """TransE margin loss with item entities embedded by (projected) item-tower vectors."""

    def __init__(
        self,
        kg: KnowledgeGraph,
        dim: int = 64,
        *,
        item_dim: int | None = None,
        margin: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.kg = kg
        self.dim = int(dim)
        self.margin = float(margin)
        self.sampler = KGTripleSampler(kg, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        bound = 6.0 / self.dim**0.5
        self.entity = nn.Embedding(max(kg.n_entities, 1), self.dim)
        self.relation = nn.Embedding(max(self.sampler.n_relations, 1), self.dim)
        with torch.no_grad():
            self.entity.weight.uniform_(-bound, bound, generator=gen)
            self.relation.weight.uniform_(-bound, bound, generator=gen)
            self.relation.weight.copy_(nn.functional.normalize(self.relation.weight, dim=-1))
        item_dim = self.dim if item_dim is None else int(item_dim)
        self.proj: nn.Module = nn.Linear(item_dim, self.dim, bias=False)
        with torch.no_grad():
            w = torch.empty(self.dim, item_dim)
            nn.init.orthogonal_(w, generator=gen)
            self.proj.weight.copy_(w)
        self._text_item: dict[str, str] = {}

    # ----------------------------------------------------------------------------- batches

    def sample(self, n: int = 64, items: Sequence[str] | None = None, negatives: int = 1) -> TripleBatch:
        return self.sampler.sample(n, items, negatives)

    def _item_matrix(self, item_vecs, batch: TripleBatch) -> torch.Tensor:
        if isinstance(item_vecs, Mapping):
            missing = [it for it in batch.items if it not in item_vecs]
            if missing:
                raise KeyError(f"no item vector for {missing[:5]}")
            return torch.stack([torch.as_tensor(item_vecs[it]) for it in batch.items])
        V = torch.as_tensor(item_vecs)
        if V.shape[0] != len(batch.items):
            raise ValueError(f"item_vecs has {V.shape[0]} rows; the batch has {len(batch.items)} items")
        return V

    def distances(self, item_vecs, batch: TripleBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``d(h, r, t)`` (B,) and ``d(h, r, t')`` (B, k)."""
        V = self._item_matrix(item_vecs, batch).float()
        dev = self.entity.weight.device
        h = nn.functional.normalize(self.proj(V.to(dev)), dim=-1)[batch.head_pos.to(dev)]
        r = self.relation(batch.relations.to(dev))
        t = nn.functional.normalize(self.entity(batch.tails.to(dev)), dim=-1)
        tn = nn.functional.normalize(self.entity(batch.neg_tails.to(dev)), dim=-1)
        hr = h + r
        return (hr - t).norm(dim=-1), (hr[:, None, :] - tn).norm(dim=-1)

    def forward(self, item_vecs, batch: TripleBatch) -> torch.Tensor:
        """The margin ranking loss on ``batch``; ``item_vecs`` is a tensor aligned with ``batch.items``
        or a mapping item id -> vector (gradients flow back into them)."""
        if len(batch) == 0:
            return self.entity.weight.sum() * 0.0
        pos, neg = self.distances(item_vecs, batch)
        return torch.relu(self.margin + pos[:, None] - neg).mean()

    # --------------------------------------------------------------------- trainer helpers

    def set_item_texts(self, item_texts: Mapping[str, str]) -> None:
        """Item id -> item-tower text, so training batches (texts) can be mapped back to items."""
        self._text_item = {t: i for i, t in item_texts.items()}
        self._item_text = dict(item_texts)

    def step_loss(
        self,
        embed: Callable[[list[str]], torch.Tensor],
        item_texts: Sequence[str] = (),
        n: int = 64,
        negatives: int = 1,
    ) -> torch.Tensor:
        """One step's KG loss: triples about the items behind ``item_texts`` (the rec batch's positives;
        random graph items when none is in the graph), their vectors computed by ``embed(texts)``."""
        if not self._text_item:
            raise RuntimeError("call set_item_texts() first")
        items = [self._text_item[t] for t in item_texts if t in self._text_item]
        batch = self.sample(n, items, negatives)
        texts = [self._item_text[i] for i in batch.items]
        return self(embed(texts), batch)


def kg_alpha(settings=None, default: float = 0.1) -> float:
    ts = getattr(settings, "trainer", None)
    return float(getattr(ts, "kg_alpha", default)) if ts is not None else default


def combined_loss(rec_loss: torch.Tensor, kg_loss: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``L = L_rec + alpha * L_KG`` (just ``L_rec`` when alpha is 0 or there is no KG term)."""
    if kg_loss is None or alpha <= 0:
        return rec_loss
    return rec_loss + alpha * kg_loss.to(rec_loss.dtype)


def attach_kg_loss(
    trainer,
    kg_loss: "KGLoss | KnowledgeGraph",
    item_texts: Mapping[str, str],
    *,
    alpha: float | None = None,
    n_triples: int = 64,
    dim: int = 64,
    learning_rate: float | None = None,
) -> KGLoss:
    """Make ``trainer`` (a :class:`driftrec.model.training.trainer.Trainer`) optimise ``L_rec + alpha * L_KG``.

    ``kg_loss`` is a :class:`KGLoss`, or a :class:`KnowledgeGraph` to build one of ``dim`` dimensions
    sized to the trainer's item vectors. ``item_texts``: item id -> the text the item tower embeds
    (``Item.text()``), used to map the rec batch's positives back to graph items.
    Wraps the trainer's per-step loss on this instance only; the KG tables and projection join the
    trainer's optimizer. In eval mode (``Trainer.loss``) the KG term is not added. ``alpha`` defaults
    to the trainer's ``kg_alpha`` attribute, else 0.1 (``settings.trainer.kg_alpha``'s default).
    """
    from driftrec.model.lm import embed_texts

    a = float(alpha if alpha is not None else getattr(trainer, "kg_alpha", 0.1))
    if isinstance(kg_loss, KnowledgeGraph):
        item_dim = int(trainer.embed(["probe"]).shape[1])
        kg_loss = KGLoss(kg_loss, dim=dim, item_dim=item_dim)
    kg_loss.set_item_texts(item_texts)
    kg_loss.to(trainer.plan.device)
    trainer.optimizer.add_param_group(
        {"params": list(kg_loss.parameters()), "lr": learning_rate or trainer.learning_rate * 10, "weight_decay": 0.0}
    )
    rec_loss = trainer._loss

    def embed(texts: list[str]) -> torch.Tensor:
        with trainer._autocast():
            return embed_texts(trainer.model, trainer.tokenizer, texts, batch_size=len(texts) or 1,
                               max_length=trainer.item_max_length, grad=True)

    def loss_with_kg(batch, negatives):
        loss = rec_loss(batch, negatives)
        if a <= 0 or not trainer.model.training:
            return loss
        kl = kg_loss.step_loss(embed, [ex.item_text for ex in batch], n=n_triples)
        trainer.last_kg_loss = float(kl.detach())
        return combined_loss(loss, kl, a)

    trainer._loss = loss_with_kg
    trainer.kg_loss = kg_loss
    trainer.kg_alpha = a
    return kg_loss
