"""Online correction: the last stage of the ranking, learnt from every feedback event.

A :class:`Corrector` maps a feature dict (LM score, item-kNN score, popularity, decayed popularity,
recency, user/item biases, ...) to the final ranking score, and learns online from labelled examples
(``y`` = 1 for an item the user went on to like, 0 for sampled negatives among the items that were
ranked). This is the corrector seam; :class:`RiverCorrector` is the production implementation (a River
pipeline, by default ``StandardScaler | LogisticRegression``), :class:`LinearBlendCorrector` a fixed,
non-learning blend useful as a fallback and test double.

Every corrector watches its own error stream with a River drift detector (:class:`DriftMonitor`,
ADWIN by default). ADWIN readily fires while a model is still warming up, so detections before
``min_updates`` errors are ignored. ``drift_detected`` says whether the latest update detected drift,
``drift_count`` how many times; callbacks registered with :meth:`Corrector.on_drift` are called with a
:class:`DriftEvent` so other components (the trainer, the metrics) can act.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Sequence

import numpy as np

from driftrec.model.base import Corrector, Features
from driftrec.model.drift import DriftEvent, DriftMonitor

__all__ = ["ALL_CORRECTORS", "Corrector", "DriftEvent", "DriftMonitor", "LinearBlendCorrector", "RiverCorrector",
           "default_river_model"]

log = logging.getLogger(__name__)


def default_river_model(learning_rate: float = 0.02, l2: float = 1e-5):
    from river import compose, linear_model, optim, preprocessing

    return compose.Pipeline(
        preprocessing.StandardScaler(),
        linear_model.LogisticRegression(optimizer=optim.SGD(learning_rate), l2=l2),
    )


class RiverCorrector(Corrector):
    """A River classifier pipeline (default ``StandardScaler | LogisticRegression``).

    The final score is the predicted probability that the user likes the item. For the default
    pipeline, :meth:`predict_many` scores a whole candidate matrix in numpy with the same arithmetic
    as River (the River objects stay the single source of truth for the state).
    """

    name = "river"

    def __init__(self, model=None, *, learning_rate: float = 0.02, l2: float = 1e-5, drift_detector=None,
                 min_updates: int = 500) -> None:
        super().__init__(drift_detector=drift_detector, min_updates=min_updates)
        self.model = model if model is not None else default_river_model(learning_rate, l2)

    def predict_one(self, x: Features) -> float:
        proba = self.model.predict_proba_one(dict(x))
        return float(proba.get(True, proba.get(1, 0.0)))

    def _learn_one(self, x: Features, y: float) -> None:
        self.model.learn_one(dict(x), bool(y >= 0.5))

    def _linear_parts(self):
        """(scaler, logistic regression) when the pipeline is exactly that pair, else None."""
        from river import linear_model, preprocessing

        steps = list(getattr(self.model, "steps", {}).values())
        if (
            len(steps) == 2
            and isinstance(steps[0], preprocessing.StandardScaler)
            and isinstance(steps[1], linear_model.LogisticRegression)
        ):
            return steps[0], steps[1]
        return None

    def predict_many(self, X: np.ndarray, names: Sequence[str]) -> np.ndarray:
        parts = self._linear_parts()
        if parts is None:
            return super().predict_many(X, names)
        Z, w = self._standardised(X, names, parts)
        logit = Z @ w + float(parts[1].intercept)
        return 1.0 / (1.0 + np.exp(-np.clip(logit, -50, 50)))

    def learn_group(self, X: np.ndarray, names: Sequence[str]) -> None:
        """The pairwise updates of :meth:`Corrector.learn_group`, applied for the default pipeline in plain
        float arithmetic on River's own state (the scaler's counts, means and variances, the regression's
        weights, intercept and iteration count; the same update order as ``Pipeline.learn_one``: the
        scaler learns, then the model learns on the re-standardised example), with the drift monitor fed
        the same errors. A River pipeline call costs ~75 us an example; this does the twelve of a group in
        a fraction of that. Equal to River's own path up to float summation order (test)."""
        parts = self._linear_parts()
        if parts is None or not self._plain(parts):
            return super().learn_group(X, names)
        scaler, lr = parts
        X = np.asarray(X, dtype=np.float64)
        counts, means, vars_ = scaler.counts, scaler.means, scaler.vars
        W = lr._weights
        current = W.to_dict()
        w = [current.get(n, 0.0) for n in names]
        b = lr.intercept
        opt = lr.optimizer
        l2, clip = lr.l2, lr.clip_gradient
        cnt = [counts[n] for n in names]
        mu = [means[n] for n in names]
        var = [vars_[n] for n in names]
        monitor = self.monitor
        ilr = lr.intercept_lr
        x0 = X[0].tolist()
        for r in range(1, len(X)):
            d = [a - c for a, c in zip(x0, X[r].tolist())]
            for x, y in ((d, 1), ([-v for v in d], 0)):
                # predict_one before learning (the error the drift monitor watches)
                raw = sum([wj * ((xj - m) / v ** 0.5) for wj, xj, m, v in zip(w, x, mu, var) if v]) + b
                err = abs(y - _sigmoid(raw))
                # the scaler learns (StandardScaler.learn_one), then the regression on the new standardisation
                cnt = [c + 1 for c in cnt]
                new_mu = [m + (xj - m) / c for m, xj, c in zip(mu, x, cnt)]
                var = [v + ((xj - m) * (xj - nm) - v) / c for v, xj, m, nm, c in zip(var, x, mu, new_mu, cnt)]
                mu = new_mu
                z = [(xj - m) / v ** 0.5 if v else 0.0 for xj, m, v in zip(x, mu, var)]
                raw = sum([wj * zj for wj, zj in zip(w, z)]) + b
                g = _log_gradient(y, raw)
                g = max(-clip, min(clip, g))
                b -= ilr.get(opt.n_iterations) * g
                step = opt.learning_rate
                if l2:
                    w = [wj - step * (zj * g + wj * l2) for wj, zj in zip(w, z)]
                else:
                    w = [wj - step * (zj * g) for wj, zj in zip(w, z)]
                opt.n_iterations += 1
                self.n_learned += 1
                monitor.update(err)
        for j, n in enumerate(names):
            counts[n], means[n], vars_[n] = cnt[j], mu[j], var[j]
            W[n] = w[j]
        lr.intercept = b

    @staticmethod
    def _plain(parts) -> bool:
        """The default pipeline's exact shape: no window, standard deviation on, plain SGD, log loss, no L1."""
        from river import optim

        scaler, lr = parts
        return (scaler.window_size is None and scaler.with_std and type(lr.optimizer) is optim.SGD
                and type(lr.loss) is optim.losses.Log and not lr.l1 and lr.loss.weight_pos == 1.0
                and lr.loss.weight_neg == 1.0)

    def weights(self) -> dict[str, float]:
        parts = self._linear_parts()
        return dict(parts[1].weights) if parts else {}

    def contributions(self, X: np.ndarray, names: Sequence[str]) -> np.ndarray | None:
        """Each feature's share of the logit (standardised value x weight), rows x features; None when the
        pipeline is not the linear default (no per-feature attribution then). Explains, changes nothing."""
        parts = self._linear_parts()
        if parts is None:
            return super().contributions(X, names)
        Z, w = self._standardised(X, names, parts)
        return Z * w

    @staticmethod
    def _standardised(X: np.ndarray, names: Sequence[str], parts) -> tuple[np.ndarray, np.ndarray]:
        """The scaler's standardisation of ``X`` (columns ``names``) and the model's weights."""
        scaler, lr = parts
        X = np.asarray(X, dtype=np.float64)
        mean = np.array([scaler.means.get(n, 0.0) for n in names])
        var = np.array([scaler.vars.get(n, 0.0) for n in names])
        w = np.array([lr.weights.get(n, 0.0) for n in names])
        with np.errstate(divide="ignore", invalid="ignore"):
            Z = np.where(var > 0, (X - mean) / np.sqrt(np.where(var > 0, var, 1.0)), 0.0)
        return Z, w


def _sigmoid(x: float) -> float:
    """River's ``utils.math.sigmoid``."""
    if x < -30:
        return 0.0
    if x > 30:
        return 1.0
    return 1 / (1 + math.exp(-x))


def _log_gradient(y: int, raw: float) -> float:
    """River's ``optim.losses.Log.gradient`` for y in {0, 1}, unit weights."""
    y = -1 if y == 0 else 1
    z = raw * y
    if z > 18.0:
        return math.exp(-z) * -y
    if z < -18.0:
        return float(-y)
    return -y / (math.exp(z) + 1.0)


class LinearBlendCorrector(Corrector):
    """A fixed weighted sum of features, squashed to (0, 1). Learns nothing but still monitors drift."""

    name = "blend"

    def __init__(self, weights: Mapping[str, float] | None = None, *, bias: float = 0.0, drift_detector=None,
                 min_updates: int = 500) -> None:
        super().__init__(drift_detector=drift_detector, min_updates=min_updates)
        self.weights_ = dict(weights or {})
        self.bias = float(bias)

    def predict_one(self, x: Features) -> float:
        if self.weights_:
            z = self.bias + sum(w * float(x.get(k, 0.0)) for k, w in self.weights_.items())
        else:
            z = self.bias + sum(float(v) for v in x.values())
        return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))

    def _learn_one(self, x: Features, y: float) -> None:
        pass


ALL_CORRECTORS = (RiverCorrector, LinearBlendCorrector)
