"""The recommend stage served by the ranking policy: the worker ranks with what ``driftrec evaluate`` measures.

:class:`PolicyRanker` (``ranking.engine: policy``) owns one
:class:`~driftrec.model.ranking.policy.RankingPolicy`, built from ``settings.ranking`` through
:meth:`PolicyConfig.from_settings` (the replay builds its config through the same function):

* **Catalogue**: the policy is built once the catalogue follower has caught up, with the items in
  catalogue arrival order (the order of every score vector, and the tie-break); later items join through
  ``app.catalogue.on_item`` -> ``policy.add_item``.
* **Learning**: an :class:`~driftrec.core.followers.InteractionFollower` delivers every click (a
  positive, rating None) and rating of *every* worker, in topic order (one partition per topic keeps the
  global order; with several, the order within each partition), into a queue. With ``ranking.learner:
  process`` (the default) the event loop takes them into the policy's state only (``policy.follow_many``,
  ~0.03 ms an event), ``LOOP_CHUNK`` at a time with a turn for requests and ingest between chunks, and
  hands them, in order, to the learner process (:mod:`driftrec.streams.policy_learner`), which learns the
  fusion on its own copy of the policy and sends it back after each batch (``policy.set_corrector``).
  (A thread for that share fought the loop for the GIL at every one of the loop's system calls.)
  With ``thread`` a learning thread learns all of it here, ``LEARN_CHUNK`` at a time under the policy's
  lock (``policy.observe_many``, the knowledge model's forwards batched), on whatever CPU the event loop
  leaves (Python's GIL hands the loop a turn every ``SWITCH_INTERVAL_S`` when it has work). Either way a
  request waits for at most one chunk. When the
  policy learns slower than events arrive the backlog grows (requests are still answered, from a fusion
  or state that lags): ``driftrec_ranking_backlog`` shows it. Interactions read before the policy exists
  wait in the queue; the ranker is ready once that first backlog is learnt (its fusion back, with a
  learner process). ``driftrec_ranking_observed_total`` counts what was learnt (fusion included).
* **Knowledge graph** (``ranking.kg_path``, optional): loaded with the catalogue; its candidate source
  feeds the policy's graph features (the trainer puts the same graph in the model's objective).
* **Knowledge model**: loaded from ``<model.adapter_dir>/knowledge/<model.default_domain>/<ACTIVE>``
  before the policy observes anything, and the ACTIVE pointer is re-read every
  ``ranking.model_watch_interval_s`` (file reads and loading in a thread); a new version is verified and
  hot-swapped with ``policy.set_model`` (and sent to the learner process in the events' order). A rejected checkpoint is logged and counted
  (``driftrec_checkpoint_rejections_total{reason}``) and the old model keeps serving.
* **Ranking**: ``policy.recommend`` at the request's event time, on the event loop's thread
  (``rank_now``: the recommend stage ranks a batch's requests one after another without yielding);
  reasons from the item's features
  (co-visitation, knowledge graph, the knowledge model's taste, popularity). Any exception -> the
  flagged popularity fallback (``driftrec_recommendation_fallbacks_total{reason="policy_error"}``), as
  before the policy is ready (``policy_not_ready``).

The policy is touched by the event loop thread (new items, model swaps, ``rank``, the state updates with
a learner process), by the learner's receiver thread (a new fusion) and by the learning thread, always
under ``self.lock``; file reads and checkpoint loading go to a worker thread. When the learner process
exits, the event loop's task hands the queue to the learning thread (it starts it after its last chunk,
so the two never take from the queue at once).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any, Sequence

from driftrec.core import metrics
from driftrec.core.contracts import Click, Item, Rating, RecommendationRequest, RecommendedItem
from driftrec.streams.ranking import OnlineQuality, Ranked, Ranker

if TYPE_CHECKING:
    from driftrec.model.ranking.policy import RankingPolicy
    from driftrec.streams.app import DriftrecApp

log = logging.getLogger(__name__)

COLLABORATIVE = "collaborative"  # model_version when no knowledge model serves
SWITCH_INTERVAL_S = 0.0005
LEARN_CHUNK = 16  # interactions per observe_many call under the lock (their knowledge-model forwards batched)
LOOP_CHUNK = 32  # interactions the event loop takes into the state at a time (~1 ms) with a learner process

# feature -> the reason group it speaks for
_GROUPS = {
    "knn": "covisit", "knn_seq": "covisit", "knn_last": "covisit",
    "kg": "kg", "kg_cold": "kg",
    "km": "taste", "km_rank": "taste", "lm_nb": "taste", "genre": "taste", "year_gap": "taste",
    "pop": "popular", "dpop": "popular", "dpop_fast": "popular", "item_pos_rate": "popular",
}
REASONS = {
    "covisit": "people who chose your recent items also chose this",
    "kg": "related to items you liked (knowledge graph)",
    "taste": "matches your taste",
    "popular": "popular right now",
}


class PolicyRanker(Ranker):
    """The ranking policy in the worker (see the module docstring)."""

    def __init__(self, app: "DriftrecApp") -> None:
        super().__init__(app)
        from driftrec.core.followers import InteractionFollower
        from driftrec.model.knowledge.checkpoint import knowledge_root
        from driftrec.model.ranking.policy import PolicyConfig
        from driftrec.streams.app import follow

        s = app.settings
        self.cfg = PolicyConfig.from_settings(s.ranking)
        self.domain = s.model.default_domain
        self.model_root = knowledge_root(s.model.adapter_dir)
        self.watch_interval_s = s.ranking.model_watch_interval_s
        self.policy: RankingPolicy | None = None
        self.model_version: str | None = None  # the ACTIVE version served (None: no knowledge model)
        self.model_name = COLLABORATIVE
        self._rejected: str | None = None  # the version last refused (not retried until ACTIVE changes)
        self._pending: deque[Click | Rating] = deque()  # delivered, not learnt yet
        self._wake = threading.Event()
        self.lock = threading.RLock()  # the policy's: the learning thread and the event loop take turns
        self._learner: threading.Thread | None = None
        self._applier: asyncio.Task | None = None  # with a learner process: the event loop takes events into the state
        self._wake_loop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_applies = False  # the queue is the event loop's (True) or the learning thread's
        self._live_at: int | None = None  # ready once this many events are learnt (the first backlog)
        self.learner_mode = s.ranking.learner
        self.learner = None  # the LearnerProcess with ranking.learner=process (None: learning in this process)
        self.applied = 0  # events taken into the serving policy's state
        self.observed = 0  # events learnt, fusion included
        self.shown: OrderedDict[str, dict[str, int]] = OrderedDict()
        self.online = OnlineQuality(1000)
        self.follower = follow(app, InteractionFollower(s, app.bootstrap_servers))
        self.follower.listen(self._on_interaction)
        app.catalogue.on_item(self._on_item)

        async def run_policy_ranker() -> None:
            await self.run()

        app.task(run_policy_ranker)

    # -- start-up and the model watch ---------------------------------------------------------------
    async def run(self) -> None:
        """Build the policy (catalogue caught up, model loaded), then watch the model's ACTIVE pointer."""
        try:
            await self.start()
            while True:
                await asyncio.sleep(self.watch_interval_s)
                try:
                    await self.check_model()
                except Exception:  # noqa: BLE001 - the watch must go on
                    log.exception("knowledge model check failed")
        finally:  # the worker stops (its tasks are cancelled)
            self.stop()

    def stop(self) -> None:
        """Stop the learner process (if any); the policy keeps what it learnt."""
        learner, self.learner = self.learner, None
        if learner is not None:
            learner.stop()
        applier = self._applier
        if applier is not None and not applier.done():
            try:
                applier.cancel()
            except RuntimeError:  # its loop is closed
                pass

    async def start(self) -> None:
        import torch

        # one thread: a request is one user's forward through a tiny network, where a second thread costs
        # more in synchronisation than it gives (0.5 ms vs 2.3 ms a forward on a busy 2-core machine)
        torch.set_num_threads(1)
        catalogue = self.app.catalogue
        caught_up = getattr(catalogue, "caught_up", None)
        if caught_up is not None:
            await caught_up.wait()
        model = await self._load_active()
        graph = await asyncio.to_thread(self._load_graph)
        self.build(model, graph)
        if self.learner_mode == "process":
            await asyncio.to_thread(self.start_learner)
        self.start_learning()

    def _load_graph(self):
        """``ranking.kg_path``'s graph as the policy's candidate source (None without one)."""
        from driftrec.streams.policy_learner import policy_graph

        graph = policy_graph(self.app.settings.ranking.kg_path, dict(self.app.catalogue.items),
                             self.cfg.positive_threshold)
        if graph is not None:
            log.info("knowledge graph %s: %s", self.app.settings.ranking.kg_path, getattr(graph.kg, "report", ""))
        return graph

    def build(self, model=None, graph=None) -> None:
        """The policy over the catalogue as it is now (arrival order), serving ``model`` (and ``graph``: the
        knowledge graph's candidate source)."""
        from driftrec.model.ranking.policy import RankingPolicy

        items: dict[str, Item] = dict(self.app.catalogue.items)
        self.policy = RankingPolicy(self.cfg, items, list(items), model=model, kg=graph)
        self.model_name = model.version if model is not None else COLLABORATIVE
        log.info("ranking policy built: %d items, model %s%s", len(items), self.model_name,
                 ", knowledge graph" if graph is not None else "")

    def start_learner(self) -> None:
        """Start the learner process on a copy of the policy as built (no event observed yet)."""
        from driftrec.streams.policy_learner import LearnerProcess, learner_init

        policy = self.policy
        with self.lock:
            init = learner_init(self.cfg, policy.state.items, policy.item_ids, model_folder=self._model_folder(),
                                model_path=self.app.settings.model.model_path or None,
                                kg_path=self.app.settings.ranking.kg_path)
            learner = LearnerProcess(init, on_fusion=self._on_fusion, on_exit=self._on_learner_exit)
            learner.start()
            self.learner = learner

    def _model_folder(self) -> str | None:
        return str(self.model_root / self.domain / self.model_version) if self.model_name != COLLABORATIVE else None

    def _on_fusion(self, corrector, learnt: int) -> None:
        """The learner's fusion, covering its first ``learnt`` events (its receiver thread)."""
        with self.lock:
            if self.learner is None:
                return
            self.policy.set_corrector(corrector)
            if learnt > self.observed:
                metrics.RANKING_OBSERVED.inc(learnt - self.observed)
                self.observed = learnt
            metrics.RANKING_BACKLOG.set(self.backlog)

    def _on_learner_exit(self, exitcode) -> None:
        """The learner process is gone: learn here from now on (the events it had not learnt keep their
        state, their fusion updates are lost)."""
        with self.lock:
            lost = self.applied - self.observed
            self.learner = None
            self.learner_mode = "thread"
            if lost > 0:
                metrics.RANKING_OBSERVED.inc(lost)
            self.observed = self.applied
        metrics.RANKING_LEARNER_EXITS.inc()
        log.error("the ranking policy's learner process exited (code %s) with %d events not learnt; the worker "
                  "learns in its own process from now on", exitcode, max(lost, 0))
        if self._loop_applies:  # the event loop's task hands the queue over to the learning thread
            try:
                self._loop.call_soon_threadsafe(self._wake_loop.set)
            except RuntimeError:  # the loop is closed: the worker is stopping
                pass
        else:
            self._wake.set()

    @property
    def backlog(self) -> int:
        """Events delivered and not learnt yet (by this process or by the learner)."""
        return len(self._pending) + (self.applied - self.observed)

    def start_learning(self) -> None:
        """Start taking the delivered interactions in (once). With a learner process the worker only takes
        them into its state (~0.03 ms an event): that runs on the event loop, ``LOOP_CHUNK`` at a time with
        a turn for requests and ingest between chunks, because a thread would fight the loop for the GIL
        at every one of its system calls. Learning here (no learner process) is ~20 times the work: a
        learning thread does it."""
        # the GIL passes between threads every SWITCH_INTERVAL_S instead of Python's 5 ms: an event loop
        # woken by I/O then waits at most that long for another thread (learning, the consumer's) to let it run
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        if self.learner is not None:
            if self._applier is None:
                self._loop_applies = True
                self._loop = asyncio.get_running_loop()
                self._applier = self._loop.create_task(self._apply_forever(), name="driftrec-policy-state")
            self._wake_loop.set()
        else:
            self._start_thread()

    def _start_thread(self) -> None:
        if self._learner is None:
            self._learner = threading.Thread(target=self._learn_forever, name="driftrec-policy-learning", daemon=True)
            self._learner.start()
        self._wake.set()

    async def _apply_forever(self) -> None:
        """The event loop's share with a learner process: the queued interactions into the state, in order.
        When the learner process is gone the learning thread takes over (started here, after the last
        chunk taken here, so the two never take from the queue at once)."""
        while self.learner is not None:
            await self._wake_loop.wait()
            self._wake_loop.clear()
            while self._pending and self.learner is not None:
                try:
                    self.learn_chunk(LOOP_CHUNK)
                except Exception:  # noqa: BLE001 - learning must go on
                    log.exception("the ranking policy's learning failed")
                metrics.RANKING_BACKLOG.set(self.backlog)
                await asyncio.sleep(0)  # requests and the next ingest batch between chunks
            if self._live_at is None and not self._pending:
                self._live_at = self.applied
        self._loop_applies = False
        self._start_thread()

    def _learn_forever(self) -> None:
        """The learning thread: learn the queued interactions in order, ``LEARN_CHUNK`` at a time."""
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._pending:
                try:
                    self.learn_chunk()
                except Exception:  # noqa: BLE001 - learning must go on
                    log.exception("the ranking policy's learning failed")
                metrics.RANKING_BACKLOG.set(self.backlog)
            if self._live_at is None:
                self._live_at = self.applied

    def learn_chunk(self, size: int = 0) -> int:
        """Take the next (up to) ``size`` (default ``LEARN_CHUNK``) queued interactions: into the state, and
        to the learner process (``ranking.learner: process``), or learn them here (``policy.observe_many``)."""
        size = size or LEARN_CHUNK
        chunk = []
        while self._pending and len(chunk) < size:
            chunk.append(self._pending.popleft())
        events = [(ev.user_id, ev.item_id, float(ev.rating) if isinstance(ev, Rating) else None, ev.event_time)
                  for ev in chunk]
        with self.lock:
            learner = self.learner
            try:
                if learner is not None:
                    self.policy.follow_many(events)
                    learner.events(events)  # under the lock: in order with item arrivals and model swaps
                else:
                    self.policy.observe_many(events)
            except Exception:  # noqa: BLE001 - one bad chunk must not stop learning: learn its events one by one
                log.exception("the ranking policy failed on a chunk of events; observing them one by one")
                for ev in chunk:
                    self._observe(ev)
                return len(chunk)
            for ev, (_, _, rating, _) in zip(chunk, events):
                if rating is None or rating >= 3:  # the fallback's popularity, from every worker's events
                    self.popularity.learn_one(ev.user_id, ev.item_id, rating, ev.event_time)
            self.applied += len(chunk)
            if learner is None:
                self.observed += len(chunk)
                metrics.RANKING_OBSERVED.inc(len(chunk))
        return len(chunk)

    async def _load_active(self):
        """The ACTIVE knowledge model (verified), or None when there is none or it is refused."""
        from driftrec.model.knowledge.checkpoint import active_version

        version = await asyncio.to_thread(active_version, self.model_root, self.domain)
        if version is None:
            log.info("no knowledge model under %s/%s: ranking with the collaborative features", self.model_root,
                     self.domain)
            return None
        return await self._load(version)

    async def _load(self, version: str):
        from driftrec.model.knowledge.checkpoint import CheckpointRejected, load_knowledge

        items = dict(self.app.catalogue.items)  # the texts the LM re-embeds come from the catalogue
        folder = self.model_root / self.domain / version
        try:
            model = await asyncio.to_thread(load_knowledge, folder, items, self.app.settings.model.model_path or None)
        except CheckpointRejected as exc:
            self._reject(version, exc.reason, str(exc))
            return None
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, it is not served
            self._reject(version, "corrupt", repr(exc))
            return None
        self.model_version = version
        return model

    def _reject(self, version: str, reason: str, message: str) -> None:
        self._rejected = version
        metrics.CHECKPOINT_REJECTIONS.labels(reason=reason).inc()
        log.error("knowledge model %s/%s refused (%s): %s; %s keeps serving", self.domain, version, reason, message,
                  self.model_name)

    async def check_model(self) -> bool:
        """Swap in the ACTIVE version when it changed (True when swapped)."""
        from driftrec.model.knowledge.checkpoint import active_version

        if self.policy is None:
            return False
        version = await asyncio.to_thread(active_version, self.model_root, self.domain)
        if version is None or version == self.model_version or version == self._rejected:
            return False
        model = await self._load(version)
        if model is None:
            return False
        with self.lock:
            self.policy.set_model(model)
            self.model_name = model.version
            if self.learner is not None:
                self.learner.model(self._model_folder())
        log.info("knowledge model %s now serving", model.version)
        return True

    # -- learning -------------------------------------------------------------------------------------
    def _on_item(self, item: Item) -> None:
        if self.policy is not None:
            kept = self.app.catalogue.items.get(item.item_id, item)  # an older entry replayed: keep the newer
            with self.lock:
                self.policy.add_item(kept.item_id, kept)
                if self.learner is not None:
                    self.learner.item(kept)

    def fallback(self, req: RecommendationRequest, reason: str = "popular right now") -> Ranked:
        with self.lock:  # the state updates (learning thread or event loop) feed the fallback's popularity
            return super().fallback(req, reason)

    def _on_interaction(self, ev: Click | Rating) -> None:
        self._pending.append(ev)
        if self._loop_applies:
            self._wake_loop.set()  # (the follower delivers on the event loop)
        else:
            self._wake.set()

    def _observe(self, ev: Click | Rating) -> None:
        """One interaction on its own (after its chunk failed). It counts as taken and learnt whether or not
        the policy could learn from it, so the backlog and readiness never wait for it."""
        rating = float(ev.rating) if isinstance(ev, Rating) else None
        event = (ev.user_id, ev.item_id, rating, ev.event_time)
        learner = self.learner
        try:
            if learner is not None:
                self.policy.follow_many([event])
            else:
                self.policy.observe(*event)
        except Exception:  # noqa: BLE001 - one bad event must not stop learning
            log.exception("the ranking policy failed to learn an event")
        if learner is not None:
            learner.events([event])  # counted as learnt when the fusion covering it comes back
        if rating is None or rating >= 3:  # the fallback's popularity, from every worker's events
            self.popularity.learn_one(ev.user_id, ev.item_id, rating, ev.event_time)
        self.applied += 1
        if learner is None:
            self.observed += 1
            metrics.RANKING_OBSERVED.inc()

    def learn_popularity(self, ev: Click | Rating) -> None:
        pass  # the interaction follower feeds it (every worker's events)

    def learn(self, ev: Click | Rating) -> None:
        """Feedback on what this worker served (its users are its partitions): the online HR@10/NDCG@10."""
        super().learn(ev)
        ranks = self.shown.get(ev.user_id)
        if ranks is None:
            return
        positive = isinstance(ev, Click) or ev.rating >= self.cfg.positive_threshold
        if not positive:
            return
        self.online.add(ranks.get(ev.item_id))
        self.online.publish()

    # -- ranking --------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.policy is not None and self._live_at is not None and self.observed >= self._live_at

    async def rank(self, req: RecommendationRequest) -> Ranked:
        return self.rank_now(req)

    def prepare(self, requests: Sequence[RecommendationRequest]) -> None:
        """Before ranking ``requests`` one after another (no interaction in between): their users' knowledge-
        model vectors in batched forwards, which the rankings then find kept (the same bits)."""
        policy = self.policy
        if policy is None or not self.ready or len(requests) < 2:
            return
        try:
            with self.lock:
                policy.prefetch_users([r.user_id for r in requests])
        except Exception:  # noqa: BLE001 - each request's own ranking computes its vector (and reports)
            log.exception("batched user vectors failed; ranking one by one")

    def rank_now(self, req: RecommendationRequest) -> Ranked:
        """Rank one request on this thread (the policy never waits on I/O; see ``rank_all``)."""
        policy = self.policy
        if policy is None or not self.ready:
            metrics.FALLBACKS.labels(reason="policy_not_ready").inc()
            return self.fallback(req, reason="popular right now (ranking is starting)")
        try:
            with self.lock:  # at most one chunk of learning to wait for
                top = policy.recommend(req.user_id, req.k, ts=req.event_time, exclude_seen=req.exclude_seen,
                                       candidates=req.candidates or None)
                reasons = self.reasons(req.user_id, [i for i, _ in top], req.event_time)
        except Exception:  # noqa: BLE001 - the request is still answered
            log.exception("the ranking policy failed on a request")
            metrics.FALLBACKS.labels(reason="policy_error").inc()
            return self.fallback(req, reason="popular right now (ranking failed)")
        items = [RecommendedItem(item_id=i, score=round(float(s), 6), reason=r) for (i, s), r in zip(top, reasons)]
        self.shown[req.user_id] = {i: n for n, (i, _) in enumerate(top)}
        self.shown.move_to_end(req.user_id)
        if len(self.shown) > self.max_users:
            self.shown.popitem(last=False)
        return Ranked(items=items, fallback=False, model_version=self.model_name,
                      domain=req.domain or self.domain)

    def reasons(self, user: str, item_ids: list[str], ts: float) -> list[str]:
        """A short reason per item: the feature group that contributed most to its fused score."""
        import numpy as np

        policy = self.policy
        if not item_ids:
            return []
        cols = np.asarray([policy.index[i] for i in item_ids], dtype=np.int64)
        names = policy.feature_names
        F = policy.ranked_features(user, cols, ts)
        contrib = policy.corrector.contributions(F, names)
        out = []
        for r in range(len(cols)):
            groups: dict[str, float] = {}
            if contrib is not None and np.any(contrib[r] != 0):
                for j, n in enumerate(names):
                    g = _GROUPS.get(n)
                    if g is not None:
                        groups[g] = groups.get(g, 0.0) + float(contrib[r, j])
                best = max(groups, key=groups.get) if groups else "popular"
                out.append(REASONS[best if groups.get(best, 0.0) > 0 else "popular"])
            else:  # the fusion has not learnt yet: the strongest raw signal
                row = dict(zip(names, F[r].tolist()))
                if row.get("knn", 0.0) > 0:
                    out.append(REASONS["covisit"])
                elif row.get("kg", 0.0) > 0:
                    out.append(REASONS["kg"])
                elif row.get("km_rank", 0.0) > 0.5:
                    out.append(REASONS["taste"])
                else:
                    out.append(REASONS["popular"])
        return out

    def info(self) -> dict[str, Any]:
        p = self.policy
        return {"observed": self.observed, "model": self.model_name, "items": len(p.item_ids) if p else 0,
                "live": self.ready, "learner": self.learner_mode,
                "learner_pid": self.learner.pid if self.learner is not None else None}
