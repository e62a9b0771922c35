"""The ranking policy: the one ranking system that ``driftrec evaluate`` replays and ``driftrec worker`` serves.

Candidates and features come from online sources that learn from every interaction (co-visitation
item-kNN, a sequence-aware item-kNN, popularity and decayed popularity, item statistics, genre and year
affinity, the knowledge graph's neighbours of the user's likes) and from the knowledge model
(:class:`~driftrec.model.base.ItemSequenceModel`: the language model's text knowledge and the graph's
entity embeddings, over the user's item sequence). A River model fuses them into the final score and
learns online, pairwise, at every positive on an item new to the user, against negatives drawn from
the policy's own top-ranked items and from the catalogue.

The policy is a pure function of what it observed and of the knowledge model it was given: the replay
feeds it a MovieLens log event by event, the worker feeds it the interaction topics through a follower,
and both ask :meth:`RankingPolicy.score_all` / :meth:`RankingPolicy.recommend`. Same events in the same
order and the same model version give the same lists.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from driftrec.core.contracts import Item
from driftrec.model.base import ItemSequenceModel
from driftrec.model.ranking.corrections import RiverCorrector
from driftrec.model.ranking.sources import DecayedPopularitySource, ItemKNNSource, LMTextNeighbourSource, PopularitySource

__all__ = ["PolicyConfig", "RankingPolicy"]

BASE_FEATURES = (
    "knn", "knn_seq", "knn_last", "pop", "dpop", "dpop_fast", "genre",
    "item_pos_rate", "item_recency", "item_age", "year_gap",
)
TEXT_FEATURES = ("lm_nb",)  # text neighbours of the user's recent items (the LM's item vectors)
MODEL_FEATURES = ("km", "km_rank")  # the knowledge model's score and its rank (as 1/(1+rank/10))
KG_FEATURES = ("kg", "kg_cold")  # graph neighbours of the user's likes; the same where items are cold


@dataclass(frozen=True)
class PolicyConfig:
    """How the policy learns; validated on construction (the same values drive replay and worker)."""

    positive_threshold: float = 4.0
    half_life_s: float = 2 * 86400.0
    knn_user_decay: float = 0.9
    knn_pair_decay: float = 0.9
    knn_max_history: int = 60
    negatives: int = 6
    hard_pool: int = 50
    hard_pool_every: int = 1
    learn_fraction: float = 1.0
    corrector_lr: float = 0.005
    corrector_min_updates: int = 2000
    cold_threshold: int = 5
    new_item_position: int = 0  # off: on ML-100K the slot costs more hits than it finds (README, Quality)
    new_item_model_rank: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.knn_user_decay <= 1 or not 0 < self.knn_pair_decay <= 1:
            raise ValueError("knn decays must be in (0, 1]")
        if self.half_life_s <= 0:
            raise ValueError("half_life_s must be > 0")
        for name in ("knn_max_history", "negatives", "hard_pool", "hard_pool_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.corrector_lr <= 0:
            raise ValueError("corrector_lr must be > 0")
        if not 0 < self.learn_fraction <= 1:
            raise ValueError("learn_fraction must be in (0, 1]")
        if self.new_item_position < 0 or self.new_item_model_rank < 1:
            raise ValueError("new_item_position must be >= 0 (0 = off) and new_item_model_rank >= 1")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_settings(cls, ranking=None, **overrides) -> "PolicyConfig":
        """The policy config of ``ranking`` (a :class:`~driftrec.core.settings.RankingSettings`; default: its
        defaults) with ``overrides``: the one way the worker and the replay build theirs."""
        from driftrec.core.settings import RankingSettings

        ranking = RankingSettings() if ranking is None else ranking
        if overrides:
            ranking = ranking.model_copy(update=overrides)
            ranking = RankingSettings(**ranking.model_dump())  # validate the overrides too
        return cls(**ranking.policy_options())


class PolicyState:
    """What the policy learns from interactions apart from its fusion: the candidate sources, item
    statistics, user histories and genre profiles. Several policies (the full system and its ablations in
    a replay) can share one state: it is updated once per interaction, after they all learned from it."""

    _ARRAYS = (("n_int", 0.0), ("n_pos", 0.0), ("first_ts", np.nan), ("last_ts", np.nan), ("G", 0.0),
               ("Gn", 0.0), ("years", np.nan))

    def __init__(self, cfg: PolicyConfig, items: Mapping[str, Item], item_ids: Sequence[str], *, kg=None) -> None:
        self.cfg = cfg
        self.items = dict(items)
        self.item_ids: list[str] = []
        self.index: dict[str, int] = {}
        self.pop = PopularitySource()
        self.dpop = DecayedPopularitySource(half_life_s=cfg.half_life_s)
        self.dpop_fast = DecayedPopularitySource(half_life_s=cfg.half_life_s / 8)
        self.knn = ItemKNNSource()
        self.knn_seq = ItemKNNSource(user_decay=cfg.knn_user_decay, pair_decay=cfg.knn_pair_decay,
                                     max_history=cfg.knn_max_history)
        self.sources = [self.pop, self.dpop, self.dpop_fast, self.knn, self.knn_seq]
        self.kg = kg
        if kg is not None:
            self.sources.append(kg)
        self.genre_index = {g: j for j, g in enumerate(sorted({g for it in self.items.values() for g in it.genres}))}
        n0 = 0  # arrays grow in add_item (the catalogue below first, in one go)
        self.n_int = np.zeros(n0)
        self.n_pos = np.zeros(n0)
        self.first_ts = np.full(n0, np.nan)
        self.last_ts = np.full(n0, np.nan)
        self.G = np.zeros((n0, max(len(self.genre_index), 1)))
        self.Gn = self.G.copy()
        self.years = np.full(n0, np.nan)
        self.hist: dict[str, list[tuple[int, float]]] = {}
        self.seen: dict[str, set[int]] = {}
        self.ugenre: dict[str, np.ndarray] = {}
        self.observed = 0
        self.listeners: list = []  # called with the new item index (policies keep their models in step)
        self._memo: tuple | None = None
        self._reserve(len(item_ids))
        for iid in item_ids:
            self.add_item(iid, self.items.get(iid))

    # --------------------------------------------------------------------------------- catalogue

    def _reserve(self, n: int) -> None:
        """Per-item arrays for ``n`` items (they hold exactly the known items; capacity grows by doubling)."""
        cap = getattr(self, "_cap", 0)
        if n <= cap:
            return
        cap = max(n, 2 * cap, 16)
        for name, fill in self._ARRAYS:
            a = getattr(self, "_" + name, None)
            if a is None:
                a = getattr(self, name)
            b = np.full((cap,) + a.shape[1:], fill)
            b[: len(self.item_ids)] = a[: len(self.item_ids)]
            setattr(self, "_" + name, b)
        self._cap = cap
        self._expose()

    def _expose(self) -> None:
        n = len(self.item_ids)
        for name, _ in self._ARRAYS:
            setattr(self, name, getattr(self, "_" + name)[:n])

    def add_item(self, item_id: str, item: Item | None = None) -> int:
        """Make ``item_id`` known (idempotent; metadata refreshed when given); returns its index."""
        if item is not None:
            self.items[item_id] = item
        idx = self.index.get(item_id)
        if idx is not None and item is None:
            return idx  # known, no new metadata: nothing to refresh (every interaction comes through here)
        if idx is None:
            idx = len(self.item_ids)
            self._reserve(idx + 1)
            self.item_ids.append(item_id)
            self.index[item_id] = idx
            self._expose()
            self._memo = None
            for src in self.sources:
                src.add_item(item_id)
            for listener in self.listeners:
                listener(idx)
        meta = self.items.get(item_id)
        if meta is not None:
            self.G[idx] = 0.0
            for g in meta.genres:
                j = self.genre_index.get(g)
                if j is None:  # a genre first seen now: one more column for everyone
                    j = self.genre_index[g] = len(self.genre_index)
                    if j >= self.G.shape[1]:
                        self._G = np.pad(self._G, ((0, 0), (0, 1)))
                        self._Gn = np.pad(self._Gn, ((0, 0), (0, 1)))
                        self._expose()
                        self.ugenre = {u: np.pad(v, (0, 1)) for u, v in self.ugenre.items()}
                self.G[idx, j] = 1.0
            norm = np.linalg.norm(self.G[idx])
            self.Gn[idx] = self.G[idx] / norm if norm > 0 else 0.0
            self.years[idx] = meta.year if meta.year else np.nan
        return idx

    # ---------------------------------------------------------------------------------- features

    def base_features(self, user: str, cols: np.ndarray | None, ts: float) -> np.ndarray:
        """The collaborative and content features (:data:`BASE_FEATURES`, then the graph's two when the
        state has a graph source) of ``cols`` (None = every item; that one is memoised per state)."""
        key = (user, ts, self.observed, len(self.item_ids))
        if cols is None and self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        cfg = self.cfg
        n_all = len(self.item_ids)
        idx = np.arange(n_all) if cols is None else np.asarray(cols, dtype=np.int64)
        sub = None if cols is None else idx
        m = len(idx)
        hist = self.hist.get(user, [])
        nh = len(hist)
        F = np.zeros((m, len(BASE_FEATURES) + (len(KG_FEATURES) if self.kg is not None else 0)))
        if nh:
            knn = self.knn.score_items(user, sub) / nh
            w = cfg.knn_user_decay ** np.arange(min(nh, cfg.knn_max_history))
            knn_seq = self.knn_seq.score_items(user, sub) / w.sum()
            knn_last = self.knn_seq.similarity_rows(np.asarray([hist[-1][0]]), sub)[0]
            F[:, 0] = np.log1p(100.0 * knn)
            F[:, 1] = np.log1p(100.0 * knn_seq)
            F[:, 2] = np.log1p(100.0 * knn_last)
        F[:, 3] = np.log1p(self.n_int[idx])
        F[:, 4] = np.log1p(self.dpop.score_all(user, ts)[idx])
        F[:, 5] = np.log1p(self.dpop_fast.score_all(user, ts)[idx])
        ug = self.ugenre.get(user)
        if ug is not None:
            nrm = np.linalg.norm(ug)
            if nrm > 0:
                F[:, 6] = self.Gn[idx] @ (ug / nrm)
        F[:, 7] = (self.n_pos[idx] + 1.0) / (self.n_int[idx] + 2.0)
        last_ts, first_ts = self.last_ts[idx], self.first_ts[idx]
        # never-seen items have NaN times: NaN propagates through the arithmetic and np.where replaces it
        F[:, 8] = np.where(np.isnan(last_ts), 12.0, np.log1p(np.maximum(ts - last_ts, 0) / 3600.0))
        F[:, 9] = np.where(np.isnan(first_ts), 0.0, np.log1p(np.maximum(ts - first_ts, 0) / 86400.0))
        if nh:
            ys = self.years[[i for i, _ in hist[-20:]]]
            ys = ys[~np.isnan(ys)]
            if len(ys):
                yg = np.abs(self.years[idx] - ys.mean()) / 10.0
                F[:, 10] = np.where(np.isnan(yg), 1.0, yg)
        if self.kg is not None:
            kg = np.log1p(self.kg.score_all(user, ts)[idx])
            F[:, 11] = kg
            F[:, 12] = np.where(self.n_pos[idx] < cfg.cold_threshold, kg, 0.0)
        if cols is None:
            self._memo = (key, F)
        return F

    def allowed(self, user: str) -> np.ndarray:
        """The mask of items ``user`` has not interacted with."""
        allowed = np.ones(len(self.item_ids), dtype=bool)
        seen = self.seen.get(user)
        if seen:
            allowed[list(seen)] = False
        return allowed

    # ---------------------------------------------------------------------------------- learning

    def update(self, user: str, item: str, rating: float | None, ts: float) -> None:
        """Take one interaction into the sources, item statistics and the user's history."""
        i = self.add_item(item)
        positive = rating is None or rating >= self.cfg.positive_threshold
        r = 5.0 if rating is None else float(rating)
        for src in self.sources:
            src.learn_one(user, item, r, ts)
        self.n_int[i] += 1
        self.n_pos[i] += positive
        if np.isnan(self.first_ts[i]):
            self.first_ts[i] = ts
        self.last_ts[i] = ts if np.isnan(self.last_ts[i]) else max(self.last_ts[i], ts)
        self.hist.setdefault(user, []).append((i, r))
        self.seen.setdefault(user, set()).add(i)
        ug = self.ugenre.get(user)
        if ug is None:
            ug = self.ugenre[user] = np.zeros(self.G.shape[1])
        ug += self.G[i] * (1.0 if positive else 0.3)
        self.observed += 1
        self._memo = None

    def histories(self) -> Iterable[tuple[str, list[tuple[str, float]]]]:
        """Every user's interactions so far, oldest first (what the knowledge model trains on)."""
        for user, h in self.hist.items():
            yield user, [(self.item_ids[i], r) for i, r in h]


class RankingPolicy:
    """Candidate sources -> features -> River fusion; learns from every interaction it observes.

    ``items``: the catalogue (item id -> :class:`Item`, for genres and year); ``item_ids`` fixes the item
    order of every score vector (items added later are appended). ``model``: the knowledge model, or None
    (the policy then ranks with the collaborative features only); ``kg``: the knowledge graph's candidate
    source (:class:`~driftrec.model.knowledge.candidates.KGCandidates`, empty: the state adds the catalogue
    and feeds it), or None. ``use_text``: the ``lm_nb`` feature from the model's LM text vectors;
    ``use_kg``: the graph features (when the state has a graph). ``state``: share another policy's
    :class:`PolicyState` (that policy updates it; this one only learns its fusion).
    """

    def __init__(self, cfg: PolicyConfig, items: Mapping[str, Item], item_ids: Sequence[str], *,
                 model: ItemSequenceModel | None = None, kg=None, use_text: bool = True, use_kg: bool = True,
                 state: PolicyState | None = None) -> None:
        self.cfg = cfg
        self.owns_state = state is None
        self.state = state if state is not None else PolicyState(cfg, items, item_ids, kg=kg)
        self.use_text = use_text
        self.use_kg = use_kg and self.state.kg is not None
        self.lm_nb = LMTextNeighbourSource(recent=10, user_decay=0.85)
        for iid in self.state.item_ids:
            self.lm_nb.add_item(iid)
        self.corrector = RiverCorrector(learning_rate=cfg.corrector_lr, min_updates=cfg.corrector_min_updates)
        self.rng = np.random.default_rng(cfg.seed)
        self.model: ItemSequenceModel | None = None
        self._km_memo: tuple | None = None
        self._km_pre: dict[tuple, np.ndarray] = {}  # prefetched model scores (see prefetch)
        # user -> ((len(history), model epoch), the model's user vector): the newest USER_VECTORS users
        self._uvecs: OrderedDict[str, tuple[tuple[int, int], Any]] = OrderedDict()
        self._pools: dict[str, list] = {}  # user -> [learning positives since ranked, hard pool] (see learn)
        self.state.listeners.append(self._item_added)
        self.set_model(model)

    # -- the state, as seen from the policy
    @property
    def item_ids(self) -> list[str]:
        return self.state.item_ids

    @property
    def index(self) -> dict[str, int]:
        return self.state.index

    @property
    def hist(self):
        return self.state.hist

    @property
    def seen(self):
        return self.state.seen

    @property
    def n_int(self) -> np.ndarray:
        return self.state.n_int

    @property
    def n_pos(self) -> np.ndarray:
        return self.state.n_pos

    @property
    def pop(self):
        return self.state.pop

    @property
    def dpop(self):
        return self.state.dpop

    @property
    def knn(self):
        return self.state.knn

    @property
    def kg(self):
        return self.state.kg if self.use_kg else None

    def histories(self):
        return self.state.histories()

    def allowed(self, user: str) -> np.ndarray:
        return self.state.allowed(user)

    def add_item(self, item_id: str, item: Item | None = None) -> int:
        return self.state.add_item(item_id, item)

    # --------------------------------------------------------------------------------- the model

    @property
    def feature_names(self) -> tuple[str, ...]:
        names = BASE_FEATURES
        if self.model is not None:
            names += (TEXT_FEATURES if self._text_on else ()) + MODEL_FEATURES
        if self.use_kg:
            names += KG_FEATURES
        return names

    @property
    def _text_on(self) -> bool:
        return self.use_text and self.model is not None and self.model.text_vectors() is not None

    def set_model(self, model: ItemSequenceModel | None) -> None:
        """Serve with ``model`` from now on (a new version after training, or a hot swap)."""
        self.model = model
        self._model_epoch = getattr(self, "_model_epoch", 0) + 1
        self._km_memo = None
        self._km_pre.clear()
        self._uvecs.clear()
        self._ranked_memo = None
        if model is not None:
            self._sync_model_items()

    def _item_added(self, idx: int) -> None:
        self._km_memo = None
        self.lm_nb.add_item(self.state.item_ids[idx])
        if self.model is not None:
            self._sync_model_items()

    def _sync_model_items(self) -> None:
        model, items = self.model, self.state.items
        missing = [i for i in self.item_ids if not model.knows(i)]
        if missing:
            model.add_items([items[i] for i in missing if i in items])
            if any(self.n_int[self.index[i]] for i in missing):
                # an item some history already holds became known: those users' vectors change
                self._uvecs.clear()
        if self._text_on:
            known = [i for i in self.item_ids if model.knows(i)]
            self.lm_nb.set_item_vectors(known, model.text_vectors(known))

    def model_scores(self, user: str) -> np.ndarray:
        """The knowledge model's scores of every item for ``user`` (zeros without a model); the last
        answer is kept until the user's history, the catalogue or the model changes."""
        n = len(self.item_ids)
        if self.model is None:
            return np.zeros(n)
        hist = self.hist.get(user, ())
        key = (user, len(hist), n, self._model_epoch)
        if self._km_memo is not None and self._km_memo[0] == key:
            return self._km_memo[1]
        km = self._km_pre.pop(key, None)
        if km is None:
            vec = self._user_vector(user, hist)
            if vec is not None:
                km = np.asarray(self.model.score_vector(vec, self.item_ids), dtype=np.float64)
            else:
                km = np.asarray(self.model.score_items([self.item_ids[i] for i, _ in hist], [r for _, r in hist],
                                                       self.item_ids), dtype=np.float64)
        self._km_memo = (key, km)
        return km

    USER_VECTORS = 65_536  # user vectors kept (64 floats each with the default model: ~17 MB)

    def _user_vector(self, user: str, hist) -> Any | None:
        """The knowledge model's vector of ``user`` (None: the model has none), kept while the user's
        history and the model are unchanged: a user who asks again before a new interaction costs one
        matrix-vector product, not a forward of the sequence encoder."""
        version = self._vector_version(hist)
        hit = self._uvecs.get(user)
        if hit is not None and hit[0] == version:
            self._uvecs.move_to_end(user)
            return hit[1]
        vec = self.model.user_vector([self.item_ids[i] for i, _ in hist])
        if vec is None:
            return None
        self._keep_vectors([(user, version, vec)])
        return vec

    def _vector_version(self, hist) -> tuple[int, int]:
        """What a kept user vector is valid for: the user's history length and the model it came from."""
        return (len(hist), self._model_epoch)

    def _keep_vectors(self, kept: Iterable[tuple[str, tuple[int, int], Any]]) -> None:
        """Keep (user, version, vector) entries, newest last; the least recently used go past ``USER_VECTORS``."""
        for user, version, vec in kept:
            self._uvecs[user] = (version, vec)
            self._uvecs.move_to_end(user)
        while len(self._uvecs) > self.USER_VECTORS:
            self._uvecs.popitem(last=False)

    def prefetch_users(self, users: Sequence[str]) -> int:
        """Compute the knowledge model's vectors of ``users`` that are not kept for their current history,
        in batched forwards (a batch of requests ranked next, before any new interaction): the rankings then
        find them kept. Changes no result (a batched row is the user's one-user forward to the bit); a user
        vector costs a fraction of a one-user forward this way. Returns how many were computed."""
        model = self.model
        if model is None:
            return 0
        want: dict[str, tuple] = {}
        for user in users:
            hist = self.hist.get(user, ())
            version = self._vector_version(hist)
            hit = self._uvecs.get(user)
            if user not in want and (hit is None or hit[0] != version):
                want[user] = (version, [self.item_ids[i] for i, _ in hist])
        if len(want) < 2:  # one user: its ranking's own forward is the same work
            return 0
        vecs = model.user_vectors([h for _, h in want.values()])
        if vecs is None:
            return 0
        self._keep_vectors((user, version, vec) for (user, (version, _)), vec in zip(want.items(), vecs))
        return len(want)

    def prefetch(self, events: Sequence[tuple]) -> int:
        """Compute, in batched forwards, the knowledge model's scores that observing ``events`` ((user, item,
        rating, ...) tuples; in this order, next) will ask for: one per positive the fusion learns from,
        for the user's history before it.
        Changes no result (a batched row is bit-identical to the user's forward alone, see
        :meth:`~driftrec.model.knowledge.seqrec.KnowledgeModel.user_vectors`); it only makes them cheaper.
        A history that reaches an item the model does not know yet is left to the one-user forward. Returns
        how many were prefetched."""
        self._km_pre.clear()
        model = self.model
        if model is None or not events:
            return 0
        thr = self.cfg.positive_threshold
        n = len(self.item_ids)
        added: dict[str, list[tuple[str, float]]] = {}
        broken: set[str] = set()
        want: dict[tuple, tuple[list[str], list[float]]] = {}
        frac = self.cfg.learn_fraction
        for user, item, rating, *_ in events:
            extra = added.get(user, [])
            learns = ((rating is None or rating >= thr) and user not in broken
                      and self.index.get(item) not in self.seen.get(user, ())
                      and all(item != i for i, _ in extra) and (frac >= 1 or self.learns_from(user, item)))
            if learns:  # the positives learn() will learn from (the others need no forward)
                hist = self.hist.get(user, ())
                key = (user, len(hist) + len(extra), n, self._model_epoch)
                if key not in want:
                    want[key] = ([self.item_ids[i] for i, _ in hist] + [i for i, _ in extra],
                                 [r for _, r in hist] + [r for _, r in extra])
            if item not in self.index or not model.knows(item):
                broken.add(user)
            added.setdefault(user, []).append((item, 5.0 if rating is None else float(rating)))
        if not want:
            return 0
        keys = list(want)
        rows = model.score_items_many([want[k][0] for k in keys], [want[k][1] for k in keys], self.item_ids)
        self._km_pre = {k: rows[j] for j, k in enumerate(keys)}
        return len(keys)

    # ---------------------------------------------------------------------------------- features

    def features(self, user: str, cols: np.ndarray | None, ts: float, *, km: np.ndarray | None = None) -> np.ndarray:
        """The feature matrix (len(cols) x len(feature_names)); ``cols`` None = every item."""
        base = self.state.base_features(user, cols, ts)
        nb = len(BASE_FEATURES)
        parts = [base[:, :nb]]
        if self.model is not None:
            n_all = len(self.item_ids)
            idx = np.arange(n_all) if cols is None else np.asarray(cols, dtype=np.int64)
            if self._text_on:
                hist = self.hist.get(user)
                if not hist:
                    col = np.zeros(len(idx))
                elif cols is None:  # every item: no copy of the (items x 384) text matrix
                    col = self.lm_nb.vectors[:n_all] @ self.lm_nb.user_vector(user)
                else:
                    col = self.lm_nb.vectors[idx] @ self.lm_nb.user_vector(user)
                parts.append(col[:, None])
            km_all = self.model_scores(user) if km is None else km
            if cols is None:
                order = np.argsort(-km_all, kind="stable")
                rank = np.empty(n_all)
                rank[order] = np.arange(n_all)
                rank = rank[idx]
            else:  # a few columns: their stable-sort rank by counting, no sort of the catalogue
                v = km_all[idx][:, None]
                rank = ((km_all[None, :] > v).sum(axis=1)
                        + ((km_all[None, :] == v) & (np.arange(n_all)[None, :] < idx[:, None])).sum(axis=1))
            parts.append(np.stack([km_all[idx], 1.0 / (1.0 + rank / 10.0)], axis=1))
        if self.use_kg:
            parts.append(base[:, nb:nb + len(KG_FEATURES)])
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    # ----------------------------------------------------------------------------------- ranking

    def score_all(self, user: str, ts: float) -> np.ndarray:
        """The fused score of every item (aligned with :attr:`item_ids`) for ``user`` at time ``ts``."""
        F = self.features(user, None, ts)
        self._ranked_memo = ((user, ts, self.state.observed, len(self.item_ids), self._model_epoch), F)
        return self.corrector.predict_many(F, self.feature_names)

    def ranked_features(self, user: str, cols: np.ndarray, ts: float) -> np.ndarray:
        """The features of ``cols`` for ``user`` at ``ts``, taken from the whole-catalogue matrix the last
        :meth:`score_all` computed when it was this user's at this time and state (what a server asks for
        the items it has just ranked, to explain them), else computed (:meth:`features`)."""
        memo = self._ranked_memo  # set by set_model (in __init__) and score_all
        if memo is not None and memo[0] == (user, ts, self.state.observed, len(self.item_ids), self._model_epoch):
            return memo[1][np.asarray(cols, dtype=np.int64)]
        return self.features(user, cols, ts)

    def top(self, scores: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
        """The ``k`` best allowed items, best first; ties broken by catalogue order (deterministic)."""
        masked = np.where(allowed, scores, -np.inf)
        n = len(masked)
        cand = np.arange(n)
        if 0 < k < n:  # only the items tied with or above the k-th best need sorting
            kth = np.partition(masked, n - k)[n - k]
            if not np.isnan(kth):
                cand = np.flatnonzero(masked >= kth)
        order = cand[np.lexsort((cand, -masked[cand]))][:k]
        return order[np.isfinite(masked[order])]

    def rank_scores(self, user: str, ts: float) -> np.ndarray:
        """The scores the policy ranks ``user``'s items by: the fusion's (:meth:`score_all`) once it has
        learnt from anything. Before that (a worker just started, whose fusion has not come back from its
        learner process yet, or a log's first events) the fusion scores every item alike, which would leave
        catalogue order; the policy then ranks by a prior instead - the user's sequence-aware co-visitation
        plus decayed popularity (popularity for a user with no history), as ``p / (1 + p)``. Then the
        knowledge model's best never-interacted item may take one position (:meth:`new_item_slot`)."""
        return self.new_item_slot(user, self.fused_scores(user, ts))

    def fused_scores(self, user: str, ts: float) -> np.ndarray:
        """:meth:`rank_scores` before the new-item slot: the fusion's, or the prior before it has learnt."""
        if self.corrector.n_learned:
            return self.score_all(user, ts)
        F = self.state.base_features(user, None, ts)
        prior = F[:, BASE_FEATURES.index("knn_seq")] + F[:, BASE_FEATURES.index("dpop")]
        return prior / (1.0 + prior)

    def new_item_slot(self, user: str, scores: np.ndarray) -> np.ndarray:
        """``scores`` with the knowledge model's best never-interacted item for ``user`` moved up to
        position ``cfg.new_item_position`` (1 = first) when the model ranks it within its own top
        ``cfg.new_item_model_rank`` of the user's allowed items; unchanged otherwise (no model, no
        history, no such item, the slot off (0) or the item already at or above that position).

        Why: an item nobody has interacted with has no collaborative signal - every co-visitation,
        popularity and statistics feature is zero - so the fusion, learnt on items with interactions,
        ranks it far down whatever the model says. The knowledge model scores it from its text and its
        graph entity; this slot is the one place where that knowledge, and only it, decides."""
        pos = self.cfg.new_item_position
        hist = self.hist.get(user)
        if self.model is None or not pos or not hist:
            return scores
        n = len(scores)
        allowed = self.allowed(user)[:n]
        fresh = np.flatnonzero(allowed & (self.n_int[:n] == 0))
        if not len(fresh):
            return scores
        if pos > int(allowed.sum()) - 1:  # fewer allowed items than the slot's position: nothing to move past
            return scores
        km = self.model_scores(user)[:n]
        best = int(fresh[np.argmax(km[fresh])])
        if int((km[allowed] > km[best]).sum()) >= self.cfg.new_item_model_rank:
            return scores
        masked = np.where(allowed, scores, -np.inf)
        kth = np.partition(masked, n - pos)[n - pos]  # the pos-th best allowed score
        if not np.isfinite(kth) or masked[best] > kth:
            return scores
        out = scores.copy()
        out[best] = np.nextafter(kth, np.inf)
        return out

    def recommend(self, user: str, k: int, ts: float, *, exclude_seen: bool = True,
                  candidates: Sequence[str] | None = None) -> list[tuple[str, float]]:
        """The ``k`` best items for ``user`` (among ``candidates`` when given), with their scores."""
        scores = self.rank_scores(user, ts)
        allowed = self.allowed(user) if exclude_seen else np.ones(len(scores), dtype=bool)
        if candidates is not None:
            pick = np.zeros(len(scores), dtype=bool)
            pick[[self.index[c] for c in candidates if c in self.index]] = True
            allowed &= pick
        return [(self.item_ids[j], float(scores[j])) for j in self.top(scores, allowed, k)]

    def hard_pool(self, scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        """The (up to) ``cfg.hard_pool`` highest-scored allowed items, unordered: half of the fusion's
        negatives come from here."""
        masked = np.where(allowed, scores, -np.inf)
        k = self.cfg.hard_pool
        top = np.argpartition(-masked, k)[:k] if len(masked) > k else np.arange(len(masked))
        return top[np.isfinite(masked[top])]

    # ---------------------------------------------------------------------------------- learning

    def _negatives(self, user: str, pos: int, ranked: np.ndarray | None) -> list[int]:
        """Half from the policy's own top-ranked items (when it ranked), the rest from the catalogue."""
        seen = self.seen.get(user, set())
        k = self.cfg.negatives
        n = len(self.item_ids)
        out: list[int] = []
        hard = k // 2
        tries = 0
        while len(out) < k and tries < 20 * k:
            tries += 1
            if len(out) < hard and ranked is not None and len(ranked):
                c = int(ranked[self.rng.integers(len(ranked))])
            else:
                c = int(self.rng.integers(n))
            if c != pos and c not in seen and c not in out:
                out.append(c)
        return out

    def learn(self, user: str, item: str, rating: float | None, ts: float, *,
              scores: np.ndarray | None = None) -> None:
        """The fusion's part of learning one interaction (the state is not touched): at a positive on an
        item new to the user, pairwise updates against negatives, half of them from the policy's own
        top items (``scores``: its :meth:`score_all` for this user at ``ts`` when the caller has it
        already; computed here otherwise). The whole catalogue is ranked for that hard pool at every
        ``cfg.hard_pool_every``-th learning positive of the user and the pool reused in between (a
        schedule of the user's own events: the replay and the worker keep it alike, whatever they rank
        in between). With ``cfg.learn_fraction`` < 1 it learns from that share of such positives only
        (:meth:`learns_from`)."""
        i = self.add_item(item)
        positive = rating is None or rating >= self.cfg.positive_threshold
        if not positive or i in self.seen.get(user, ()):
            return
        if self.cfg.learn_fraction < 1 and not self.learns_from(user, item):
            return
        pool = self._pools.get(user)
        if pool is not None and pool[0] < self.cfg.hard_pool_every:
            pool[0] += 1  # reuse the pool (items seen since are skipped by _negatives)
            ranked = pool[1]
        else:
            if scores is None:
                scores = self.score_all(user, ts)
            ranked = self.hard_pool(scores, self.allowed(user)).astype(np.int32)
            if self.cfg.hard_pool_every > 1:
                self._pools[user] = [1, ranked]
        negs = self._negatives(user, i, ranked)
        cols = np.asarray([i] + negs, dtype=np.int64)
        # RankNet-style pairs (Corrector.learn_group): x_pos - x_neg -> 1 and the mirror -> 0
        self.corrector.learn_group(self.features(user, cols, ts), self.feature_names)

    def learns_from(self, user: str, item: str) -> bool:
        """Whether the fusion learns from a positive of ``user`` on ``item`` (``cfg.learn_fraction`` of
        them, by a stable hash: the same pairs in every process and run)."""
        h = zlib.crc32(f"{user}\x00{item}".encode())
        return h < self.cfg.learn_fraction * 2**32

    def observe_many(self, events: Sequence[tuple[str, str, float | None, float]]) -> None:
        """:meth:`observe` each of ``events`` ((user, item, rating, ts), in order), with the knowledge
        model's forwards batched (:meth:`prefetch`): the same result as observing them one by one."""
        self.prefetch(events)
        try:
            for user, item, rating, ts in events:
                self.observe(user, item, rating, ts)
        finally:
            self._km_pre.clear()

    def follow_many(self, events: Sequence[tuple[str, str, float | None, float]]) -> None:
        """Take ``events`` ((user, item, rating, ts), in order) into everything but the fusion: the text
        neighbours' user profiles and the state. A serving replica whose fusion is learnt by another copy of
        the policy (the worker's learner process, which :meth:`observe` s the same events) does this and
        takes that copy's fusion with :meth:`set_corrector`; after both have seen the same events the two
        rank alike (the fusion is the only part :meth:`learn` changes)."""
        for user, item, rating, ts in events:
            self.lm_nb.learn_one(user, item, 5.0 if rating is None else float(rating), ts)
            if self.owns_state:
                self.state.update(user, item, rating, ts)

    def set_corrector(self, corrector: RiverCorrector) -> None:
        """Rank with ``corrector`` (the fusion another copy of this policy learnt) from now on."""
        self.corrector = corrector

    def observe(self, user: str, item: str, rating: float | None, ts: float, *,
                scores: np.ndarray | None = None) -> None:
        """Learn one interaction (``rating`` None = a click, taken as a positive): the fusion
        (:meth:`learn`), then the state, when this policy owns it."""
        self.learn(user, item, rating, ts, scores=scores)
        self.lm_nb.learn_one(user, item, 5.0 if rating is None else float(rating), ts)
        if self.owns_state:
            self.state.update(user, item, rating, ts)
