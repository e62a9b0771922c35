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


class _DenseCooc:
    """Co-occurrence counts as a dense ``float32`` matrix (capacity doubling): the fastest below ~10k items."""

    sparse = False

    def __init__(self) -> None:
        self.C = np.zeros((0, 0), dtype=np.float32)

    @property
    def cap(self) -> int:
        return self.C.shape[0]

    def grow(self, cap: int) -> None:
        C = np.zeros((cap, cap), dtype=np.float32)
        C[: self.cap, : self.cap] = self.C
        self.C = C

    def add(self, idx: int, h: np.ndarray, w) -> None:
        # ``C[idx, h] += w; C[h, idx] += w`` through 1-d views (half the cost of 2-d fancy indexing)
        row = self.C[idx]
        row[h] += w
        col = self.C[:, idx]
        col[h] += w

    def weighted_sum(self, h: np.ndarray, wh: np.ndarray, n: int) -> np.ndarray:
        """``wh @ C[h, :n]``."""
        return wh @ self.C[h, :n]

    def block(self, rows: np.ndarray, cols: np.ndarray | None, n: int) -> np.ndarray:
        """``C[rows][:, cols]`` (``cols`` None: the first ``n`` columns), dense."""
        return self.C[rows, :n] if cols is None else self.C[np.ix_(rows, cols)]

    def nbytes(self) -> int:
        return self.C.nbytes


class _SparseCooc:
    """Co-occurrence counts for large catalogues: a CSR matrix plus an append buffer of (row, col, value)
    increments, merged into the CSR when it fills. Memory grows with the pairs seen, not items^2; reads
    add the buffer's matching entries, so every read sees every increment."""

    sparse = True

    def __init__(self, n: int, dense: np.ndarray | None = None, buffer: int = 1 << 18) -> None:
        from scipy import sparse

        self._sp = sparse
        self.n = n
        self.csr = sparse.csr_matrix(dense) if dense is not None else sparse.csr_matrix((n, n), dtype=np.float32)
        self._size = buffer
        self._r = np.empty(buffer, dtype=np.int32)
        self._c = np.empty(buffer, dtype=np.int32)
        self._v = np.empty(buffer, dtype=np.float32)
        self._fill = 0

    @property
    def cap(self) -> int:
        return self.n

    def grow(self, cap: int) -> None:
        self.compact()
        self.csr.resize((cap, cap))
        self.n = cap

    def add(self, idx: int, h: np.ndarray, w) -> None:
        # as the dense ``C[idx, h] += w``: an item repeated in ``h`` counts once, with its last weight
        _, first_rev = np.unique(h[::-1], return_index=True)
        if len(first_rev) < len(h):
            keep = np.sort(len(h) - 1 - first_rev)
            h = h[keep]
            w = w[keep] if np.ndim(w) else w
        m = len(h)
        if 2 * m > self._size - self._fill:
            self.compact()
            if 2 * m > self._size:  # one huge history: straight into the matrix
                v = np.broadcast_to(np.asarray(w, dtype=np.float32), (m,))
                rows = np.concatenate([np.full(m, idx), h])
                cols = np.concatenate([h, np.full(m, idx)])
                self._merge(rows, cols, np.concatenate([v, v]))
                return
        f = self._fill
        self._r[f:f + m], self._c[f:f + m], self._v[f:f + m] = idx, h, w
        self._r[f + m:f + 2 * m], self._c[f + m:f + 2 * m], self._v[f + m:f + 2 * m] = h, idx, w
        self._fill = f + 2 * m

    def _merge(self, rows, cols, vals) -> None:
        inc = self._sp.csr_matrix((vals, (rows, cols)), shape=(self.n, self.n), dtype=np.float32)
        self.csr = (self.csr + inc).tocsr()

    def compact(self) -> None:
        f = self._fill
        if f:
            self._merge(self._r[:f], self._c[:f], self._v[:f])
            self._fill = 0

    def weighted_sum(self, h: np.ndarray, wh: np.ndarray, n: int) -> np.ndarray:
        rows, inv = np.unique(h, return_inverse=True)
        wu = np.zeros(len(rows), dtype=np.float64)
        np.add.at(wu, inv, wh)
        out = np.asarray(self.csr[rows].T @ wu, dtype=np.float64).ravel()[:n]
        f = self._fill
        if f:
            wrow = np.zeros(self.n)
            wrow[rows] = wu
            r, c, v = self._r[:f], self._c[:f], self._v[:f]
            sel = wrow[r] != 0
            out += np.bincount(c[sel], weights=wrow[r[sel]] * v[sel], minlength=self.n)[:n]
        return out.astype(np.float32)

    def block(self, rows: np.ndarray, cols: np.ndarray | None, n: int) -> np.ndarray:
        urows, inv = np.unique(rows, return_inverse=True)
        sub = self.csr[urows]
        out = (sub[:, :n] if cols is None else sub[:, cols]).toarray()
        f = self._fill
        if f:
            rpos = np.full(self.n, -1)
            rpos[urows] = np.arange(len(urows))
            if cols is None:
                cpos = np.arange(self.n)
                cpos[n:] = -1
            else:
                cpos = np.full(self.n, -1)
                cpos[cols] = np.arange(len(cols))  # a repeated column: its last position gets the buffer
            r, c, v = self._r[:f], self._c[:f], self._v[:f]
            sel = (rpos[r] >= 0) & (cpos[c] >= 0)
            np.add.at(out, (rpos[r[sel]], cpos[c[sel]]), v[sel])
            if cols is not None and len(np.unique(cols)) < len(cols):
                out = out[:, cpos[cols]]
        return out[inv]

    def nbytes(self) -> int:
        return int(self.csr.data.nbytes + self.csr.indices.nbytes + self.csr.indptr.nbytes
                   + self._r.nbytes + self._c.nbytes + self._v.nbytes)


_PAIR_WINDOW = 200  # with pair_decay < 1, the earlier items an interaction co-visits (decay ** 200 is ~0)


class ItemKNNSource(CandidateSource):
    """Incremental item-kNN over co-visitation in user histories.

    When a user interacts with item ``i``, the co-occurrence of ``i`` with each item ``j`` already in
    the user's history grows by ``pair_decay ** d`` (``d`` = how many interactions ago ``j`` was; 1.0 =
    plain co-occurrence). The similarity is the cosine-normalised co-occurrence
    ``C[i, j] / sqrt(n_i * n_j)``. A user's score for ``c`` is ``sum_k w_k * sim(h_k, c)`` over the
    user's last ``max_history`` items, ``w_k = user_decay ** k`` for the k-th most recent.

    Storage: a dense ``float32`` matrix up to ``dense_max_items`` items (fastest; 256 MB at 8,192), then
    a sparse one (CSR plus an append buffer, memory proportional to the co-visited pairs), converted
    once when the catalogue grows past the limit.
    """

    name = "itemknn"

    def __init__(
        self,
        item_ids: Iterable[str] = (),
        *,
        user_decay: float = 1.0,
        pair_decay: float = 1.0,
        max_history: int | None = None,
        dense_max_items: int = 8192,
    ) -> None:
        if not 0 < user_decay <= 1 or not 0 < pair_decay <= 1:
            raise ValueError("user_decay and pair_decay must be in (0, 1]")
        if dense_max_items < 0:
            raise ValueError("dense_max_items must be >= 0")
        self.user_decay = float(user_decay)
        self.pair_decay = float(pair_decay)
        self.max_history = max_history
        self.dense_max_items = int(dense_max_items)
        # pair_decay ** d for d = _PAIR_WINDOW - 1 ... 0 (the newest earlier item last)
        self._pair_w = (self.pair_decay ** np.arange(_PAIR_WINDOW - 1, -1, -1)).astype(np.float32)
        self._store: _DenseCooc | _SparseCooc = _DenseCooc()
        self._n = np.zeros(0)
        self._isc = np.zeros(0)  # 1 / sqrt(n) per item, 0 where n = 0
        super().__init__(item_ids)

    @property
    def sparse(self) -> bool:
        return self._store.sparse

    def _grow(self, n: int) -> None:
        store = self._store
        if n <= store.cap:
            return
        cap = max(n, 2 * store.cap, 16)
        if store.sparse:
            store.grow(cap)
        elif n <= self.dense_max_items:
            store.grow(max(n, min(cap, self.dense_max_items)))
        else:  # past the dense limit: convert once, then grow sparse
            self._store = _SparseCooc(store.cap, dense=store.C if store.cap else None)
            self._store.grow(cap)
        if cap > len(self._n):
            self._n = np.concatenate([self._n, np.zeros(cap - len(self._n))])
            self._isc = np.concatenate([self._isc, np.zeros(cap - len(self._isc))])

    def _learn(self, user, idx, rating, ts) -> None:
        if self.pair_decay == 1.0:
            # every earlier item counts once, however often it recurs (as the stores' ``add`` does with a
            # repeated index): the user's distinct items, not the whole (growing) history
            seen = self._seen.get(user)
            if seen:
                self._store.add(idx, np.fromiter(seen, dtype=np.int64, count=len(seen)), np.float32(1.0))
        else:
            hist = self._history.get(user)
            if hist:
                h = np.asarray(hist[-_PAIR_WINDOW:], dtype=np.int64)
                self._store.add(idx, h, self._pair_w[-len(h):])
        self._n[idx] += 1.0
        self._isc[idx] = 1.0 / math.sqrt(self._n[idx])

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
        """``1 / sqrt(n_i)`` (0 for items never seen), kept up to date by ``_learn``."""
        return self._isc[: self.n_items] if idx is None else self._isc[idx]

    def similarity_rows(self, rows: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
        """Cosine-normalised similarities ``sim(rows, cols)`` (all items when ``cols`` is None)."""
        C = self._store.block(np.asarray(rows, dtype=np.int64), cols, self.n_items)
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
            raw = self._store.weighted_sum(h, wh, self.n_items)
        else:
            raw = wh @ self._store.block(h, cols, self.n_items)
        return raw.astype(np.float64) * self._inv_sqrt_counts(cols)

    def score_all(self, user: str, ts: float | None = None) -> np.ndarray:
        return self.score_items(user, None)

    def neighbours(self, item: str, n: int = 10) -> list[tuple[str, float]]:
        idx = self._index[item]
        sim = self.similarity_rows(np.asarray([idx]))[0]
        sim[idx] = -np.inf
        order = np.lexsort((np.arange(len(sim)), -sim))[:n]
        return [(self._ids[i], float(sim[i])) for i in order if sim[i] > 0]

    def nbytes(self) -> int:
        """Bytes held by the co-occurrence store."""
        return self._store.nbytes()


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
