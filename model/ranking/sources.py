"""Candidate sources: the seam through which driftrec proposes items to rank.

Every source follows River's online-learning shape: it learns one interaction at a time
(:meth:`CandidateSource.learn_one`), and at any moment it can score every catalogue item for a user
(:meth:`CandidateSource.score_all`) or propose the ``n`` best items the user has not interacted with
(:meth:`CandidateSource.candidates`). Nothing looks ahead: a source knows exactly what it has learnt.

Implementations:

* :class:`PopularitySource` - interaction counts;
* :class:`DecayedPopularitySource` - counts decayed exponentially with a half-life (trending items);
* :class:`ItemKNNSource` - incremental item-to-item co-visitation from user histories, cosine-normalised,
  optionally weighting recent history items more (``user_decay``) and pairs close together in a user's
  sequence more (``pair_decay``);
* :class:`LMTextNeighbourSource` - items whose language-model text embedding is closest to the user's
  recent items; works for items nobody has interacted with yet (their text is known from the catalogue).

Items are indexed in the order they become known (catalogue first, then unseen ids from ``learn_one``);
``score_all`` returns a float array aligned with :attr:`CandidateSource.item_ids`.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from driftrec.model.base import CandidateSource


# ------------------------------------------------------------------------------- popularity


class PopularitySource(CandidateSource):
    """How many interactions each item has had."""

    name = "popularity"

    def __init__(self, item_ids: Iterable[str] = ()) -> None:
        self._counts = np.zeros(0)
        super().__init__(item_ids)

    def _grow(self, n: int) -> None:
        if n > len(self._counts):
            self._counts = np.concatenate([self._counts, np.zeros(max(n - len(self._counts), len(self._counts)))])

    def _learn(self, user, idx, rating, ts) -> None:
        self._counts[idx] += 1.0

    @property
    def counts(self) -> np.ndarray:
        return self._counts[: self.n_items]

    def score_all(self, user: str, ts: float | None = None) -> np.ndarray:
        return self._counts[: self.n_items].copy()


class DecayedPopularitySource(CandidateSource):
    """Interaction counts decayed exponentially: an interaction ``half_life_s`` old counts one half.

    Stored relative to a reference time that is moved forward now and then, so values never overflow;
    ranking is unaffected by the reference.
    """

    name = "decayed_popularity"

    def __init__(self, item_ids: Iterable[str] = (), half_life_s: float = 86400.0) -> None:
        if half_life_s <= 0:
            raise ValueError("half_life_s must be positive")
        self.half_life_s = float(half_life_s)
        self._rate = math.log(2.0) / self.half_life_s
        self._t0: float | None = None
        self._s = np.zeros(0)
        super().__init__(item_ids)

    def _grow(self, n: int) -> None:
        if n > len(self._s):
            self._s = np.concatenate([self._s, np.zeros(max(n - len(self._s), len(self._s)))])

    def _rebase(self, t: float) -> None:
        if self._t0 is None:
            self._t0 = t
        elif (t - self._t0) * self._rate > 30.0:
            self._s *= math.exp(-(t - self._t0) * self._rate)
            self._t0 = t

    def _learn(self, user, idx, rating, ts) -> None:
        t = ts if ts is not None else (self._last_ts if self._last_ts is not None else 0.0)
        self._rebase(t)
        self._s[idx] += math.exp((t - self._t0) * self._rate)

    def score_all(self, user: str, ts: float | None = None) -> np.ndarray:
        s = self._s[: self.n_items]
        if self._t0 is None:
            return s.copy()
        t = ts if ts is not None else (self._last_ts if self._last_ts is not None else self._t0)
        return s * math.exp(-(t - self._t0) * self._rate)


# ------------------------------------------------------------------------------- item-kNN


class ItemKNNSource(CandidateSource):
    """Incremental item-kNN over co-visitation in user histories.

    When a user interacts with item ``i``, the co-occurrence of ``i`` with each item ``j`` already in
    the user's history grows by ``pair_decay ** d`` (``d`` = how many interactions ago ``j`` was; 1.0 =
    plain co-occurrence). The similarity is the cosine-normalised co-occurrence
    ``C[i, j] / sqrt(n_i * n_j)``. A user's score for ``c`` is ``sum_k w_k * sim(h_k, c)`` over the
    user's last ``max_history`` items, ``w_k = user_decay ** k`` for the k-th most recent.

    Dense ``float32`` storage: fine up to ~20k items (ML-100K, ml-latest-small).
    """

    name = "itemknn"

    def __init__(
        self,
        item_ids: Iterable[str] = (),
        *,
        user_decay: float = 1.0,
        pair_decay: float = 1.0,
        max_history: int | None = None,
    ) -> None:
        if not 0 < user_decay <= 1 or not 0 < pair_decay <= 1:
            raise ValueError("user_decay and pair_decay must be in (0, 1]")
        self.user_decay = float(user_decay)
        self.pair_decay = float(pair_decay)
        self.max_history = max_history
        self._cap = 0
        self._C = np.zeros((0, 0), dtype=np.float32)
        self._n = np.zeros(0)
        super().__init__(item_ids)

    def _grow(self, n: int) -> None:
        if n <= self._cap:
            return
        cap = max(n, 2 * self._cap, 16)
        C = np.zeros((cap, cap), dtype=np.float32)
        C[: self._cap, : self._cap] = self._C
        self._C = C
        self._n = np.concatenate([self._n, np.zeros(cap - self._cap)])
        self._cap = cap

    def _learn(self, user, idx, rating, ts) -> None:
        hist = self._history.get(user)
        if hist:
            h = np.asarray(hist if self.pair_decay == 1.0 else hist[-200:], dtype=np.int64)
            if self.pair_decay < 1.0:
                w = (self.pair_decay ** np.arange(len(h) - 1, -1, -1)).astype(np.float32)
            else:
                w = np.float32(1.0)
            self._C[idx, h] += w
            self._C[h, idx] += w
        self._n[idx] += 1.0

    def _user_profile(self, user: str) -> tuple[np.ndarray, np.ndarray]:
        hist = self._history.get(user) or []
        if self.max_history:
            hist = hist[-self.max_history :]
        h = np.asarray(hist, dtype=np.int64)
        if self.user_decay < 1.0:
            w = self.user_decay ** np.arange(len(h) - 1, -1, -1)
        else:
            w = np.ones(len(h))
        return h, w

    def _inv_sqrt_counts(self, idx: np.ndarray | None = None) -> np.ndarray:
        n = self._n[: self.n_items] if idx is None else self._n[idx]
        with np.errstate(divide="ignore"):
            return np.where(n > 0, 1.0 / np.sqrt(np.where(n > 0, n, 1.0)), 0.0)

    def similarity_rows(self, rows: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
        """Cosine-normalised similarities ``sim(rows, cols)`` (all items when ``cols`` is None)."""
        n = self.n_items
        C = self._C[rows, :n] if cols is None else self._C[np.ix_(rows, cols)]
        return (C * self._inv_sqrt_counts(rows)[:, None]) * self._inv_sqrt_counts(cols)[None, :]

    def score_items(self, user: str, cols: np.ndarray | None = None) -> np.ndarray:
        """``sum_k w_k sim(h_k, c)`` for the items ``cols`` (all when None); computed as one
        vector-matrix product, since ``sim = C / sqrt(n_h n_c)`` factorises."""
        h, w = self._user_profile(user)
        size = self.n_items if cols is None else len(cols)
        if len(h) == 0:
            return np.zeros(size)
        wh = (w * self._inv_sqrt_counts(h)).astype(np.float32)
        if cols is None:
            raw = wh @ self._C[h, : self.n_items]
        else:
            raw = wh @ self._C[np.ix_(h, cols)]
        return raw.astype(np.float64) * self._inv_sqrt_counts(cols)

    def score_all(self, user: str, ts: float | None = None) -> np.ndarray:
        return self.score_items(user, None)

    def neighbours(self, item: str, n: int = 10) -> list[tuple[str, float]]:
        idx = self._index[item]
        sim = self.similarity_rows(np.asarray([idx]))[0]
        sim[idx] = -np.inf
        order = np.lexsort((np.arange(len(sim)), -sim))[:n]
        return [(self._ids[i], float(sim[i])) for i in order if sim[i] > 0]


# --------------------------------------------------------------------------- LM neighbours


class LMTextNeighbourSource(CandidateSource):
    """Items whose LM text embedding is closest to the user's recent items.

    ``vectors`` (or :meth:`set_item_vectors`) are L2-normalised item text embeddings; the user profile
    is the recency-weighted sum of the vectors of their last ``recent`` items. Items nobody has touched
    still get a score, which is what makes this source useful for new and rarely seen items.
    """

    name = "lm_neighbours"

    def __init__(
        self,
        item_ids: Iterable[str] = (),
        vectors: np.ndarray | None = None,
        *,
        recent: int = 10,
        user_decay: float = 0.85,
    ) -> None:
        self.recent = int(recent)
        self.user_decay = float(user_decay)
        self._V = np.zeros((0, 0), dtype=np.float32)
        super().__init__(item_ids)
        if vectors is not None:
            self.set_item_vectors(self._ids, vectors)

    def _grow(self, n: int) -> None:
        if n > self._V.shape[0]:
            d = self._V.shape[1]
            V = np.zeros((max(n, 2 * self._V.shape[0]), d), dtype=np.float32)
            V[: self._V.shape[0]] = self._V
            self._V = V

    def set_item_vectors(self, item_ids: Sequence[str], vectors) -> None:
        """Set (replace) the text vectors of ``item_ids`` (e.g. after an adapter update)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(item_ids):
            raise ValueError("vectors must be (len(item_ids), dim)")
        idx = np.asarray([self.add_item(i) for i in item_ids], dtype=np.int64)
        if self._V.shape[1] != vectors.shape[1]:
            self._V = np.zeros((max(self._V.shape[0], self.n_items), vectors.shape[1]), dtype=np.float32)
        if len(idx):
            self._V[idx] = vectors

    @property
    def vectors(self) -> np.ndarray:
        return self._V[: self.n_items]

    def _learn(self, user, idx, rating, ts) -> None:
        pass  # the text embeddings are the model; the user's history is kept by the base class

    def user_vector(self, user: str) -> np.ndarray:
        hist = (self._history.get(user) or [])[-self.recent :]
        d = self._V.shape[1]
        if not hist or d == 0:
            return np.zeros(d, dtype=np.float32)
        w = self.user_decay ** np.arange(len(hist) - 1, -1, -1)
        v = (w[:, None] * self._V[hist]).sum(axis=0)
        norm = np.linalg.norm(v)
        return (v / norm if norm > 0 else v).astype(np.float32)

    def score_all(self, user: str, ts: float | None = None) -> np.ndarray:
        if self._V.shape[1] == 0:
            return np.zeros(self.n_items)
        return (self.vectors @ self.user_vector(user)).astype(np.float64)


ALL_SOURCES = (PopularitySource, DecayedPopularitySource, ItemKNNSource, LMTextNeighbourSource)
