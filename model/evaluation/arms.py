"""The systems a replay measures side by side on the same evaluation points ("arms").

* :class:`PolicyArm` - the ranking policy (:mod:`driftrec.model.ranking.policy`), the same code the
  worker serves; with its knowledge model retrained periodically over the replay (warm-started). The
  full system and its ablations (no LM text, no knowledge graph) are policy arms.
* :class:`ModelArm` - a sequence model's own scores, no fusion: ``lm_only`` (the knowledge model
  alone) and ``sasrec`` (the SASRec baseline).
* :class:`SourceArm` - a candidate source of the full policy (popularity, decayed popularity,
  item-kNN) as a baseline.

Every arm scores all items for a user at an evaluation point (:meth:`scores`) and learns from every
event (:meth:`observe`); :meth:`refit` is the periodic training step.
"""

from __future__ import annotations

import time
from typing import Callable, Protocol, Sequence

import numpy as np

from driftrec.model.base import ItemSequenceModel
from driftrec.model.ranking.policy import RankingPolicy

Histories = list[tuple[str, list[tuple[str, float]]]]


class ModelTrainer(Protocol):
    """Trains a sequence model over the replay, warm-starting each fit from the last."""

    def fit(self, histories: Histories, *, initial: bool) -> dict: ...

    def model(self) -> ItemSequenceModel: ...


class Arm:
    name: str = ""

    def scores(self, user: str, ts: float) -> np.ndarray:
        raise NotImplementedError

    def observe(self, user: str, item: str, rating: float, ts: float, scores: np.ndarray | None) -> None:
        pass

    def refit(self, histories: Histories, *, initial: bool) -> dict | None:
        return None

    def prefetch(self, events: Sequence[tuple]) -> None:
        """The next ``events`` (user, item, rating, ts), for arms that can batch work ahead of them."""

    def info(self) -> dict:
        return {}


class PolicyArm(Arm):
    """A ranking policy; its knowledge model (if any) comes from ``trainer`` after each refit."""


    def __init__(self, name: str, policy: RankingPolicy, trainer: ModelTrainer | None = None) -> None:
        self.name = name
        self.policy = policy
        self.trainer = trainer
        self.fits: list[dict] = []

    def scores(self, user: str, ts: float) -> np.ndarray:
        # what the worker ranks by (RankingPolicy.rank_scores, through recommend)
        fused = self.policy.fused_scores(user, ts)
        ranked = self.policy.new_item_slot(user, fused)
        self._fused = (ranked, fused)
        return ranked

    def observe(self, user, item, rating, ts, scores) -> None:
        # the scores double as the fusion's hard-negative pool: the fusion's own, before the new-item slot
        # and not the prior's before it has learnt (as the worker's learner computes them)
        last = getattr(self, "_fused", None)
        if last is not None and scores is last[0]:
            scores = last[1]
        self._fused = None
        self.policy.observe(user, item, rating, ts, scores=scores if self.policy.corrector.n_learned else None)

    def prefetch(self, events: Sequence[tuple]) -> None:
        self.policy.prefetch(events)

    def refit(self, histories: Histories, *, initial: bool) -> dict | None:
        if self.trainer is None:
            return None
        stats = self.trainer.fit(histories, initial=initial)
        self.policy.set_model(self.trainer.model())
        self.fits.append(stats)
        return stats

    def info(self) -> dict:
        p = self.policy
        return {
            "features": list(p.feature_names),
            "corrector_weights": p.corrector.weights(),
            "corrector_updates": p.corrector.n_learned,
            "drift_count": p.corrector.drift_count,
            "model": {"fits": self.fits, "seconds": sum(f.get("seconds", 0.0) for f in self.fits)},
        }


class ModelArm(Arm):
    """A sequence model ranking alone: the user's history (kept here) -> the model's item scores."""

    def __init__(self, name: str, item_ids: Sequence[str], trainer: ModelTrainer | None = None, *,
                 shared: Callable[[], ItemSequenceModel | None] | None = None) -> None:
        self.name = name
        self.item_ids = list(item_ids)
        self.trainer = trainer
        self.shared = shared  # use another arm's model (lm_only shares the full system's)
        self.hist: dict[str, list[tuple[str, float]]] = {}
        self.fits: list[dict] = []
        self.seconds = 0.0

    def _model(self) -> ItemSequenceModel | None:
        if self.shared is not None:
            return self.shared()
        return self.trainer.model() if self.trainer is not None and self.fits else None

    def scores(self, user: str, ts: float) -> np.ndarray:
        model = self._model()
        if model is None:
            return np.zeros(len(self.item_ids))
        t0 = time.perf_counter()
        h = self.hist.get(user, [])
        s = np.asarray(model.score_items([i for i, _ in h], [r for _, r in h], self.item_ids), dtype=np.float64)
        self.seconds += time.perf_counter() - t0
        return s

    def observe(self, user, item, rating, ts, scores) -> None:
        self.hist.setdefault(user, []).append((item, rating))

    def refit(self, histories: Histories, *, initial: bool) -> dict | None:
        if self.trainer is None:
            return None
        stats = self.trainer.fit(histories, initial=initial)
        self.fits.append(stats)
        return stats

    def info(self) -> dict:
        return {"model": {"fits": self.fits, "seconds": sum(f.get("seconds", 0.0) for f in self.fits) + self.seconds}}


class SourceArm(Arm):
    """A candidate source (owned and fed by a policy) scored on its own."""

    def __init__(self, name: str, source) -> None:
        self.name = name
        self.source = source

    def scores(self, user: str, ts: float) -> np.ndarray:
        return self.source.score_all(user, ts)
