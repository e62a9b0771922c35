"""The item-kNN source's sparse store (large catalogues) gives the dense store's scores: full rows,
column subsets with repeats, similarity rows, with increments still in the append buffer and after it
was merged; and a catalogue growing past ``dense_max_items`` converts once and keeps what was learnt."""

from __future__ import annotations

import numpy as np
import pytest

from driftrec.model.ranking.sources import ItemKNNSource


@pytest.mark.parametrize("kw", [{}, {"user_decay": 0.9, "pair_decay": 0.9, "max_history": 60}])
def test_sparse_store_scores_as_the_dense_one(kw):
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(300)]
    dense, sparse = ItemKNNSource(ids, **kw), ItemKNNSource(ids, dense_max_items=0, **kw)
    assert sparse.sparse and not dense.sparse
    store = sparse._store
    store._size = 512  # a small buffer: merged many times over the stream
    store._r, store._c, store._v = store._r[:512], store._c[:512], store._v[:512]
    merged = 0
    for e in range(5000):
        u, it = f"u{rng.integers(50)}", ids[rng.integers(len(ids))]
        dense.learn_one(u, it, 5.0, e)
        before = store._fill
        sparse.learn_one(u, it, 5.0, e)
        merged += store._fill < before
    assert merged > 10 and store._fill > 0  # merged often, and some increments are still buffered
    for u in (f"u{k}" for k in range(50)):
        np.testing.assert_allclose(sparse.score_items(u), dense.score_items(u), rtol=1e-5, atol=1e-6)
        cols = rng.integers(0, len(ids), size=9)
        cols[3] = cols[1]
        np.testing.assert_allclose(sparse.score_items(u, cols), dense.score_items(u, cols), rtol=1e-5, atol=1e-6)
    rows = np.array([3, 7, 3])
    np.testing.assert_allclose(sparse.similarity_rows(rows), dense.similarity_rows(rows), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sparse.similarity_rows(rows, cols), dense.similarity_rows(rows, cols), rtol=1e-5, atol=1e-7)
    for item in ("i5", "i17"):
        got, want = sparse.neighbours(item, 5), dense.neighbours(item, 5)
        assert [i for i, _ in got] == [i for i, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-5)


def test_growing_past_the_dense_limit_converts_and_keeps_the_counts():
    src = ItemKNNSource([f"x{k}" for k in range(64)], dense_max_items=64)
    ref = ItemKNNSource([f"x{k}" for k in range(64)], dense_max_items=10_000)
    for s in (src, ref):
        for t, (u, i) in enumerate([("a", "x1"), ("a", "x2"), ("b", "x1"), ("b", "x2"), ("b", "x3")]):
            s.learn_one(u, i, 5.0, t)
    assert not src.sparse
    for s in (src, ref):
        s.add_item("x64")
        s.learn_one("a", "x64", 5.0, 9)
    assert src.sparse and not ref.sparse
    np.testing.assert_allclose(src.score_items("b"), ref.score_items("b"), rtol=1e-6)
    assert [i for i, _ in src.neighbours("x1")] == [i for i, _ in ref.neighbours("x1")]
    with pytest.raises(ValueError):
        ItemKNNSource(dense_max_items=-1)


@pytest.mark.parametrize("pair_decay", [1.0, 0.9])
@pytest.mark.parametrize("dense_max_items", [8192, 0])
def test_co_visitation_counts_follow_their_definition_with_repeated_items(pair_decay, dense_max_items):
    """C[i, j] grows by pair_decay ** d for each earlier item j of the user (d: how many interactions ago;
    an item the user met several times counts once, at its newest position; the last 200 with decay):
    the stores' incremental counts match a plain recomputation over a stream full of repeats."""
    rng = np.random.default_rng(1)
    n = 40
    src = ItemKNNSource(pair_decay=pair_decay, dense_max_items=dense_max_items)
    want = np.zeros((n, n))
    hist: dict[str, list[int]] = {}
    for t in range(3000):
        u, it = f"u{rng.integers(12)}", int(rng.integers(n))
        src.learn_one(u, f"i{it}", None, float(t))
        idx = src.index_of(f"i{it}")
        h = hist.setdefault(u, [])
        window = h if pair_decay == 1.0 else h[-200:]
        newest: dict[int, int] = {}
        for d, j in enumerate(reversed(window)):
            newest.setdefault(j, d)
        for j, d in newest.items():
            want[idx, j] += pair_decay ** d
            want[j, idx] += pair_decay ** d
        h.append(idx)
    store = src._store
    if store.sparse:
        store.compact()
        got = store.csr.toarray()[:n, :n]
    else:
        got = store.C[:n, :n]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-3)
