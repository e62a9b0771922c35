"""The model's seams, one abstract base each: :class:`Scorer`, :class:`CandidateSource`, :class:`Corrector`,
:class:`ItemSequenceModel`.

A scorer turns a user context (who, what they did recently, optional free text) and a list of candidate
item ids into one score per candidate, and says which model and adapter produced the scores. The
streaming pipeline, the HTTP server and the offline evaluation only talk to this interface, so the
language-model scorer (:class:`driftrec.model.serving.scorer.LMScorer`) can be replaced by a test double or another model.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from driftrec.model.drift import DriftEvent, DriftMonitor

Features = Mapping[str, float]


@dataclass(frozen=True)
class HistoryEntry:
    """One past interaction: an item the user clicked (rating None) or rated (0..5)."""

    item_id: str
    rating: float | None = None
    event_time: float | None = None


@dataclass(frozen=True)
class UserContext:
    """What a scorer knows about a user at request time.

    ``history`` is newest first. ``text`` is optional free text (a query, a profile) that is added to
    the rendered history. ``domain`` picks the catalogue and the adapter (None = the default domain).
    """

    user_id: str
    history: tuple[HistoryEntry, ...] = ()
    text: str | None = None
    domain: str | None = None


@dataclass(frozen=True)
class ScoreResult:
    """Scores for the candidates that could be scored, all from one model + adapter snapshot."""

    item_ids: tuple[str, ...]
    scores: tuple[float, ...]
    domain: str
    adapter_version: str
    model_version: str
    unknown: tuple[str, ...] = ()  # candidate ids that are not in the catalogue (not scored)
    reasons: tuple[str, ...] = ()  # optional short reason per scored item (same order)

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.item_ids, self.scores))

    def top(self, k: int, exclude: Iterable[str] = ()) -> list[tuple[str, float, str]]:
        """The ``k`` best (item_id, score, reason), best first, skipping ``exclude``."""
        skip = set(exclude)
        reasons = self.reasons or ("",) * len(self.item_ids)
        ranked = sorted(
            (
                (i, s, r)
                for i, s, r in zip(self.item_ids, self.scores, reasons)
                if i not in skip
            ),
            key=lambda t: (-t[1], t[0]),
        )
        return ranked[:k]


@dataclass(frozen=True)
class VersionInfo:
    """Which model and adapter a scorer serves for a domain."""

    domain: str
    model_version: str
    adapter_version: str
    extra: dict[str, Any] = field(default_factory=dict)


class Scorer(ABC):
    """Abstract scorer. Implementations must be safe to call from several threads at once."""

    @abstractmethod
    def score(self, context: UserContext, item_ids: Sequence[str] | None = None) -> ScoreResult:
        """Score ``item_ids`` for ``context`` (None = every catalogue item of the context's domain).

        Blocking (may run a model forward): call it from a worker thread, or use :meth:`score_async`.
        """

    @abstractmethod
    def version_info(self, domain: str | None = None) -> VersionInfo:
        """The model and adapter versions currently serving ``domain``."""

    def ready(self) -> bool:
        """True once the scorer can answer requests."""
        return True

    async def score_async(self, context: UserContext, item_ids: Sequence[str] | None = None) -> ScoreResult:
        """:meth:`score` off the event loop (default: the loop's default executor)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.score, context, item_ids)


# --------------------------------------------------------------------------- candidate source


class CandidateSource(ABC):
    """An online candidate generator/scorer over a growing item catalogue."""

    #: short name used in reports and as a feature name
    name: str = "source"

    def __init__(self, item_ids: Iterable[str] = ()) -> None:
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        self._history: dict[str, list[int]] = {}
        self._seen: dict[str, set[int]] = {}
        self._last_ts: float | None = None
        for item in item_ids:
            self.add_item(item)

    # ---------------------------------------------------------------------------- catalogue

    @property
    def item_ids(self) -> list[str]:
        return list(self._ids)

    @property
    def n_items(self) -> int:
        return len(self._ids)

    def index_of(self, item: str) -> int:
        return self._index[item]

    def add_item(self, item: str) -> int:
        """Make ``item`` known (idempotent); returns its index."""
        idx = self._index.get(item)
        if idx is None:
            idx = len(self._ids)
            self._ids.append(item)
            self._index[item] = idx
            self._grow(len(self._ids))
        return idx

    def _grow(self, n: int) -> None:
        """Hook: make per-item state hold at least ``n`` items."""

    # ------------------------------------------------------------------------------- users

    def history(self, user: str) -> list[str]:
        """Items the user interacted with, oldest first."""
        return [self._ids[i] for i in self._history.get(user, ())]

    def seen(self, user: str) -> set[str]:
        return {self._ids[i] for i in self._seen.get(user, ())}

    def seen_mask(self, user: str) -> np.ndarray:
        mask = np.zeros(self.n_items, dtype=bool)
        seen = self._seen.get(user)
        if seen:
            mask[list(seen)] = True
        return mask

    # ---------------------------------------------------------------------------- learning

    def learn_one(self, user: str, item: str, rating: float | None = None, ts: float | None = None) -> None:
        """Learn one interaction (a rating, or a click with ``rating=None``)."""
        idx = self.add_item(item)
        if ts is not None:
            self._last_ts = ts if self._last_ts is None else max(self._last_ts, ts)
        self._learn(user, idx, rating, ts)
        self._history.setdefault(user, []).append(idx)
        self._seen.setdefault(user, set()).add(idx)

    @abstractmethod
    def _learn(self, user: str, idx: int, rating: float | None, ts: float | None) -> None:
        """Update the model with one interaction; the user's history does not hold it yet."""

    # ----------------------------------------------------------------------------- scoring

    @abstractmethod
    def score_all(self, user: str, ts: float | None = None) -> np.ndarray:
        """A score for every known item (aligned with :attr:`item_ids`), higher = better."""

    def score_many(self, user: str, items: Sequence[str], ts: float | None = None) -> list[float]:
        scores = self.score_all(user, ts)
        return [float(scores[self._index[i]]) if i in self._index else 0.0 for i in items]

    def candidates(
        self, user: str, n: int = 10, exclude: Iterable[str] = (), ts: float | None = None
    ) -> list[tuple[str, float]]:
        """The ``n`` best items the user has not interacted with (and not in ``exclude``), best first.

        Ties are broken by item index (catalogue order), so the answer is deterministic.
        """
        if n <= 0 or not self._ids:
            return []
        scores = np.asarray(self.score_all(user, ts), dtype=np.float64).copy()
        mask = self.seen_mask(user)
        for item in exclude:
            idx = self._index.get(item)
            if idx is not None:
                mask[idx] = True
        scores[mask] = -np.inf
        allowed = int((~mask).sum())
        n = min(n, allowed)
        if n == 0:
            return []
        order = np.lexsort((np.arange(len(scores)), -scores))[:n]
        return [(self._ids[i], float(scores[i])) for i in order]


# --------------------------------------------------------------------------------- corrector


class Corrector(ABC):
    """Online model from a feature dict to a ranking score (higher = better)."""

    name: str = "corrector"

    def __init__(self, *, drift_detector=None, min_updates: int = 500) -> None:
        self.monitor = DriftMonitor(drift_detector, min_updates=min_updates, name=self.name)
        self.n_learned = 0

    # ------------------------------------------------------------------------------- model

    @abstractmethod
    def predict_one(self, x: Features) -> float:
        """The score for one example (a probability-like value in [0, 1] for the River model)."""

    @abstractmethod
    def _learn_one(self, x: Features, y: float) -> None: ...

    def learn_one(self, x: Features, y: float) -> float:
        """Learn one labelled example; returns the error (|y - prediction| before learning)."""
        err = abs(float(y) - float(self.predict_one(x)))
        self._learn_one(x, y)
        self.n_learned += 1
        self.monitor.update(err)
        return err

    def predict_many(self, X: np.ndarray, names: Sequence[str]) -> np.ndarray:
        """Scores for the rows of ``X`` (columns named ``names``); override for speed."""
        return np.asarray([self.predict_one(dict(zip(names, map(float, row)))) for row in X])

    def learn_group(self, X: np.ndarray, names: Sequence[str]) -> None:
        """Learn one ranking example: row 0 of ``X`` is an item the user went on to like, the other rows
        items they did not pick. Default: RankNet-style pairs, ``x_pos - x_neg`` -> 1 and the mirror -> 0
        (a linear model of the differences then ranks); listwise learners override."""
        X = np.asarray(X, dtype=np.float64)
        for r in range(1, len(X)):
            d = X[0] - X[r]
            self.learn_one(dict(zip(names, d.tolist())), 1.0)
            self.learn_one(dict(zip(names, (-d).tolist())), 0.0)

    def contributions(self, X: np.ndarray, names: Sequence[str]) -> np.ndarray | None:
        """Each feature's share of each row's score (rows x features), for explanations; None when the
        corrector cannot attribute. Explains, changes nothing."""
        return None

    # ------------------------------------------------------------------------------- drift

    @property
    def drift_detected(self) -> bool:
        return self.monitor.drift_detected

    @property
    def drift_count(self) -> int:
        return self.monitor.drift_count

    def on_drift(self, callback: Callable[[DriftEvent], None]) -> None:
        self.monitor.on_drift(callback)


# ------------------------------------------------------------------------------ knowledge model


class ItemSequenceModel(ABC):
    """Scores every catalogue item for a user from the user's item sequence: the knowledge model the
    ranking policy fuses (item representations from the LM's text and the graph's entities).

    Item ids are the catalogue's; items the model has not seen in training are scored from their content
    once :meth:`add_items` has told it about them.
    """

    version: str = ""

    @abstractmethod
    def knows(self, item_id: str) -> bool: ...

    @abstractmethod
    def add_items(self, items: Sequence[Any]) -> None:
        """Make new catalogue items (:class:`~driftrec.core.contracts.Item`) scorable."""

    @abstractmethod
    def score_items(self, history: Sequence[str], ratings: Sequence[float | None], item_ids: Sequence[str]) -> np.ndarray:
        """Scores of ``item_ids`` for a user whose interactions (oldest first) were ``history``."""

    def score_items_many(self, histories: Sequence[Sequence[str]], ratings: Sequence[Sequence[float | None]],
                         item_ids: Sequence[str]) -> np.ndarray:
        """:meth:`score_items` of several users at once (rows aligned with ``histories``); each row must equal
        what :meth:`score_items` gives that user alone. Models override it to batch their forwards."""
        return np.stack([np.asarray(self.score_items(h, r, item_ids), dtype=np.float64)
                         for h, r in zip(histories, ratings)]) if histories else np.zeros((0, len(item_ids)))

    def text_vectors(self, item_ids: Sequence[str] | None = None) -> np.ndarray | None:
        """L2-normalised LM text vectors of ``item_ids`` (None: the model has no text part)."""
        return None

    def user_vector(self, history: Sequence[str]) -> Any | None:
        """A compact representation of the user (a vector) from which :meth:`score_vector` gives the same
        scores as :meth:`score_items`, so that a caller may keep it while the user's history is unchanged;
        None (the default): the model has none and :meth:`score_items` is the way to score."""
        return None

    def user_vectors(self, histories: Sequence[Sequence[str]]) -> Sequence[Any] | None:
        """:meth:`user_vector` of several users (aligned with ``histories``); each must equal what
        :meth:`user_vector` gives that user alone. None: the model has no user vectors. Models override it to
        batch their forwards."""
        vecs = [self.user_vector(h) for h in histories]
        return None if any(v is None for v in vecs) else vecs

    def score_vector(self, vector: Any, item_ids: Sequence[str]) -> np.ndarray:
        """Scores of ``item_ids`` for a user whose :meth:`user_vector` is ``vector``."""
        raise NotImplementedError(f"{type(self).__name__} has no user vectors")
