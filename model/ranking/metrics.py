"""Ranking metrics shared by the replay, the adapter gate and the knowledge checks."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["rank_metrics"]


def rank_metrics(scores: np.ndarray, target: int, allowed: np.ndarray | None = None, k: int = 10) -> tuple[float, float]:
    """HR@k and NDCG@k of item ``target`` among the ``allowed`` items, ranked by ``scores`` (desc).

    With ``g`` allowed items scoring strictly higher than the target and ``e`` others tied with it,
    the target's 0-based rank is uniform on ``g .. g+e``; the metrics are their expectations.
    """
    scores = np.asarray(scores, dtype=np.float64)
    s = scores[target]
    others = np.ones(len(scores), dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool).copy()
    others[target] = False
    sel = scores[others]
    if math.isnan(s):
        s = -math.inf
    sel = np.where(np.isnan(sel), -math.inf, sel)
    g = int((sel > s).sum())
    e = int((sel == s).sum())
    hr = 0.0
    ndcg = 0.0
    for r in range(g, min(g + e, k - 1) + 1):
        hr += 1.0
        ndcg += 1.0 / math.log2(r + 2)
    return hr / (e + 1), ndcg / (e + 1)
