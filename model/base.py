"""The scorer seam: what the rest of driftrec may ask of a scorer.

A scorer turns a user context (who, what they did recently, optional free text) and a list of candidate
item ids into one score per candidate, and says which model and adapter produced the scores. The
streaming pipeline, the HTTP server and the offline evaluation only talk to this interface, so the
language-model scorer (:class:`driftrec.model.serving.scorer.LMScorer`) can be replaced by a test double or another model.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence


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
