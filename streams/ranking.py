"""Ranking for the recommend stage, with the fallback that never needs the scorer.

The fallback ranking is time-decayed popularity over the interactions this worker has seen, with
the user's own items excluded: always available, cheap, and honest about being a fallback.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from streams.contracts import Click, Rating, RecommendationRequest, RecommendedItem

if TYPE_CHECKING:
    from streams.app import DriftrecApp


@dataclass
class Ranked:
    items: list[RecommendedItem]
    fallback: bool
    model_version: str = "popularity"
    adapter_version: str = ""
    domain: str = "default"


@dataclass
class DecayedPopularity:
    """Exponentially time-decayed interaction counts.

    Scores are stored growing (weight * 2^((t - t0) / half_life)) so that learning is O(1); the
    order is the decayed order at any time, and :meth:`value` gives the decayed value at ``now``.
    """

    half_life_s: float = 86400.0
    scores: dict[str, float] = field(default_factory=dict)
    t0: float | None = None

    def learn(self, item_id: str, t: float, weight: float = 1.0) -> None:
        if self.t0 is None:
            self.t0 = t
        v = self.scores.get(item_id, 0.0) + weight * 2.0 ** ((t - self.t0) / self.half_life_s)
        self.scores[item_id] = v
        if v > 1e200:  # move the reference time forward so values stay in float range
            shift = math.log2(v) - 10
            self.scores = {k: x * 2.0 ** -shift for k, x in self.scores.items()}
            self.t0 += shift * self.half_life_s

    def value(self, item_id: str, now: float) -> float:
        if self.t0 is None:
            return 0.0
        return self.scores.get(item_id, 0.0) * 2.0 ** (-(now - self.t0) / self.half_life_s)

    def top(self, n: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[tuple[str, float]]:
        ranked = sorted(self.scores.items(), key=lambda kv: (-kv[1], kv[0]))
        return [(i, s) for i, s in ranked if i not in exclude][:n]


class Ranker:
    """Fallback ranker; later rankers subclass it and fall back to :meth:`fallback`."""

    def __init__(self, app: "DriftrecApp") -> None:
        self.app = app
        s = app.settings
        self.popularity = DecayedPopularity(half_life_s=s.feast.popularity_half_life_s)
        self.recent: OrderedDict[str, deque[str]] = OrderedDict()
        self.max_users = 100_000
        self.history_len = s.stream.recent_items

    def learn(self, ev: Click | Rating) -> None:
        weight = 1.0 if isinstance(ev, Click) else max(ev.rating - 2.5, 0.0)
        if weight > 0:
            self.popularity.learn(ev.item_id, ev.event_time, weight)
        hist = self.recent.get(ev.user_id)
        if hist is None:
            hist = self.recent[ev.user_id] = deque(maxlen=self.history_len)
            if len(self.recent) > self.max_users:
                self.recent.popitem(last=False)
        else:
            self.recent.move_to_end(ev.user_id)
        hist.append(ev.item_id)

    def seen(self, user_id: str) -> set[str]:
        return set(self.recent.get(user_id, ()))

    def fallback(self, req: RecommendationRequest, reason: str = "popular right now") -> Ranked:
        exclude = self.seen(req.user_id) if req.exclude_seen else set()
        if req.candidates:
            pool = {c: self.popularity.scores.get(c, 0.0) for c in req.candidates if c not in exclude}
            top = sorted(pool.items(), key=lambda kv: (-kv[1], kv[0]))[: req.k]
        else:
            top = self.popularity.top(req.k, exclude)
        items = [RecommendedItem(item_id=i, score=round(s, 6), reason=reason) for i, s in top]
        if len(items) < req.k and not req.candidates:
            # Nothing (or too little) seen yet on this worker: fill from the catalogue, newest first.
            taken = {i.item_id for i in items} | exclude
            fresh = sorted(self.app.catalogue.items.values(), key=lambda it: (-it.event_time, it.item_id))
            for it in fresh:
                if len(items) >= req.k:
                    break
                if it.item_id not in taken:
                    items.append(RecommendedItem(item_id=it.item_id, score=0.0, reason="new in the catalogue"))
        return Ranked(
            items=items,
            fallback=True,
            domain=req.domain or self.app.settings.model.default_domain,
        )

    async def rank(self, req: RecommendationRequest) -> Ranked:
        return self.fallback(req)


def build_ranker(app: "DriftrecApp") -> Ranker:
    return Ranker(app)
