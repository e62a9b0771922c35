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
