"""KG candidate source: items connected through the knowledge graph to items the user liked.

A user's score for item ``c`` is ``sum_k w_k * sim(h_k, c) / sum_k w_k`` over the user's last
``recent`` liked items ``h_k`` (rating >= ``positive_threshold``, or a click with ``rating=None``), where
``sim`` is :meth:`driftrec.model.knowledge.graph.KnowledgeGraph.similarity_row` (summed IDF of shared entities) and
``w_k = user_decay ** k`` for the k-th most recent like, times ``0.5 ** (age / half_life_s)`` when a
``half_life_s`` is given. The graph, not interactions, connects items, so an item nobody has
touched yet is scored as soon as it is linked to the graph (cold start).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from driftrec.model.base import CandidateSource
from driftrec.model.knowledge.graph import KnowledgeGraph


class KGCandidates(CandidateSource):
    """Candidates linked by the knowledge graph to the user's liked items (see module docstring)."""

    name = "kg"

    def __init__(
        self,
        kg: KnowledgeGraph,
        item_ids: Iterable[str] = (),
        *,
        recent: int = 50,
        user_decay: float = 0.95,
        half_life_s: float | None = None,
        positive_threshold: float = 4.0,
        normalise: bool = False,
    ) -> None:
        if not 0 < user_decay <= 1:
            raise ValueError("user_decay must be in (0, 1]")
        if half_life_s is not None and half_life_s <= 0:
            raise ValueError("half_life_s must be positive")
        self.kg = kg
        self.recent = int(recent)
        self.user_decay = float(user_decay)
        self.half_life_s = half_life_s
        self.positive_threshold = float(positive_threshold)
        self.normalise = bool(normalise)
        self._kg_idx = np.zeros(0, dtype=np.int64)  # source index -> graph item index, -1 if absent
        self._liked: dict[str, list[tuple[int, float | None]]] = {}
        super().__init__(item_ids)

    def _grow(self, n: int) -> None:
        old = len(self._kg_idx)
        if n > old:
            new = [self.kg.item_index.get(i, -1) for i in self._ids[old:n]]
            self._kg_idx = np.concatenate([self._kg_idx, np.asarray(new, dtype=np.int64)])

    def _learn(self, user: str, idx: int, rating: float | None, ts: float | None) -> None:
        if rating is None or rating >= self.positive_threshold:
            liked = self._liked.setdefault(user, [])
            liked.append((idx, ts))
            if len(liked) > 4 * max(self.recent, 1):
                del liked[: len(liked) - self.recent]

    def liked(self, user: str) -> list[str]:
        """The user's liked items, oldest first (at most the last ``recent`` are used)."""
        return [self._ids[i] for i, _ in self._liked.get(user, ())]

    def _weights(self, user: str, ts: float | None) -> dict[int, float]:
        """Graph item index -> recency weight of the user's recent likes that are in the graph."""
        liked = self._liked.get(user, [])[-self.recent :]
        now = ts if ts is not None else self._last_ts
        out: dict[int, float] = {}
        for k, (idx, t) in enumerate(reversed(liked)):
            g = int(self._kg_idx[idx])
            if g < 0:
                continue
            w = self.user_decay ** k
            if self.half_life_s and now is not None and t is not None:
                w *= 0.5 ** (max(now - t, 0.0) / self.half_life_s)
            out[g] = out.get(g, 0.0) + w
        return out

    def score_all(self, user: str, ts: float | None = None) -> np.ndarray:
        out = np.zeros(self.n_items)
        w = self._weights(user, ts)
        if not w:
            return out
        graph_scores = self.kg.profile_scores(w) / sum(w.values())
        if self.normalise:  # favour items whose overlap is large relative to their size
            deg = np.diff(self.kg.A.indptr).astype(np.float64)
            graph_scores = graph_scores / np.sqrt(np.maximum(deg, 1.0))
        kg_idx = self._kg_idx[: self.n_items]
        present = kg_idx >= 0
        out[present] = graph_scores[kg_idx[present]]
        return out

    def explain(self, user: str, item: str, titles=None) -> str | None:
        """The reason for ``item``: its strongest KG link to one of the user's recent likes."""
        best, best_w = None, 0.0
        for liked in reversed(self.liked(user)[-self.recent :]):
            links = self.kg.links(liked, item)
            w = sum(l.weight for l in links)
            if w > best_w:
                best, best_w = liked, w
        direct = [h for h in self.liked(user)[-self.recent :] if (h, item) in self.kg._direct or (item, h) in self.kg._direct]
        if direct:
            best = direct[-1]
        return None if best is None else self.kg.explain(best, item, titles)
