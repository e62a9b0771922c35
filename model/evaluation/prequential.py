"""Offline evaluation on real logs: protocol ``prequential-v1`` and the ``driftrec evaluate`` command.

Protocol prequential-v1 (test-then-train over a time-ordered log):

1. events are sorted by timestamp (stable sort); every rating is an interaction, ``rating >= 4`` a positive;
2. the first 20% of events only train;
3. for every later positive ``(u, i)`` (every ``--every``-th one) whose item ``u`` has not interacted with
   before, each system ranks **all** items ``u`` has not interacted with; HR@10 and NDCG@10 of ``i``
   are recorded (ties are broken uniformly at random *in expectation*, so the metric is deterministic
   and no system profits from a lucky tie order);
4. then every system learns from the event.

The driftrec system is replayed as it runs in production: candidate sources and the River corrector
learn online from every event; the LoRA adapter of the LM text tower is first trained on the warm-up
window, then updated incrementally every ``--lm-update-every`` events, each update only on examples
from the past, and item vectors are recomputed after each update. Items' texts are known from the
catalogue from the start (that is the language model's knowledge, not a peek at the future).

Baselines (popularity, decayed popularity, item-kNN) are evaluated in the same run on the same points.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from driftrec.model.ranking.sources import DecayedPopularitySource, ItemKNNSource, LMTextNeighbourSource, PopularitySource
from driftrec.model.ranking.corrections import RiverCorrector
from driftrec.model.ranking.metrics import rank_metrics
from driftrec.model.evaluation.movielens import RatingLog, load

log = logging.getLogger(__name__)

PROTOCOL = "prequential-v1"
BASELINES = ("popularity", "decayed_popularity", "itemknn")
SYSTEM = "driftrec"

# -------------------------------------------------------------------------------------- config


@dataclass
class EvalConfig:
    every: int = 10
    warmup_frac: float = 0.2
    positive_threshold: float = 4.0
    k: int = 10
    limit: int | None = None
    seed: int = 0
    windows: int = 10
    half_life_s: float = 2 * 86400.0
    negatives: int = 6
    use_lm: bool = True
    lm_update_every: int = 20000
    lm_initial_steps: int = 30
    lm_update_steps: int = 10
    lm_batch_size: int = 32
    lm_learning_rate: float = 5e-4
    lm_history: int = 8
    user_refresh: int = 5000
    corrector_lr: float = 0.005
    cold_threshold: int = 5
    kg: str | None = None  # knowledge graph: a folder (*.kg [+ *.link]) or a triples file
    kg_link: str | None = None  # link file when kg is a triples file
    kg_format: str = "auto"
    kg_alpha: float = 0.0  # weight of the TransE term in the adapter's objective, L = L_rec + alpha * L_KG
    kg_gate: str = "auto"  # "auto": the warm-up validation decides whether the KG is used; "force": always
    kg_gate_z: float = 2.0
    kg_gate_k: int = 50
    kg_gate_max_evals: int = 3000
    knn_user_decay: float = 0.9
    knn_pair_decay: float = 0.9
    knn_max_history: int = 60
    threads: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------- the system


class DriftrecSystem:
    """Candidate sources -> features -> River correction score, replayed online."""

    FEATURES = (
        "knn", "knn_seq", "knn_last", "pop", "dpop", "dpop_fast", "lm_nb", "lm_tt", "genre",
        "item_pos_rate", "item_recency", "item_age", "year_gap",
    )
    KG_FEATURES = ("kg", "kg_cold")  # added when a knowledge graph is in use

    def __init__(self, log_: RatingLog, cfg: EvalConfig, *, item_ids: list[str], trainer=None, kg=None) -> None:
        self.cfg = cfg
        self.feature_names = self.FEATURES + (self.KG_FEATURES if kg is not None else ())
        self.items = log_.items
        self.item_ids = item_ids
        self.index = {i: n for n, i in enumerate(item_ids)}
        n = len(item_ids)
        self.pop = PopularitySource(item_ids)
        self.dpop = DecayedPopularitySource(item_ids, half_life_s=cfg.half_life_s)
        self.dpop_fast = DecayedPopularitySource(item_ids, half_life_s=cfg.half_life_s / 8)
        self.knn = ItemKNNSource(item_ids)
        self.knn_seq = ItemKNNSource(item_ids, user_decay=cfg.knn_user_decay, pair_decay=cfg.knn_pair_decay,
                                     max_history=cfg.knn_max_history)
        self.lm_nb = LMTextNeighbourSource(item_ids, recent=10, user_decay=0.85)
        self.sources = [self.pop, self.dpop, self.dpop_fast, self.knn, self.knn_seq, self.lm_nb]
        self.kg = None
        if kg is not None:
            from driftrec.model.knowledge.candidates import KGCandidates

            self.kg = KGCandidates(kg, item_ids, positive_threshold=cfg.positive_threshold)
            self.sources.append(self.kg)
        self.corrector = RiverCorrector(learning_rate=cfg.corrector_lr, min_updates=2000)
        self.rng = np.random.default_rng(cfg.seed)
        # item side statistics
        self.n_int = np.zeros(n)
        self.n_pos = np.zeros(n)
        self.first_ts = np.full(n, np.nan)
        self.last_ts = np.full(n, np.nan)
        genres = sorted({g for it in self.items.values() for g in it.genres})
        self.genre_index = {g: j for j, g in enumerate(genres)}
        self.G = np.zeros((n, max(len(genres), 1)))
        self.years = np.full(n, np.nan)
        for i, iid in enumerate(item_ids):
            it = self.items.get(iid)
            if it is None:
                continue
            for g in it.genres:
                self.G[i, self.genre_index[g]] = 1.0
            if it.year:
                self.years[i] = it.year
        gnorm = np.linalg.norm(self.G, axis=1)
        self.Gn = self.G / np.where(gnorm > 0, gnorm, 1.0)[:, None]
        # user side
        self.hist: dict[str, list[tuple[int, float]]] = {}
        self.seen: dict[str, set[int]] = {}
        self.ugenre: dict[str, np.ndarray] = {}
        # LM
        self.trainer = trainer
        self.item_vecs: np.ndarray | None = None
        self.user_vecs: dict[str, tuple[int, np.ndarray]] = {}
        self.user_encodes = 0
        self.lm_seconds = 0.0
        if trainer is not None:
            self.refresh_item_vectors()

    # -------------------------------------------------------------------------------- LM

    def refresh_item_vectors(self) -> None:
        t0 = time.perf_counter()
        texts = [self.items[i].text() for i in self.item_ids]
        self.item_vecs = self.trainer.embed_items(texts)
        self.lm_nb.set_item_vectors(self.item_ids, self.item_vecs)
        self.user_vecs.clear()
        self.lm_seconds += time.perf_counter() - t0

    def user_text(self, user: str) -> str:
        from driftrec.model.text import render_user_text

        h = self.hist.get(user, [])[-self.cfg.lm_history :]
        return render_user_text([(self.items[self.item_ids[i]], r) for i, r in h], max_items=self.cfg.lm_history)

    def user_vector(self, user: str, *, fresh: bool = False) -> np.ndarray | None:
        """The user-tower vector from the last batch refresh (None before the user's first one).

        User vectors are recomputed in batches (:meth:`refresh_all_users`, every ``user_refresh``
        events and after each adapter update), as a periodic job would; ``fresh=True`` encodes the
        user's current history now.
        """
        if self.trainer is None or self.item_vecs is None:
            return None
        if fresh:
            t0 = time.perf_counter()
            vec = self.trainer.embed_users([self.user_text(user)])[0]
            self.user_encodes += 1
            self.lm_seconds += time.perf_counter() - t0
            self.user_vecs[user] = (len(self.hist.get(user, ())), vec)
            return vec
        cached = self.user_vecs.get(user)
        return None if cached is None else cached[1]

    def refresh_all_users(self, *, changed_only: bool = False) -> None:
        """Re-encode the users (with history; with ``changed_only``, those whose history grew)."""
        if self.trainer is None:
            return
        t0 = time.perf_counter()
        users = [
            u for u, h in self.hist.items()
            if h and not (changed_only and u in self.user_vecs and self.user_vecs[u][0] == len(h))
        ]
        if users:
            vecs = self.trainer.embed_users([self.user_text(u) for u in users])
            for u, v in zip(users, vecs):
                self.user_vecs[u] = (len(self.hist[u]), v)
            self.user_encodes += len(users)
        self.lm_seconds += time.perf_counter() - t0

    # -------------------------------------------------------------------------- features

    def features(self, user: str, cols: np.ndarray | None, ts: float, *, fresh_user: bool = False) -> np.ndarray:
        """The feature matrix (len(cols) x len(FEATURES)); ``cols`` None = all items."""
        n_all = len(self.item_ids)
        idx = np.arange(n_all) if cols is None else np.asarray(cols, dtype=np.int64)
        m = len(idx)
        hist = self.hist.get(user, [])
        nh = len(hist)
        F = np.zeros((m, len(self.feature_names)))
        if nh:
            knn = self.knn.score_items(user, None if cols is None else idx) / nh
            w = self.cfg.knn_user_decay ** np.arange(min(nh, self.cfg.knn_max_history))
            knn_seq = self.knn_seq.score_items(user, None if cols is None else idx) / w.sum()
            last = np.asarray([hist[-1][0]])
            knn_last = self.knn_seq.similarity_rows(last, None if cols is None else idx)[0]
        else:
            knn = knn_seq = knn_last = np.zeros(m)
        dpop = self.dpop.score_all(user, ts)[idx]
        dpop_fast = self.dpop_fast.score_all(user, ts)[idx]
        F[:, 0] = np.log1p(100.0 * knn)
        F[:, 1] = np.log1p(100.0 * knn_seq)
        F[:, 2] = np.log1p(100.0 * knn_last)
        F[:, 3] = np.log1p(self.n_int[idx])
        F[:, 4] = np.log1p(dpop)
        F[:, 5] = np.log1p(dpop_fast)
        if self.item_vecs is not None and nh:
            F[:, 6] = self.lm_nb.vectors[idx] @ self.lm_nb.user_vector(user)
            uv = self.user_vector(user, fresh=fresh_user)
            if uv is not None:
                F[:, 7] = self.item_vecs[idx] @ uv
        ug = self.ugenre.get(user)
        if ug is not None:
            nrm = np.linalg.norm(ug)
            if nrm > 0:
                F[:, 8] = self.Gn[idx] @ (ug / nrm)
        F[:, 9] = (self.n_pos[idx] + 1.0) / (self.n_int[idx] + 2.0)
        last_ts = self.last_ts[idx]
        first_ts = self.first_ts[idx]
        F[:, 10] = np.where(np.isnan(last_ts), 12.0, np.log1p(np.maximum(ts - np.nan_to_num(last_ts), 0) / 3600.0))
        F[:, 11] = np.where(np.isnan(first_ts), 0.0, np.log1p(np.maximum(ts - np.nan_to_num(first_ts), 0) / 86400.0))
        if nh:
            ys = self.years[[i for i, _ in hist[-20:]]]
            ys = ys[~np.isnan(ys)]
            if len(ys):
                yg = np.abs(self.years[idx] - ys.mean()) / 10.0
                F[:, 12] = np.where(np.isnan(yg), 1.0, yg)
        if self.kg is not None:
            # items linked through the graph to the user's likes; kg_cold lets the corrector weigh
            # the graph separately where interactions say little (items with few positives yet)
            kg = np.log1p(self.kg.score_all(user, ts)[idx])
            F[:, 13] = kg
            F[:, 14] = np.where(self.n_pos[idx] < self.cfg.cold_threshold, kg, 0.0)
        return F

    # --------------------------------------------------------------------------- scoring

    def score_all(self, user: str, ts: float) -> np.ndarray:
        F = self.features(user, None, ts)
        return self.corrector.predict_many(F, self.feature_names)

    # -------------------------------------------------------------------------- learning

    def _negatives(self, user: str, pos: int, ts: float, ranked: np.ndarray | None) -> list[int]:
        """Negatives among items that would be ranked: the system's own top items at an evaluation
        point, else the top of the sequential item-kNN and of decayed popularity, plus random ones."""
        seen = self.seen.get(user, set())
        k = self.cfg.negatives
        n = len(self.item_ids)
        pools = []
        if ranked is not None and len(ranked):
            pools.append(np.asarray(ranked))
        out: list[int] = []
        hard = k // 2
        tries = 0
        while len(out) < k and tries < 20 * k:
            tries += 1
            if len(out) < hard and pools:
                pool = pools[len(out) % len(pools)]
                c = int(pool[self.rng.integers(len(pool))])
            else:
                c = int(self.rng.integers(n))
            if c != pos and c not in seen and c not in out:
                out.append(c)
        return out

    def learn(self, user: str, item: str, rating: float, ts: float, *, ranked: np.ndarray | None = None) -> None:
        i = self.index[item]
        positive = rating >= self.cfg.positive_threshold
        if positive and i not in self.seen.get(user, ()):
            # Pairwise (RankNet-style) learning: the corrector sees x_pos - x_neg -> 1 and the
            # mirror pair -> 0, so its linear score ranks; scoring applies it to x directly.
            negs = self._negatives(user, i, ts, ranked)
            cols = np.asarray([i] + negs, dtype=np.int64)
            F = self.features(user, cols, ts)
            for r in range(1, len(cols)):
                d = F[0] - F[r]
                self.corrector.learn_one(dict(zip(self.feature_names, d.tolist())), 1.0)
                self.corrector.learn_one(dict(zip(self.feature_names, (-d).tolist())), 0.0)
        for s in self.sources:
            s.learn_one(user, item, rating, ts)
        self.n_int[i] += 1
        self.n_pos[i] += positive
        if np.isnan(self.first_ts[i]):
            self.first_ts[i] = ts
        self.last_ts[i] = ts if np.isnan(self.last_ts[i]) else max(self.last_ts[i], ts)
        self.hist.setdefault(user, []).append((i, rating))
        self.seen.setdefault(user, set()).add(i)
        ug = self.ugenre.get(user)
        if ug is None:
            ug = self.ugenre[user] = np.zeros(self.G.shape[1])
        ug += self.G[i] * (1.0 if positive else 0.3)


# ------------------------------------------------------------------------------- evaluation


def _make_trainer(cfg: EvalConfig, negative_pool: list[str]):
    from driftrec.model.training.trainer import Trainer

    return Trainer(
        max_steps=cfg.lm_initial_steps,
        batch_size=cfg.lm_batch_size,
        learning_rate=cfg.lm_learning_rate,
        replay_buffer=5000,
        negatives=16,
        negative_pool=negative_pool,
        device="cpu",
        seed=cfg.seed,
    )


# ------------------------------------------------------------------------------ knowledge graph


def load_eval_kg(cfg: EvalConfig, log_: RatingLog):
    """The knowledge graph named by ``cfg.kg`` (RecBole atomic folder or files, or plain TSV), with the
    catalogue's ids and titles, and its link/catalogue alignment check (``kg.alignment``)."""
    from driftrec.model.knowledge.graph import check_alignment, load_kg

    kg = load_kg(cfg.kg, cfg.kg_link, fmt=cfg.kg_format, item_ids=list(log_.items),
                 titles={i: it.title for i, it in log_.items.items()})
    kg.alignment = check_alignment(kg, {i: it.genres for i, it in log_.items.items()})
    return kg


def permuted_links(kg, seed: int = 0):
    """The same graph with its item -> entity links shuffled among the linked items: a control with the
    graph's structure (degrees, entity sizes) but no true item correspondence."""
    items = sorted(kg.item_entity)
    ents = [kg.item_entity[i] for i in items]
    perm = np.random.default_rng(seed).permutation(len(items))
    return kg.relinked({i: ents[j] for i, j in zip(items, perm)})


def kg_gate(events: Sequence, kg, item_ids: list[str], cfg: EvalConfig, control=None) -> dict:
    """Warm-up validation: does the KG candidate source rank the next liked item better than the same
    graph with shuffled links?

    A test-then-learn pass over ``events`` (the warm-up window only, so nothing from the evaluated
    future is used): at (up to ``cfg.kg_gate_max_evals``, evenly spread) positives on items new to the
    user, HR@``cfg.kg_gate_k`` of the item under the KG source and under the control
    (:func:`permuted_links`). ``open`` when the paired mean difference is at least ``cfg.kg_gate_z``
    standard errors above 0. A graph whose links do not match the catalogue (keyed by another
    dataset's ids, say) does no better than its shuffled control and is kept out."""
    from driftrec.model.knowledge.candidates import KGCandidates

    t0 = time.perf_counter()
    control = control if control is not None else permuted_links(kg, cfg.seed)
    srcs = [KGCandidates(kg, item_ids, positive_threshold=cfg.positive_threshold),
            KGCandidates(control, item_ids, positive_threshold=cfg.positive_threshold)]
    index = {i: n for n, i in enumerate(item_ids)}
    seen: dict[str, set[int]] = {}
    points = [p for p, e in enumerate(events) if e.rating >= cfg.positive_threshold]
    step = max(1, math.ceil(len(points) / max(cfg.kg_gate_max_evals, 1)))
    hits: list[tuple[float, float]] = []
    npos = 0
    for e in events:
        i = index[e.item]
        s_u = seen.setdefault(e.user, set())
        if e.rating >= cfg.positive_threshold and i not in s_u:
            npos += 1
            if (npos - 1) % step == 0 and s_u:
                allowed = np.ones(len(item_ids), dtype=bool)
                allowed[list(s_u)] = False
                hits.append(tuple(rank_metrics(src.score_all(e.user, e.timestamp), i, allowed, cfg.kg_gate_k)[0]
                                  for src in srcs))
        for src in srcs:
            src.learn_one(e.user, e.item, e.rating, e.timestamp)
        s_u.add(i)
    h = np.asarray(hits, dtype=np.float64).reshape(-1, 2)
    n = len(h)
    d = h[:, 0] - h[:, 1] if n else np.zeros(0)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    z = float(d.mean() / se) if n > 1 and se > 0 else 0.0
    return {
        "evaluations": n,
        "k": cfg.kg_gate_k,
        f"hr@{cfg.kg_gate_k}": float(h[:, 0].mean()) if n else 0.0,
        f"hr@{cfg.kg_gate_k}_shuffled_links": float(h[:, 1].mean()) if n else 0.0,
        "z": z,
        "z_min": cfg.kg_gate_z,
        "open": bool(n > 1 and z >= cfg.kg_gate_z),
        "seconds": time.perf_counter() - t0,
    }


def evaluate(log_: RatingLog, cfg: EvalConfig, *, progress: bool = True, trainer=None, diagnose: bool = False,
             kg=None) -> dict:
    """Run protocol prequential-v1 over ``log_``; returns the result dict (see module docstring).

    ``kg`` (a :class:`driftrec.model.knowledge.graph.KnowledgeGraph`, else loaded from ``cfg.kg``): the KG candidate source
    joins the ranking as features ``kg``/``kg_cold`` and, with ``cfg.kg_alpha > 0``, the adapter trains
    on ``L_rec + kg_alpha * L_KG`` - both only when the warm-up gate (:func:`kg_gate`) opens, or with
    ``cfg.kg_gate == "force"``."""
    t_start = time.perf_counter()
    _seed_everything(cfg.seed)
    events, n_warm, item_ids, index = _prepare_events(log_, cfg)
    if kg is None and cfg.kg:
        kg = load_eval_kg(cfg, log_)
    use_kg, kg_info = _gate_knowledge_graph(kg, events[:n_warm], item_ids, cfg)
    trainer = _prepare_trainer(trainer, cfg, log_, item_ids, use_kg)
    system = DriftrecSystem(log_, cfg, item_ids=item_ids, trainer=trainer if cfg.use_lm else None, kg=use_kg)
    replay = _Replay(system, cfg, log_, index, n_warm, trainer=trainer, diagnose=diagnose)
    replay.run(events, progress=progress)
    return _assemble_result(replay, log_, cfg, kg_info=kg_info, n_events=len(events), n_warm=n_warm,
                            item_ids=item_ids, elapsed=time.perf_counter() - t_start, diagnose=diagnose)


def _seed_everything(seed: int) -> None:
    """Seed Python's and NumPy's global random generators (the trainer and the system seed their own)."""
    random.seed(seed)
    np.random.seed(seed)


def _prepare_events(log_: RatingLog, cfg: EvalConfig) -> tuple[list, int, list[str], dict[str, int]]:
    """The replayed events (the first ``cfg.limit``), the warm-up length, and the catalogue's item ids with
    their column index (items only seen in the events are appended, for hand-built logs)."""
    events = log_.events[: cfg.limit] if cfg.limit else log_.events
    n_warm = int(cfg.warmup_frac * len(events))
    item_ids = list(log_.items)
    index = {i: n for n, i in enumerate(item_ids)}
    for e in events:
        if e.item not in index:  # load() fills the catalogue; be safe for hand-built logs
            index[e.item] = len(item_ids)
            item_ids.append(e.item)
    return events, n_warm, item_ids, index


def _gate_knowledge_graph(kg, warmup: Sequence, item_ids: list[str], cfg: EvalConfig) -> tuple[object | None, dict | None]:
    """Run the warm-up gate on ``kg`` (if any): the graph to use (None when the gate keeps it out) and
    the ``kg`` section of the result (None without a graph)."""
    if kg is None:
        return None, None
    if cfg.kg_gate not in ("auto", "force"):
        raise ValueError(f"kg_gate must be 'auto' or 'force', not {cfg.kg_gate!r}")
    gate = kg_gate(warmup, kg, item_ids, cfg)
    use_kg = kg if (gate["open"] or cfg.kg_gate == "force") else None
    kg_info = {
        "path": cfg.kg,
        "report": kg.report.summary(),
        "stats": kg.stats(),
        "alignment": kg.alignment,
        "gate": {"mode": cfg.kg_gate, **gate},
        "used": use_kg is not None,
        "alpha": cfg.kg_alpha,
        "alpha_effective": cfg.kg_alpha if use_kg is not None and cfg.use_lm else 0.0,
    }
    log.info("knowledge graph %s: warm-up gate %s (HR@%d %.4f vs %.4f with shuffled links, z=%.2f); %s",
             cfg.kg, "open" if gate["open"] else "closed", cfg.kg_gate_k, gate[f"hr@{cfg.kg_gate_k}"],
             gate[f"hr@{cfg.kg_gate_k}_shuffled_links"], gate["z"],
             "used" if use_kg is not None else "not used")
    return use_kg, kg_info


def _prepare_trainer(trainer, cfg: EvalConfig, log_: RatingLog, item_ids: list[str], use_kg):
    """The LM adapter trainer: ``trainer`` if given, else a new one when the LM is on (None when off);
    with a used graph and ``cfg.kg_alpha > 0`` its objective gets the KG loss."""
    if cfg.use_lm and trainer is None:
        if cfg.threads:
            import torch

            torch.set_num_threads(cfg.threads)
        trainer = _make_trainer(cfg, [log_.items[i].text() for i in item_ids])
    if use_kg is not None and cfg.use_lm and trainer is not None and cfg.kg_alpha > 0:
        from driftrec.model.knowledge.loss import attach_kg_loss

        attach_kg_loss(trainer, use_kg, {i: log_.items[i].text() for i in item_ids if i in log_.items},
                       alpha=cfg.kg_alpha)
    return trainer


class _Replay:
    """The test-then-train loop of one evaluation and what it records.

    Per event: the LM schedule (:meth:`_maybe_update_lm`), the test step on a positive for an item new to
    the user (:meth:`_test`: rank, and at an evaluation point measure every system), the LM training
    example (:meth:`_collect_lm_example`), then the learning step (:meth:`_learn`). The ranking system is
    only reached through :meth:`_rank`, :meth:`_learn`, :meth:`_refresh_lm` and the item statistics
    read in :meth:`_record_evaluation`.
    """

    def __init__(self, system: DriftrecSystem, cfg: EvalConfig, log_: RatingLog, index: dict[str, int], n_warm: int,
                 *, trainer=None, diagnose: bool = False) -> None:
        self.system = system
        self.cfg = cfg
        self.log_ = log_
        self.index = index
        self.n_warm = n_warm
        self.trainer = trainer if cfg.use_lm else None  # the adapter trainer when the LM takes part
        self.diagnose = diagnose
        self.baselines = {"popularity": system.pop, "decayed_popularity": system.dpop, "itemknn": system.knn}
        self.names = [SYSTEM, *BASELINES]
        self.hr: dict[str, list[float]] = {n: [] for n in self.names}
        self.ndcg: dict[str, list[float]] = {n: [] for n in self.names}
        self.eval_ts: list[float] = []
        # per evaluation: the target's positives before this event (cold when < cfg.cold_threshold), its
        # interactions before it, and how many of driftrec's top-k had no interaction at all yet
        self.eval_prior_pos: list[int] = []
        self.eval_prior_int: list[int] = []
        self.top_unseen: list[int] = []
        self.lm_updates: list[dict] = []
        self.pending: list = []
        self.positives_seen = 0
        self.last_update = 0
        self.drift_events: list[dict] = []
        self.feature_hr: dict[str, list[float]] = {}
        system.corrector.on_drift(lambda ev: self.drift_events.append({"update": ev.update, "count": ev.count}))

    @property
    def lm_enabled(self) -> bool:
        return self.trainer is not None

    # ------------------------------------------------------------------------------ the loop

    def run(self, events: Sequence, *, progress: bool) -> None:
        """Replay ``events`` in order, test-then-train, with a progress bar."""
        from tqdm.auto import tqdm

        bar = tqdm(total=len(events), desc="prequential-v1", unit="ev", disable=not progress, mininterval=2.0,
                   file=sys.stderr)
        for p, e in enumerate(events):
            self._maybe_update_lm(p)
            positive = e.rating >= self.cfg.positive_threshold
            ranked = self._test(p, e, positive)
            self._collect_lm_example(e, positive)
            self._learn(e, ranked)
            if progress and p % 2000 == 0:
                self._show_progress(bar)
            bar.update(1)
        bar.close()

    def _show_progress(self, bar) -> None:
        """The running HR of driftrec and item-kNN on the progress bar."""
        hr, evaluated = self.hr, bool(self.eval_ts)
        bar.set_postfix(evals=len(self.eval_ts), hr=f"{np.mean(hr[SYSTEM]) if evaluated else 0:.3f}",
                        knn=f"{np.mean(hr['itemknn']) if evaluated else 0:.3f}", refresh=False)

    # ---------------------------------------------------------------------------- LM schedule

    def _maybe_update_lm(self, p: int) -> None:
        """Before event ``p``: the initial adapter training at the end of the warm-up, an incremental
        update every ``cfg.lm_update_every`` events (when examples are pending), else the periodic
        re-encoding of users whose history grew."""
        if not self.lm_enabled:
            return
        cfg, n_warm = self.cfg, self.n_warm
        if p == n_warm and n_warm > 0:
            self._lm_update(True, p)
        elif p > n_warm and p - self.last_update >= cfg.lm_update_every and self.pending:
            self._lm_update(False, p)
        elif p > 0 and p % cfg.user_refresh == 0:
            self.system.refresh_all_users(changed_only=True)

    def _lm_update(self, initial: bool, position: int) -> None:
        """Train the adapter on the pending examples, refresh the system's LM vectors, record the stats."""
        steps = self.cfg.lm_initial_steps if initial else self.cfg.lm_update_steps
        stats = self.trainer.update(self.pending, max_steps=steps)
        self.pending = []
        self.last_update = position
        self._refresh_lm()
        d = stats.as_dict()
        d.update(position=position, initial=initial)
        if getattr(self.trainer, "last_kg_loss", None) is not None:
            d["kg_loss"] = self.trainer.last_kg_loss
        self.lm_updates.append(d)

    def _refresh_lm(self) -> None:
        """Recompute the system's item and user vectors after an adapter update."""
        self.system.refresh_item_vectors()
        self.system.refresh_all_users()

    def _collect_lm_example(self, e, positive: bool) -> None:
        """Queue a positive (for a user with a history) as a training example for the next adapter update."""
        if self.lm_enabled and positive and self.system.hist.get(e.user):
            from driftrec.model.training.trainer import TrainingExample

            self.pending.append(TrainingExample(self.system.user_text(e.user), self.log_.items[e.item].text()))

    # ----------------------------------------------------------------------------- test step

    def _test(self, p: int, e, positive: bool) -> np.ndarray | None:
        """The test step on a positive for an item new to the user: rank, and at an evaluation point (after
        the warm-up, every ``cfg.every``-th such positive) measure every system. Returns the system's top
        ranked items (its hard negatives for learning), None when the event is not tested."""
        u, i = e.user, self.index[e.item]
        if not positive or i in self.system.seen.get(u, ()):
            return None
        allowed = self._allowed(u)
        s, masked, ranked = self._rank(u, e.timestamp, allowed)
        if p >= self.n_warm:
            self.positives_seen += 1
            if (self.positives_seen - 1) % self.cfg.every == 0:
                self._record_evaluation(u, i, e.timestamp, allowed, s, masked)
        return ranked

    def _allowed(self, user: str) -> np.ndarray:
        """The mask of items ``user`` may be recommended: those not interacted with yet."""
        allowed = np.ones(len(self.system.item_ids), dtype=bool)
        seen = self.system.seen.get(user)
        if seen:
            allowed[list(seen)] = False
        return allowed

    def _rank(self, user: str, ts: float, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The system's scores of all items, the scores with disallowed items at -inf, and its (up to) 50
        highest ranked allowed items."""
        s = self.system.score_all(user, ts)
        # The items the system ranks highest are the corrector's hard negatives.
        masked = np.where(allowed, s, -np.inf)
        top = np.argpartition(-masked, 50)[:50] if len(masked) > 50 else np.arange(len(masked))
        ranked = top[np.isfinite(masked[top])]
        return s, masked, ranked

    def _record_evaluation(self, u: str, i: int, ts: float, allowed: np.ndarray, s: np.ndarray,
                           masked: np.ndarray) -> None:
        """HR@k and NDCG@k of item ``i`` under the system and the baselines, the cold-item statistics,
        and (with ``diagnose``) each feature's HR alone."""
        cfg, system = self.cfg, self.system
        if self.diagnose:
            F = system.features(u, None, ts)
            for j, fname in enumerate(system.feature_names):
                self.feature_hr.setdefault(fname, []).append(rank_metrics(F[:, j], i, allowed, cfg.k)[0])
        h, g = rank_metrics(s, i, allowed, cfg.k)
        self.eval_prior_pos.append(int(system.n_pos[i]))
        self.eval_prior_int.append(int(system.n_int[i]))
        topk = np.argsort(-masked, kind="stable")[: cfg.k]
        self.top_unseen.append(int((system.n_int[topk] == 0).sum()))
        self.hr[SYSTEM].append(h)
        self.ndcg[SYSTEM].append(g)
        for name, src in self.baselines.items():
            h, g = rank_metrics(src.score_all(u, ts), i, allowed, cfg.k)
            self.hr[name].append(h)
            self.ndcg[name].append(g)
        self.eval_ts.append(ts)

    # ---------------------------------------------------------------------------- learn step

    def _learn(self, e, ranked: np.ndarray | None) -> None:
        """The learning step: the system learns from the event (with its hard negatives when tested)."""
        self.system.learn(e.user, e.item, e.rating, e.timestamp, ranked=ranked)


def _overall_results(replay: _Replay, cfg: EvalConfig) -> dict:
    """Mean HR@k and NDCG@k per system over all evaluations."""
    n_eval = len(replay.eval_ts)
    return {
        n: {
            f"hr@{cfg.k}": float(np.mean(replay.hr[n])) if n_eval else 0.0,
            f"ndcg@{cfg.k}": float(np.mean(replay.ndcg[n])) if n_eval else 0.0,
        }
        for n in replay.names
    }


def _window_results(replay: _Replay, cfg: EvalConfig) -> list[dict]:
    """The metrics per system in ``cfg.windows`` consecutive windows of evaluations (time order)."""
    hr, ndcg, eval_ts = replay.hr, replay.ndcg, replay.eval_ts
    n_eval = len(eval_ts)
    windows = []
    if n_eval:
        bounds = np.linspace(0, n_eval, min(cfg.windows, n_eval) + 1).astype(int)
        for w, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            if b <= a:
                continue
            windows.append({
                "window": w,
                "evaluations": int(b - a),
                "start_ts": float(eval_ts[a]),
                "end_ts": float(eval_ts[b - 1]),
                **{n: {f"hr@{cfg.k}": float(np.mean(hr[n][a:b])), f"ndcg@{cfg.k}": float(np.mean(ndcg[n][a:b]))}
                   for n in replay.names},
            })
    return windows


def _assemble_result(replay: _Replay, log_: RatingLog, cfg: EvalConfig, *, kg_info: dict | None, n_events: int,
                     n_warm: int, item_ids: list[str], elapsed: float, diagnose: bool) -> dict:
    """The result dict of :func:`evaluate`: metrics overall, cold and per window, the config and the
    system's state (corrector, drift detections, LM updates)."""
    system, lm_updates = replay.system, replay.lm_updates
    return {
        "protocol": PROTOCOL,
        "evaluations": len(replay.eval_ts),
        "results": _overall_results(replay, cfg),
        "cold": cold_results(replay.hr, replay.ndcg, replay.eval_prior_pos, replay.eval_prior_int,
                             replay.top_unseen, cfg),
        **({"kg": kg_info} if kg_info is not None else {}),
        "windows": _window_results(replay, cfg),
        "config": {
            **cfg.as_dict(),
            "data": log_.source,
            "format": log_.format,
            "events": n_events,
            "warmup_events": n_warm,
            "items": len(item_ids),
            "users": len(system.hist),
        },
        "system": {
            "features": list(system.feature_names),
            "corrector_weights": system.corrector.weights(),
            "corrector_updates": system.corrector.n_learned,
            "drift_count": system.corrector.drift_count,
            "drift_events": replay.drift_events[:100],
            "lm": {
                "enabled": replay.lm_enabled,
                "updates": lm_updates,
                "user_encodes": system.user_encodes,
                "seconds": system.lm_seconds + sum(u["seconds"] for u in lm_updates),
            },
        },
        "elapsed_s": elapsed,
        **({"feature_hr": {f: float(np.mean(v)) for f, v in replay.feature_hr.items()}} if diagnose else {}),
    }


def cold_results(hr: dict[str, list[float]], ndcg: dict[str, list[float]], prior_pos: Sequence[int],
                 prior_int: Sequence[int], top_unseen: Sequence[int], cfg: EvalConfig) -> dict:
    """The metrics restricted to cold evaluations: positives whose item had fewer than
    ``cfg.cold_threshold`` positives before the event (in replay order, warm-up included).

    Also: how many cold evaluations had an item with no interaction at all yet (``evaluations_new_item``,
    with driftrec's metrics on them under ``new_item``), and the mean number of such never-interacted
    items in driftrec's top-k over all evaluations (``driftrec_topk_new_items``), which shows whether
    the system ranks items it knows only from their text (and KG) at all."""
    k = cfg.k
    pos = np.asarray(prior_pos, dtype=np.int64)
    cold = pos < cfg.cold_threshold
    new = cold & (np.asarray(prior_int, dtype=np.int64) == 0)

    def metrics(mask: np.ndarray, n: str) -> dict:
        v_hr, v_ndcg = np.asarray(hr[n], dtype=np.float64), np.asarray(ndcg[n], dtype=np.float64)
        m = int(mask.sum())
        return {f"hr@{k}": float(v_hr[mask].mean()) if m else 0.0, f"ndcg@{k}": float(v_ndcg[mask].mean()) if m else 0.0}

    out: dict = {
        "threshold": cfg.cold_threshold,
        "evaluations": int(cold.sum()),
        "evaluations_new_item": int(new.sum()),
    }
    for n in hr:
        out[n] = metrics(cold, n)
    out["new_item"] = {SYSTEM: metrics(new, SYSTEM), "itemknn": metrics(new, "itemknn")}
    out["driftrec_topk_new_items"] = float(np.mean(top_unseen)) if len(top_unseen) else 0.0
    return out


# ------------------------------------------------------------------------------------ report


def write_report(result: dict, out_dir: str | Path) -> Path:
    """Markdown summary + PNG of HR@10 per window, system vs baselines. Returns the Markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = result["config"].get("k", 10)
    key = f"hr@{k}"
    png = out / "hr_over_time.png"
    names = list(result["results"])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        xs = [w["window"] + 1 for w in result["windows"]]
        for n in names:
            ax.plot(xs, [w[n][key] for w in result["windows"]], marker="o", label=n, lw=2.5 if n == SYSTEM else 1.2)
        ax.set_xlabel("evaluation window (time order)")
        ax.set_ylabel(f"HR@{k}")
        ax.set_title(f"{PROTOCOL}: HR@{k} over time")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)
    except Exception as exc:  # the Markdown is still useful without the plot
        log.warning("could not draw the plot: %s", exc)
    cfg = result["config"]
    lines = [
        f"# driftrec evaluation ({PROTOCOL})",
        "",
        f"Data: `{cfg.get('data')}` ({cfg.get('format')}), {cfg.get('events')} events, "
        f"{cfg.get('warmup_events')} warm-up, {result['evaluations']} evaluations (every {cfg.get('every')}-th positive), "
        f"{result['elapsed_s']:.0f} s.",
        "",
        f"| system | HR@{k} | NDCG@{k} | HR vs item-kNN |",
        "|---|---:|---:|---:|",
    ]
    base = result["results"].get("itemknn", {}).get(key, 0.0) or float("nan")
    for n in names:
        r = result["results"][n]
        lines.append(f"| {n} | {r[key]:.4f} | {r[f'ndcg@{k}']:.4f} | {r[key] / base:.2f}x |")
    lines += ["", f"![HR@{k} over time]({png.name})", "", "## Windows", "",
              "| window | evals | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for w in result["windows"]:
        lines.append(f"| {w['window'] + 1} | {w['evaluations']} | " + " | ".join(f"{w[n][key]:.3f}" for n in names) + " |")
    sysinfo = result.get("system", {})
    if sysinfo:
        lm = sysinfo.get("lm", {})
        lines += ["", "## System", "", f"- corrector updates: {sysinfo.get('corrector_updates')}, "
                  f"drift detections: {sysinfo.get('drift_count')}",
                  f"- LM adapter updates: {len(lm.get('updates', []))}, user encodes: {lm.get('user_encodes')}, "
                  f"LM seconds: {lm.get('seconds', 0):.0f}"]
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    return md


# --------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="driftrec evaluate", description=f"offline evaluation, protocol {PROTOCOL}")
    p.add_argument("--data", required=True, help="folder with a MovieLens-format log")
    p.add_argument("--format", default="auto", choices=["ml-100k", "ml-latest", "auto"])
    p.add_argument("--every", type=int, default=10, help="evaluate every K-th positive (default 10)")
    p.add_argument("--json", dest="json_path", help="write the results as JSON here")
    p.add_argument("--report", help="write report.md + hr_over_time.png into this folder")
    p.add_argument("--limit", type=int, help="use only the first N events (time order)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-lm", action="store_true", help="skip the language model (fast tuning runs)")
    p.add_argument("--lm-update-every", type=int, default=EvalConfig.lm_update_every)
    p.add_argument("--lm-initial-steps", type=int, default=EvalConfig.lm_initial_steps)
    p.add_argument("--lm-update-steps", type=int, default=EvalConfig.lm_update_steps)
    p.add_argument("--half-life-days", type=float, default=EvalConfig.half_life_s / 86400.0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--cold-threshold", type=int, default=EvalConfig.cold_threshold,
                   help="an evaluated item is cold when it had fewer positives before the event (default 5)")
    p.add_argument("--kg", help="knowledge graph: a folder with *.kg [+ *.link] (RecBole atomic or plain TSV) "
                   "or a triples file")
    p.add_argument("--kg-link", help="item -> entity link file, when --kg is a triples file")
    p.add_argument("--kg-format", default="auto", choices=["auto", "recbole", "tsv"])
    p.add_argument("--kg-alpha", type=float, default=EvalConfig.kg_alpha,
                   help="weight of the TransE KG loss in the adapter training, L = L_rec + alpha * L_KG (default 0)")
    p.add_argument("--kg-gate", default="auto", choices=["auto", "force"],
                   help="auto: use the KG only if it beats its shuffled-link control on the warm-up window; "
                   "force: always use it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def evaluate_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.every < 1:
        print("--every must be >= 1", file=sys.stderr)
        return 2
    if args.kg_alpha < 0:
        print("--kg-alpha must be >= 0", file=sys.stderr)
        return 2
    if args.kg_link and not args.kg:
        print("--kg-link needs --kg", file=sys.stderr)
        return 2
    from driftrec.model.evaluation.movielens import DataError
    from driftrec.model.knowledge.graph import KGError

    try:
        log_ = load(args.data, args.format)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = EvalConfig(
        every=args.every,
        limit=args.limit,
        seed=args.seed,
        use_lm=not args.no_lm,
        lm_update_every=args.lm_update_every,
        lm_initial_steps=args.lm_initial_steps,
        lm_update_steps=args.lm_update_steps,
        half_life_s=args.half_life_days * 86400.0,
        threads=args.threads,
        cold_threshold=args.cold_threshold,
        kg=args.kg,
        kg_link=args.kg_link,
        kg_format=args.kg_format,
        kg_alpha=args.kg_alpha,
        kg_gate=args.kg_gate,
    )
    try:
        result = evaluate(log_, cfg, progress=not args.quiet)
    except KGError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    k = cfg.k
    cold = result["cold"]
    print(f"{PROTOCOL}: {result['evaluations']} evaluations in {result['elapsed_s']:.0f}s "
          f"({cold['evaluations']} cold: item with < {cold['threshold']} prior positives)")
    if "kg" in result:
        g = result["kg"]["gate"]
        gk = f"hr@{g['k']}"
        print(f"knowledge graph: {'used' if result['kg']['used'] else 'not used'} (gate {g['mode']}, "
              f"{'open' if g['open'] else 'closed'}: warm-up HR@{g['k']} {g[gk]:.4f} vs "
              f"{g[gk + '_shuffled_links']:.4f} with shuffled links, z={g['z']:.2f}), "
              f"alpha {result['kg']['alpha_effective']}")
    print(f"{'system':<20} {'HR@' + str(k):>8} {'NDCG@' + str(k):>9} {'cold HR':>8} {'cold NDCG':>9}")
    for name, r in result["results"].items():
        c = cold[name]
        print(f"{name:<20} {r[f'hr@{k}']:>8.4f} {r[f'ndcg@{k}']:>9.4f} {c[f'hr@{k}']:>8.4f} {c[f'ndcg@{k}']:>9.4f}")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    if args.report:
        md = write_report(result, args.report)
        print(f"report: {md}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(evaluate_main())
