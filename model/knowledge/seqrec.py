"""The knowledge model: a sequential recommender whose items are what the language model and the
knowledge graph know about them.

Item representation (one row per catalogue item)::

    item(i) = LayerNorm( W_text · lm(text_i)  +  W_kg · e(entity_i)  +  id(i) )

* ``lm(text_i)``: the frozen all-MiniLM-L6-v2 embedding of the item's text (title, year, genres, tags,
  description), computed once per item and text; on a GPU worker the LM can be LoRA-tuned and the
  vectors recomputed per adapter version, on a CPU the LM forward is paid once per item.
* ``e(entity_i)``: the item's knowledge-graph entity embedding, trained jointly with the recommendation
  loss by TransE over the graph's triples around the catalogue: ``L = L_rec + alpha * L_KG``.
* ``id(i)``: a free item embedding, used only for items that had interactions at training time; a new
  item is scored from its text and its graph entity alone (cold start).

A causal self-attention encoder (SASRec-style: pre-LN blocks, positions counted from the newest item)
reads the user's item sequence; the score of item ``j`` is ``h_user · item(j)`` over the whole catalogue
(full softmax cross-entropy in training). Training is periodic and warm-started
(:class:`KnowledgeTrainer.fit`); every trainable parameter is the checkpoint.

``text=False`` drops the LM part (the "no LM" ablation), ``kg=None`` the graph part; with neither, the
model is SASRec (:mod:`driftrec.model.evaluation.sasrec`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from driftrec.model.base import ItemSequenceModel

log = logging.getLogger(__name__)

BOS, PAD = -2, -1


@dataclass(frozen=True)
class SeqRecConfig:
    """Architecture and training of the knowledge model (validated on construction)."""

    dim: int = 64
    blocks: int = 2
    heads: int = 1
    maxlen: int = 50
    dropout: float = 0.2
    text_dropout: float = 0.1
    id_dropout: float = 0.0
    kg_dim: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    max_tokens: int = 6000
    init_epochs: int = 30
    epochs: int = 5
    kg_batch: int = 512
    kg_margin: float = 1.0

    def __post_init__(self) -> None:
        for name in ("dim", "blocks", "heads", "maxlen", "kg_dim", "batch_size", "max_tokens", "init_epochs", "kg_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.epochs < 0:
            raise ValueError("epochs must be >= 0")
        if self.dim % self.heads:
            raise ValueError("dim must be a multiple of heads")
        for name in ("dropout", "text_dropout", "id_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1)")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "SeqRecConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"unknown knowledge-model option(s) {sorted(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**options)


# ----------------------------------------------------------------------------------- LM text


_TEXT_CACHE: dict[str, np.ndarray] = {}


def text_key(text: str) -> str:
    """What a checkpoint records per item to tell whether its text changed since training."""
    return hashlib.sha1(text.encode()).hexdigest()


def text_vectors(texts: Sequence[str], model_path: str | None = None, device: str | None = None) -> np.ndarray:
    """L2-normalised LM embeddings of ``texts`` in float32 (memoised per text and model: the LM forward is
    paid once). ``device``: where the LM runs (default: the CPU; a checkpoint stores the vectors it was
    trained with, so a trainer on a GPU and workers on CPUs serve the same ones)."""
    key = lambda s: hashlib.sha1(f"{model_path}\0{s}".encode()).hexdigest()  # noqa: E731
    missing = list(dict.fromkeys(s for s in texts if key(s) not in _TEXT_CACHE))
    if missing:
        from driftrec.model.lm import DevicePlan, embed_texts, load_encoder, load_tokenizer

        t0 = time.perf_counter()
        plan = DevicePlan(torch.device(device or "cpu"), torch.float32)
        model, tok = load_encoder(model_path, plan), load_tokenizer(model_path)
        vecs = embed_texts(model, tok, missing).float().cpu().numpy()
        for s, v in zip(missing, vecs):
            _TEXT_CACHE[key(s)] = v.astype(np.float32)
        log.info("embedded %d item texts in %.1fs on %s", len(missing), time.perf_counter() - t0, plan.device)
    return np.stack([_TEXT_CACHE[key(s)] for s in texts]) if texts else np.zeros((0, 384), dtype=np.float32)


# ------------------------------------------------------------------------------------ modules


class ItemRepresentation(nn.Module):
    """The item table: text projection + graph entity projection + item id, layer-normalised."""

    def __init__(self, n_items: int, cfg: SeqRecConfig, *, text: np.ndarray | None, item_entity: np.ndarray | None,
                 n_entities: int) -> None:
        super().__init__()
        d = cfg.dim
        self.n_items = n_items
        self.id_dropout = cfg.id_dropout
        self.id_emb = nn.Embedding(n_items, d)
        nn.init.normal_(self.id_emb.weight, std=0.02)
        self.register_buffer("id_known", torch.zeros(n_items, dtype=torch.bool))
        self.text_proj = None
        if text is not None:
            self.register_buffer("text", torch.as_tensor(text, dtype=torch.float32))
            self.text_drop = nn.Dropout(cfg.text_dropout)
            self.text_proj = nn.Linear(text.shape[1], d)
            nn.init.normal_(self.text_proj.weight, std=0.02)
            nn.init.zeros_(self.text_proj.bias)
        self.entity = None
        if item_entity is not None:
            ie = torch.as_tensor(item_entity, dtype=torch.long)
            self.register_buffer("item_entity", ie.clamp(min=0))
            self.register_buffer("linked", (ie >= 0).float().unsqueeze(-1))
            self.entity = nn.Embedding(n_entities, cfg.kg_dim)
            nn.init.normal_(self.entity.weight, std=1.0 / np.sqrt(cfg.kg_dim))
            self.kg_proj = nn.Linear(cfg.kg_dim, d)
            nn.init.normal_(self.kg_proj.weight, std=0.02)
            nn.init.zeros_(self.kg_proj.bias)
        self.ln = nn.LayerNorm(d)

    def content(self, text: torch.Tensor | None, entity: torch.Tensor | None, linked: torch.Tensor | None) -> torch.Tensor:
        """The text + graph part for given rows (new items go through here alone)."""
        out = 0.0
        if self.text_proj is not None and text is not None:
            out = out + self.text_proj(self.text_drop(text))
        if self.entity is not None and entity is not None:
            out = out + self.kg_proj(self.entity(entity)) * linked
        return out

    def forward(self) -> torch.Tensor:
        # An item with no interaction in the training histories has no id part, in training as in serving:
        # the rows the model learns against (every item is a negative of the full softmax) are the rows it
        # serves. Masking in serving only (the design until 2026-12-08) trained those id rows as negatives -
        # "nobody picks this" - then dropped them, so the bare content rows of never-chosen items took 2-3
        # of every top 10 and the model ranked below SASRec (docs/knowledge_model.md, "Train/serve skew").
        w = self.id_emb.weight * self.id_known.float().unsqueeze(-1)
        if self.training and self.id_dropout > 0:
            w = w * (torch.rand(self.n_items, 1, device=w.device) >= self.id_dropout).float()
        parts = w + self.content(getattr(self, "text", None), getattr(self, "item_entity", None),
                                 getattr(self, "linked", None))
        return self.ln(parts)


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(dropout), nn.Linear(d, d))
        self.drop = nn.Dropout(dropout)
        self.heads, self.p = heads, dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(B, L, d)))
        return x + self.drop(self.ff(self.ln2(x)))


class SequenceEncoder(nn.Module):
    """Causal self-attention over left-padded item sequences (PAD = -1; BOS = -2 starts each one)."""

    def __init__(self, cfg: SeqRecConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.maxlen = cfg.maxlen
        self.pos = nn.Embedding(cfg.maxlen + 1, d)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.bos = nn.Parameter(torch.randn(d) * 0.02)
        self.blocks = nn.ModuleList(_Block(d, cfg.heads, cfg.dropout) for _ in range(cfg.blocks))
        self.ln = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)

    def _masks(self, L: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal (1 x L x L) and identity (L x L) masks, built once per length and device (building
        them took a quarter of a one-user forward)."""
        cache = self.__dict__.setdefault("_mask_cache", {})
        key = (L, str(device))
        masks = cache.get(key)
        if masks is None:
            # plain tensors even when built under inference mode (serving): training uses the same cache
            with torch.inference_mode(False):
                masks = cache[key] = (torch.ones(L, L, dtype=torch.bool, device=device).tril().unsqueeze(0),
                                      torch.eye(L, dtype=torch.bool, device=device))
        return masks

    def forward(self, table: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        B, L = seq.shape
        real = seq >= 0
        x = table[seq.clamp(min=0)] * real.unsqueeze(-1)
        x = torch.where((seq == BOS).unsqueeze(-1), self.bos.expand(B, L, -1), x)
        pos = torch.arange(L - 1, -1, -1, device=seq.device).clamp(max=self.maxlen)  # distance from the newest position
        x = self.drop(x + self.pos(pos).unsqueeze(0))
        valid = seq != PAD
        causal, eye = self._masks(L, seq.device)
        mask = causal & (valid.unsqueeze(1) | eye)
        mask = mask.unsqueeze(1)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln(x)


class SeqRecNet(nn.Module):
    def __init__(self, items: ItemRepresentation, encoder: SequenceEncoder) -> None:
        super().__init__()
        self.items = items
        self.encoder = encoder


class TransE(nn.Module):
    """Margin loss ``relu(m + d(h,r,t) - d(h',r,t'))`` with ``d = ||n(e_h) + r - n(e_t)||`` on the item
    representation's own entity table (type-consistent corruption of the head or the tail)."""

    def __init__(self, entity: nn.Embedding, triples: np.ndarray, n_relations: int, margin: float, seed: int) -> None:
        super().__init__()
        self.entity = entity
        self.rel = nn.Embedding(n_relations, entity.weight.shape[1])
        nn.init.normal_(self.rel.weight, std=1.0 / np.sqrt(entity.weight.shape[1]))
        self.margin = margin
        self.triples = torch.as_tensor(triples, dtype=torch.long)
        self.rng = np.random.default_rng(seed)
        self.pools = {int(r): (np.unique(triples[triples[:, 1] == r, 0]), np.unique(triples[triples[:, 1] == r, 2]))
                      for r in np.unique(triples[:, 1])}

    def loss(self, batch: int) -> torch.Tensor:
        j = self.rng.integers(len(self.triples), size=batch)
        pos = self.triples[j]
        neg = pos.clone().numpy()
        heads = self.rng.random(batch) < 0.5
        for n in range(batch):
            hs, ts = self.pools[int(neg[n, 1])]
            if heads[n]:
                neg[n, 0] = hs[self.rng.integers(len(hs))]
            else:
                neg[n, 2] = ts[self.rng.integers(len(ts))]
        device = self.entity.weight.device
        pos, neg = pos.to(device), torch.as_tensor(neg, device=device)

        def dist(t: torch.Tensor) -> torch.Tensor:
            h = F.normalize(self.entity(t[:, 0]), dim=-1)
            tail = F.normalize(self.entity(t[:, 2]), dim=-1)
            return (h + self.rel(t[:, 1]) - tail).norm(dim=-1)

        return F.relu(self.margin + dist(pos) - dist(neg)).mean()


# ------------------------------------------------------------------------------ the model seam


class KnowledgeModel(ItemSequenceModel):
    """A trained snapshot, for scoring: the item table and the encoder (frozen, eval mode)."""

    def __init__(self, net: SeqRecNet, item_ids: Sequence[str], texts: np.ndarray | None, version: str,
                 *, item_entity: Mapping[str, int] | None = None, model_path: str | None = None) -> None:
        self.net = net.eval()
        self.model_path = model_path
        self.version = version
        self.item_ids = list(item_ids)
        self.index = {i: n for n, i in enumerate(self.item_ids)}
        self._texts = texts
        self._item_entity = item_entity or {}
        self._cols_memo: tuple | None = None
        with torch.no_grad():
            self.table = net.items()

    def knows(self, item_id: str) -> bool:
        return item_id in self.index

    def add_items(self, items: Sequence[Any]) -> None:
        """New items get content-only rows (text and graph entity), no id part."""
        new = [it for it in items if it.item_id not in self.index]
        if not new:
            return
        rep = self.net.items
        text = (torch.as_tensor(text_vectors([it.text() for it in new], self.model_path))
                if rep.text_proj is not None else None)
        ents = torch.as_tensor([max(self._item_entity.get(it.item_id, -1), 0) for it in new], dtype=torch.long)
        linked = torch.as_tensor([[1.0 if it.item_id in self._item_entity else 0.0] for it in new])
        with torch.no_grad():
            rows = rep.ln(rep.content(text, ents if rep.entity is not None else None, linked) + torch.zeros(len(new), self.table.shape[1]))
        self.table = torch.cat([self.table, rows])
        for it in new:
            self.index[it.item_id] = len(self.item_ids)
            self.item_ids.append(it.item_id)
        if self._texts is not None and text is not None:
            self._texts = np.concatenate([self._texts, text.numpy()])

    def _bucket(self, n: int) -> int:
        """The padded length of a sequence of ``n`` tokens: the smallest of 8, 16, 32... that holds it,
        at most ``maxlen``. A user's vector is computed at that length alone or in any batch, so it is the
        same to the bit either way (a batch of rows of one length gives each row the bits it gets alone)."""
        L = 8
        while L < n:
            L *= 2
        return min(L, self.net.encoder.maxlen)

    def user_vectors(self, histories: Sequence[Sequence[str]], chunk: int = 128) -> torch.Tensor:
        """The user vectors (len(histories) x dim) of several histories: one forward per length bucket and
        ``chunk`` rows instead of one per user (a one-user forward is mostly framework overhead)."""
        maxlen = self.net.encoder.maxlen
        seqs = [[BOS] + [self.index[i] for i in h if i in self.index][-(maxlen - 1):] for h in histories]
        out = torch.empty(len(seqs), self.table.shape[1])
        buckets: dict[int, list[int]] = {}
        for r, s in enumerate(seqs):
            buckets.setdefault(self._bucket(len(s)), []).append(r)
        # inference mode, not just no_grad: half the cost of a one-user forward (no version counters or
        # view tracking), the same kernels and bits
        with torch.inference_mode():
            for L, rows in buckets.items():
                for a in range(0, len(rows), chunk):
                    part = rows[a:a + chunk]
                    seq = torch.as_tensor([[PAD] * (L - len(seqs[r])) + seqs[r] for r in part], dtype=torch.long)
                    out[part] = self.net.encoder(self.table, seq)[:, -1]
        return out

    def user_vector(self, history: Sequence[str]) -> torch.Tensor:
        return self.user_vectors([history])[0]

    def _columns(self, item_ids: Sequence[str]) -> np.ndarray | None:
        """The table row of each of ``item_ids`` (-1: an item the model does not know); None when they are
        the table's own order. The last answer is kept (a worker's catalogue order is not its model's,
        and it asks with the same list every time), checked against the list and the table's size."""
        ids = item_ids if isinstance(item_ids, list) else list(item_ids)
        memo = self._cols_memo
        # the kept list holds the caller's own strings: comparing it is mostly identity checks
        if memo is not None and memo[1] == len(self.item_ids) and memo[0] == ids:
            return memo[2]
        cols = (None if ids == self.item_ids else
                np.fromiter((self.index.get(i, -1) for i in ids), dtype=np.int64, count=len(ids)))
        self._cols_memo = (list(ids), len(self.item_ids), cols)
        return cols

    @staticmethod
    def _gather(all_scores: np.ndarray, cols: np.ndarray | None) -> np.ndarray:
        """``all_scores`` (table order, one row or several) in the order of ``cols``; unknown items get the
        row's lowest score."""
        if cols is None:
            return all_scores
        out = all_scores[..., np.maximum(cols, 0)]
        unknown = cols < 0
        if unknown.any():
            low = all_scores.min(axis=-1, keepdims=True) if all_scores.shape[-1] else np.zeros(all_scores.shape[:-1] + (1,))
            out[..., unknown] = np.broadcast_to(low, out[..., unknown].shape)
        return out

    def score_items_many(self, histories: Sequence[Sequence[str]], ratings: Sequence[Sequence[float | None]],
                         item_ids: Sequence[str]) -> np.ndarray:
        if not len(histories):
            return np.zeros((0, len(item_ids)))
        H = self.user_vectors(histories)
        with torch.no_grad():
            rows = torch.stack([self.table @ h for h in H]).double().numpy()
        return self._gather(rows, self._columns(item_ids))

    def score_vector(self, vector: torch.Tensor, item_ids: Sequence[str]) -> np.ndarray:
        with torch.no_grad():
            all_scores = (self.table @ vector).double().numpy()
        return self._gather(all_scores, self._columns(item_ids))

    def score_items(self, history: Sequence[str], ratings: Sequence[float | None], item_ids: Sequence[str]) -> np.ndarray:
        return self.score_vector(self.user_vector(history), item_ids)

    def text_vectors(self, item_ids: Sequence[str] | None = None) -> np.ndarray | None:
        if self._texts is None:
            return None
        if item_ids is None:
            return self._texts
        return np.stack([self._texts[self.index[i]] for i in item_ids])


# --------------------------------------------------------------------------------- the trainer


def kg_triples(kg, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int, int, dict[str, int]]:
    """The graph around the catalogue: triples touching a linked item's entity, re-indexed densely;
    per item its entity row (-1 when unlinked)."""
    item_ents = {kg.entity_index[e] for i in item_ids if (e := kg.item_entity.get(i)) is not None
                 and e in kg.entity_index}
    kept = [(h, r, t) for h, r, t in kg.triples if h in item_ents or t in item_ents]
    ents = sorted({h for h, _, _ in kept} | {t for _, _, t in kept} | item_ents)
    dense = {e: n for n, e in enumerate(ents)}
    rels = sorted({r for _, r, _ in kept})
    rdense = {r: n for n, r in enumerate(rels)}
    triples = np.asarray([(dense[h], rdense[r], dense[t]) for h, r, t in kept], dtype=np.int64).reshape(-1, 3)
    item_entity = np.full(len(item_ids), -1, dtype=np.int64)
    by_item = {}
    for n, i in enumerate(item_ids):
        e = kg.item_entity.get(i)
        if e is not None and e in kg.entity_index and kg.entity_index[e] in dense:
            item_entity[n] = by_item[i] = dense[kg.entity_index[e]]
    return triples, item_entity, len(ents), max(len(rels), 1), by_item


@contextlib.contextmanager
def _own_rng(trainer: "KnowledgeTrainer"):
    """Run a fit on ``trainer``'s own random stream: the global CPU generator (and the GPU's, on one) is
    set to the trainer's state for the fit and put back afterwards."""
    cuda = [trainer.device.index or 0] if trainer.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.set_rng_state(trainer._torch_rng)
        if cuda:  # the GPU's stream follows the trainer's CPU stream
            torch.cuda.manual_seed(int(torch.randint(2**62, (1,))))
        try:
            yield
        finally:
            trainer._torch_rng = torch.get_rng_state()


class KnowledgeTrainer:
    """Trains the knowledge model over interaction histories, warm-starting every fit from the last
    (weights and optimiser state), and hands out scoring snapshots (:meth:`model`)."""

    def __init__(self, items: Mapping[str, Any], item_ids: Sequence[str], *, text: bool = True, kg=None,
                 kg_alpha: float = 0.1, seed: int = 0, name: str = "knowledge", model_path: str | None = None,
                 device: str | torch.device = "cpu", **options: Any) -> None:
        self.cfg = SeqRecConfig.from_options(options)
        self.device = torch.device(device)
        self.model_path = model_path
        self.item_ids = list(item_ids)
        self.index = {i: n for n, i in enumerate(self.item_ids)}
        self.name = name
        torch.manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        texts_in = [items[i].text() if i in items else i for i in self.item_ids]
        self.text_keys = [text_key(t) for t in texts_in]
        texts = text_vectors(texts_in, model_path, None if self.device.type == "cpu" else str(self.device)) if text else None
        self.text_seconds = time.perf_counter() - t0
        self.texts = texts
        item_entity = triples = None
        n_entities, n_rel, self.item_entity = 0, 1, {}
        if kg is not None:
            triples, item_entity, n_entities, n_rel, self.item_entity = kg_triples(kg, self.item_ids)
        rep = ItemRepresentation(len(self.item_ids), self.cfg, text=texts, item_entity=item_entity, n_entities=n_entities)
        self.net = SeqRecNet(rep, SequenceEncoder(self.cfg)).to(self.device)
        self.kg_alpha = kg_alpha if kg is not None else 0.0
        self.transe = (TransE(rep.entity, triples, n_rel, self.cfg.kg_margin, seed)
                       if kg is not None and len(triples) and self.kg_alpha > 0 else None)
        if self.transe is not None:
            self.transe.rel.to(self.device)
        params = list(self.net.parameters()) + (list(self.transe.rel.parameters()) if self.transe is not None else [])
        self.opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.fits = 0
        self.steps = 0
        self._model: KnowledgeModel | None = None
        # this trainer's own random stream (dropout, id dropout): its fits draw the same numbers whatever
        # other models train in the same process in between (the evaluation's arms fit one after another
        # on the global generator, so an ablation or a baseline changed the full system's training)
        self._torch_rng = torch.Generator().manual_seed(seed).get_state()

    # -- data
    def _windows(self, histories) -> list[tuple[list[int], list[int]]]:
        L = self.cfg.maxlen
        out = []
        for _, hist in histories:
            items = [self.index[i] for i, _ in hist if i in self.index]
            tok = [BOS] + items
            b = len(items)
            while b > 0:
                a = max(0, b - L)
                out.append((tok[a:b], items[a:b]))
                b = a
        return out

    def _batches(self, wins) -> list[list[int]]:
        order = np.argsort([len(w[0]) + self.rng.random() for w in wins])
        batches, cur, cur_len = [], [], 0
        for j in order:
            n = len(wins[j][0])
            if cur and (len(cur) >= self.cfg.batch_size or max(cur_len, n) * (len(cur) + 1) > self.cfg.max_tokens):
                batches.append(cur)
                cur, cur_len = [], 0
            cur.append(j)
            cur_len = max(cur_len, n)
        if cur:
            batches.append(cur)
        self.rng.shuffle(batches)
        return batches

    @staticmethod
    def _collate(wins, idx) -> tuple[torch.Tensor, torch.Tensor]:
        L = max(len(wins[j][0]) for j in idx)
        seq = np.full((len(idx), L), PAD, dtype=np.int64)
        tgt = np.full((len(idx), L), -100, dtype=np.int64)
        for r, j in enumerate(idx):
            tok, t = wins[j]
            seq[r, L - len(tok):] = tok
            tgt[r, L - len(t):] = t
        return torch.as_tensor(seq), torch.as_tensor(tgt)

    # -- training
    def fit(self, histories, *, initial: bool = False) -> dict:
        """Train on ``histories`` ((user, [(item id, rating), ...] oldest first), ...) for
        ``init_epochs`` (first fit) or ``epochs`` epochs, continuing from the current weights."""
        t0 = time.perf_counter()
        net = self.net
        counts = np.zeros(len(self.item_ids), dtype=bool)
        for _, hist in histories:
            for i, _ in hist:
                j = self.index.get(i)
                if j is not None:
                    counts[j] = True
        net.items.id_known.copy_(torch.as_tensor(counts, device=self.device))
        wins = self._windows(histories)
        epochs = self.cfg.init_epochs if initial or self.fits == 0 else self.cfg.epochs
        with _own_rng(self):
            stats = self._train(net, wins, epochs)
        net.eval()
        self.fits += 1
        self.steps += stats["steps"]
        self._model = KnowledgeModel(copy.deepcopy(net).cpu(), self.item_ids, self.texts, f"{self.name}-{self.fits}",
                                     item_entity=self.item_entity, model_path=self.model_path)
        return {"fit": self.fits, "epochs": epochs, "windows": len(wins), **stats,
                "seconds": time.perf_counter() - t0}

    def _train(self, net: SeqRecNet, wins, epochs: int) -> dict:
        net.train()
        total = kg_total = 0.0
        nb = 0
        for _ in range(epochs):
            for idx in self._batches(wins):
                seq, tgt = (t.to(self.device, non_blocking=True) for t in self._collate(wins, idx))
                table = net.items()
                h = net.encoder(table, seq)
                sel = tgt >= 0
                loss = F.cross_entropy(h[sel] @ table.T, tgt[sel])
                if self.transe is not None:
                    lk = self.transe.loss(self.cfg.kg_batch)
                    loss = loss + self.kg_alpha * lk
                    kg_total += float(lk.detach())
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                total += float(loss.detach())
                nb += 1
        return {"steps": nb, "loss": total / max(nb, 1),
                "kg_loss": kg_total / max(nb, 1) if self.transe is not None else None}

    def model(self) -> KnowledgeModel | None:
        return self._model

    def warm_start(self, net: SeqRecNet, item_ids: Sequence[str]) -> int:
        """Continue from another network (an older catalogue's trainer, or a served checkpoint): the
        encoder, the projections and the graph entities where their shapes match, and the id rows of the
        items both catalogues hold (matched by id); rows of new items keep their fresh initialisation.
        The optimiser starts afresh. Returns the number of id rows carried over."""
        src, dst = net.state_dict(), self.net.state_dict()
        pos = {i: n for n, i in enumerate(item_ids)}
        pairs = [(n, pos[i]) for n, i in enumerate(self.item_ids) if i in pos]
        derived = {"items.text", "items.item_entity", "items.linked"}  # recomputed from this catalogue
        for key, value in dst.items():
            old = src.get(key)
            if old is None or key in derived:
                continue
            if key in ("items.id_emb.weight", "items.id_known"):
                if pairs:
                    to, frm = (torch.as_tensor(x, dtype=torch.long) for x in zip(*pairs))
                    value[to.to(value.device)] = old[frm.to(old.device)].to(value.device, value.dtype)
            elif old.shape == value.shape:
                value.copy_(old)
        self.net.load_state_dict(dst)
        self.fits = max(self.fits, 1)  # later fits are incremental (``epochs``, not ``init_epochs``)
        return len(pairs)

    def state(self) -> dict:
        """Everything a rejected fit must undo (network, graph relations, optimiser, counters)."""
        return copy.deepcopy({"net": self.net.state_dict(), "opt": self.opt.state_dict(), "fits": self.fits,
                              "steps": self.steps, "model": self._model,
                              "rel": self.transe.rel.state_dict() if self.transe is not None else None})

    def restore(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        if self.transe is not None and state["rel"] is not None:
            self.transe.rel.load_state_dict(state["rel"])
        self.fits, self.steps, self._model = state["fits"], state["steps"], state["model"]

    def config(self) -> dict:
        return asdict(self.cfg)
