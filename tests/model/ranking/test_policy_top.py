"""``RankingPolicy.top`` sorts only the items tied with or above the k-th best: the same list, ties broken
by catalogue order, as sorting every allowed item - checked against the full sort on random scores with
many ties, masked items, fewer allowed items than k, and infinities."""

from __future__ import annotations

import numpy as np
import pytest

from driftrec.model.ranking.policy import PolicyConfig, RankingPolicy


def _full_sort(scores: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
    masked = np.where(allowed, scores, -np.inf)
    order = np.lexsort((np.arange(len(masked)), -masked))[:k]
    return order[np.isfinite(masked[order])]


@pytest.mark.parametrize("n", [1, 7, 50, 2000])
def test_top_is_the_full_sort_with_catalogue_order_tie_breaks(n):
    policy = RankingPolicy(PolicyConfig(), {}, [])
    rng = np.random.default_rng(n)
    for _ in range(200):
        scores = rng.normal(size=n)
        scores[rng.random(n) < 0.4] = 0.5  # many ties, at the cut too
        if rng.random() < 0.2:
            scores[rng.integers(n)] = np.inf
        allowed = rng.random(n) < rng.choice([0.02, 0.5, 0.95])
        k = int(rng.integers(1, 40))
        assert np.array_equal(policy.top(scores, allowed, k), _full_sort(scores, allowed, k))
