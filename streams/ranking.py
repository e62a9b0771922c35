"""Ranking for the recommend stage, with the fallback that never needs the scorer.

The fallback ranking is time-decayed popularity over the interactions this worker has seen, with
the user's own items excluded: always available, cheap, and honest about being a fallback.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from driftrec.core import metrics
from driftrec.core.contracts import Click, Rating, RecommendationRequest, RecommendedItem

if TYPE_CHECKING:
    from driftrec.streams.app import DriftrecApp

log = logging.getLogger(__name__)


class OnlineQuality:
    """HR@10 and NDCG@10 of the last ``window`` positives on served lists, kept as running sums (O(1) per
    event: this runs for every click and rating a worker's users make)."""

    def __init__(self, window: int = 1000) -> None:
        self.window = int(window)
        self._marks: deque[tuple[float, float]] = deque()
        self._hits = 0.0
        self._gain = 0.0
        self._since_exact = 0
        self._gauges = (metrics.ONLINE_HR_AT_10.labels(model="served"), metrics.ONLINE_NDCG_AT_10.labels(model="served"))

    def __len__(self) -> int:
        return len(self._marks)

    def add(self, rank: int | None) -> tuple[float, float]:
        """Record a positive on an item served at 0-based ``rank`` (None: not served); the window's means."""
        hit = rank is not None and rank < 10
        mark = (1.0 if hit else 0.0, 1.0 / math.log2(rank + 2) if hit else 0.0)
        self._marks.append(mark)
        self._hits += mark[0]
        self._gain += mark[1]
        if len(self._marks) > self.window:
            h, g = self._marks.popleft()
            self._hits -= h
            self._gain -= g
        self._since_exact += 1
        if self._since_exact >= self.window:  # float sums drift; re-add them exactly once a window
            self._hits = float(sum(h for h, _ in self._marks))
            self._gain = float(sum(g for _, g in self._marks))
            self._since_exact = 0
        return self.means()

    def means(self) -> tuple[float, float]:
        n = len(self._marks)
        return (self._hits / n, self._gain / n) if n else (0.0, 0.0)

    def publish(self) -> None:
        for gauge, value in zip(self._gauges, self.means()):
            gauge.set(value)


@dataclass
class Ranked:
    items: list[RecommendedItem]
    fallback: bool
    model_version: str = "popularity"
    adapter_version: str = ""
    domain: str = "default"


class Ranker:
    """Fallback ranker; later rankers subclass it and fall back to :meth:`fallback`."""

    def __init__(self, app: "DriftrecApp") -> None:
        self.app = app
        from driftrec.model.ranking.sources import DecayedPopularitySource

        s = app.settings
        self.popularity = DecayedPopularitySource(half_life_s=s.feast.popularity_half_life_s)
        self.recent: OrderedDict[str, deque[str]] = OrderedDict()
        self.max_users = 100_000
        self.history_len = s.stream.recent_items

    def learn_popularity(self, ev: Click | Rating) -> None:
        if isinstance(ev, Click) or ev.rating >= 3:
            self.popularity.learn_one(ev.user_id, ev.item_id, getattr(ev, "rating", None), ev.event_time)

    def learn(self, ev: Click | Rating) -> None:
        self.learn_popularity(ev)
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
            pool = [c for c in req.candidates if c not in exclude]
            top = sorted(zip(pool, self.popularity.score_many(req.user_id, pool)), key=lambda kv: (-kv[1], kv[0]))[: req.k]
        else:
            top = [(i, sc) for i, sc in self.popularity.candidates(req.user_id, req.k, exclude=exclude) if sc > 0]
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

    @property
    def ready(self) -> bool:
        """Whether :meth:`rank` serves the ranker's model (not only its start-up fallback)."""
        return True

    async def rank(self, req: RecommendationRequest) -> Ranked:
        return self.fallback(req)


class LoopRanker(Ranker):
    """candidates -> Feast features -> LM scorer -> River correction -> top-k with reasons.

    * Candidates: co-visitation item-kNN and time-decayed popularity, learnt from *every* worker's
      interactions (an :class:`InteractionFollower` replays the clicks and ratings topics, so the
      sources are global and survive restarts), plus the LM's own top items over the whole
      catalogue, which is where items with few or no interactions come from.
    * Features: the user's recent items from the Feast online store (written by the features stage
      earlier in the same batch) are the history the LM reads; item features (mean rating, decayed
      popularity) join the correction's inputs.
    * Correction: a River model learns from feedback on what was shown (a click or a rating >= 4 on
      a shown item is a positive, a low rating or the other shown items negatives) and gives the final
      score once it has learnt enough; a River drift detector watches its error.
    * When the scorer is down or slow, the fallback ranking answers, flagged and counted.
    """

    FEATURES = ("lm", "lm_rank", "itemknn", "dpop", "pop", "mean_rating")
    MIN_LEARNED = 100

    def __init__(self, app: "DriftrecApp") -> None:
        super().__init__(app)
        from driftrec.model.ranking.sources import ItemKNNSource, PopularitySource
        from driftrec.model.ranking.corrections import RiverCorrector
        from driftrec.core.followers import InteractionFollower
        from driftrec.streams.scorer_client import ScorerClient

        s = app.settings
        self.itemknn = ItemKNNSource(user_decay=0.9, max_history=50)
        self.decayed = self.popularity  # learnt from every worker's interactions (the follower below)
        self.counts = PopularitySource()
        self.sources = (self.itemknn, self.decayed, self.counts)
        for source in ("lm", self.itemknn.name, self.decayed.name):  # series at 0 before the first ranking
            metrics.CANDIDATES.labels(source=source)
        self.corrector = RiverCorrector(min_updates=200)
        self.corrector.on_drift(self._on_drift)
        self.scorer = ScorerClient(s.scorer.base_url, s.scorer.timeout_s, circuit_failures=s.scorer.circuit_failures,
                                   circuit_open_s=s.scorer.circuit_open_s)
        self.lm_k = min(100, s.scorer.max_k)
        self.shown: OrderedDict[str, dict[str, dict]] = OrderedDict()
        self.online = OnlineQuality(1000)
        self.errors: deque[float] = deque(maxlen=500)
        self._reader = None
        self._reader_lock = asyncio.Lock()  # one opening, however many requests ask at once
        from driftrec.streams.app import follow

        self.follower = follow(app, InteractionFollower(s, app.bootstrap_servers))
        self.follower.listen(self._learn_global)
        app.catalogue.on_item(lambda it: [src.add_item(it.item_id) for src in self.sources])

    # -- learning -------------------------------------------------------------------------------
    def _learn_global(self, ev: Click | Rating) -> None:
        rating = ev.rating if isinstance(ev, Rating) else None
        if rating is not None and rating < 3:
            return  # a dislike is no co-visitation signal
        for src in self.sources:
            src.learn_one(ev.user_id, ev.item_id, rating, ev.event_time)

    def learn_popularity(self, ev: Click | Rating) -> None:
        pass  # the interaction follower feeds the global sources, this worker's events included

    def learn(self, ev: Click | Rating) -> None:
        """Feedback on what this worker showed the user (its users are its partitions)."""
        super().learn(ev)
        shown = self.shown.get(ev.user_id)
        if not shown:
            return
        from driftrec.core import metrics

        positive = isinstance(ev, Click) or ev.rating >= 4
        if positive:  # online quality of what was served: was the chosen item in the list, how high
            rank = shown["rank"].get(ev.item_id)
            self.online.add(rank)
            self.online.publish()
        feats = shown["features"]
        if ev.item_id not in feats:
            return
        err = self.corrector.learn_one(feats.pop(ev.item_id), 1.0 if positive else 0.0)
        if positive:  # the items shown beside the chosen one are the negatives
            for other in list(feats)[:3]:
                self.corrector.learn_one(feats.pop(other), 0.0)
        self.errors.append(err)
        metrics.CORRECTION_ABS_ERROR.observe(err)
        metrics.CORRECTION_ERROR.labels(domain=ev.domain or "default").set(sum(self.errors) / len(self.errors))

    def _on_drift(self, event) -> None:
        from driftrec.core import metrics

        metrics.DRIFT_DETECTIONS.labels(domain="default", detector="adwin").inc()
        log.warning("drift in the correction error after %d updates (#%d)", event.update, event.count)

    # -- ranking --------------------------------------------------------------------------------
    async def reader(self):
        """The feature reader, opened on first use in a thread: opening a Feast store takes a second or more,
        which on the event loop would stall every scoring call in flight into its timeout."""
        if self._reader is None:
            from driftrec.feature_store.reader import FeatureReader

            async with self._reader_lock:
                if self._reader is None:
                    self._reader = await asyncio.to_thread(FeatureReader, self.app.settings)
        return self._reader

    async def rank(self, req: RecommendationRequest) -> Ranked:
        from driftrec.core import metrics
        from driftrec.streams.scorer_client import ScorerUnavailable

        user = req.user_id
        try:
            ufeat, _ = await (await self.reader()).get_user_and_items_async(user, [])
        except Exception:  # noqa: BLE001 - no features yet: the LM still ranks from an empty history
            log.exception("feature read failed for a request")
            ufeat = None
        history = list((ufeat or {}).get("recent_items") or [])
        seen = set(history) | self.seen(user)
        exclude = seen if req.exclude_seen else set()
        try:
            lm = await self.scorer.recommend(user, [{"item_id": i} for i in history], k=self.lm_k,
                                             domain=req.domain, exclude=sorted(exclude))
        except ScorerUnavailable as exc:
            metrics.FALLBACKS.labels(reason=exc.reason).inc()
            return self.fallback(req, reason=f"popular right now (scorer unavailable: {exc.reason})")

        lm_score = {it["item_id"]: float(it["score"]) for it in lm.items}
        lm_reason = {it["item_id"]: it.get("reason", "") for it in lm.items}
        lm_rank = {it["item_id"]: r for r, it in enumerate(lm.items)}
        if req.candidates:
            pool = [c for c in req.candidates if c not in exclude]
        else:
            pool = list(lm_score)
            for src, n in ((self.itemknn, 50), (self.decayed, 20)):
                got = src.candidates(user, n, exclude=exclude) if src.n_items else []
                metrics.CANDIDATES.labels(source=src.name).inc(len(got))
                pool += [i for i, _ in got]
            metrics.CANDIDATES.labels(source="lm").inc(len(lm_score))
            pool = list(dict.fromkeys(p for p in pool if p not in exclude))
        if not pool:
            return self.fallback(req)
        try:
            _, ifeat = await (await self.reader()).get_user_and_items_async(user, pool)
        except Exception:  # noqa: BLE001
            ifeat = {}
        knn = dict(zip(pool, self.itemknn.score_many(user, pool))) if self.itemknn.n_items else {}
        floor = min(lm_score.values(), default=0.0)
        rows = []
        for item in pool:
            f = ifeat.get(item) or {}
            rows.append({
                "lm": lm_score.get(item, floor),
                "lm_rank": 1.0 / (1.0 + lm_rank[item]) if item in lm_rank else 0.0,
                "itemknn": float(knn.get(item, 0.0)),
                "dpop": math.log1p(float(f.get("popularity_now") or 0.0)),
                "pop": math.log1p(float(f.get("rating_count") or 0) + float(f.get("click_count") or 0)),
                "mean_rating": float(f.get("mean_rating") or 0.0),
            })
        if self.corrector.n_learned >= self.MIN_LEARNED:
            import numpy as np

            X = np.array([[r[n] for n in self.FEATURES] for r in rows])
            scores = list(self.corrector.predict_many(X, self.FEATURES))
        else:  # until feedback has taught the correction: the LM's order, co-visitation as tie-break
            top_knn = max((r["itemknn"] for r in rows), default=0.0) or 1.0
            scores = [0.7 * r["lm_rank"] + 0.3 * r["itemknn"] / top_knn for r in rows]
        order = sorted(range(len(pool)), key=lambda j: (-scores[j], pool[j]))[: req.k]
        items = []
        for j in order:
            item, r = pool[j], rows[j]
            if r["itemknn"] > 0 and (r["lm_rank"] == 0 or r["itemknn"] / (max(knn.values(), default=1) or 1) > 0.5):
                reason = "people who chose your recent items also chose this"
            else:
                reason = lm_reason.get(item) or "popular right now"
            items.append(RecommendedItem(item_id=item, score=round(float(scores[j]), 6), reason=reason))
        self.shown[user] = {"features": {pool[j]: rows[j] for j in order},
                            "rank": {pool[j]: r for r, j in enumerate(order)}}
        self.shown.move_to_end(user)
        if len(self.shown) > self.max_users:
            self.shown.popitem(last=False)
        return Ranked(items=items, fallback=False, model_version=lm.model_version,
                      adapter_version=lm.adapter_version, domain=lm.domain)
