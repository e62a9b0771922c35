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
import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from driftrec.model.ranking.metrics import rank_metrics
from driftrec.model.evaluation.movielens import RatingLog, load

log = logging.getLogger(__name__)

PROTOCOL = "prequential-v1"
BASELINES = ("popularity", "decayed_popularity", "itemknn")
MODEL_BASELINES = ("sasrec", "lm_only")
ABLATIONS = ("lm", "kg")
SYSTEM = "driftrec"
PREFETCH_BLOCK = 256  # events whose knowledge-model forwards are batched ahead (see RankingPolicy.prefetch)

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
    hard_pool_every: int = 1
    learn_fraction: float = 1.0
    new_item_position: int = 0  # ranking.new_item_position (0 = off)
    new_item_model_rank: int = 3
    use_lm: bool = True  # the knowledge model (LM text + graph) takes part; False = collaborative features only
    # events between warm-started retrainings of the sequence models; 5,000: at 10,000 our SASRec stayed
    # under the HR@10 0.18 a fair opponent reaches on ML-100K (docs/knowledge_model.md, "Retraining period")
    lm_update_every: int = 5000
    model: dict = field(default_factory=dict)  # knowledge-model training overrides (see model.knowledge.seqrec)
    corrector_lr: float = 0.005
    cold_threshold: int = 5
    kg: str | None = None  # knowledge graph: a folder (*.kg [+ *.link]) or a triples file
    kg_link: str | None = None  # link file when kg is a triples file
    kg_format: str = "auto"
    kg_alpha: float = 0.1  # weight of the TransE term in the knowledge model's objective, L = L_rec + alpha * L_KG
    kg_gate: str = "auto"  # "auto": the warm-up validation decides whether the KG is used; "force": always
    kg_gate_z: float = 2.0
    kg_gate_k: int = 50
    kg_gate_max_evals: int = 3000
    knn_user_decay: float = 0.9
    knn_pair_decay: float = 0.9
    knn_max_history: int = 60
    threads: int = 1  # torch CPU threads; one is fastest for the per-event one-user forwards (0 = torch default)
    fit_threads: int = 0  # torch CPU threads while the sequence models train (0 = every core of the machine)
    ablate: tuple[str, ...] = ("lm", "kg")  # the full system without each of these, on the same points
    baselines: tuple[str, ...] = ("sasrec", "lm_only")  # besides popularity, decayed popularity, item-kNN

    def __post_init__(self) -> None:
        self.ablate, self.baselines = tuple(self.ablate), tuple(self.baselines)
        if self.threads < 0 or self.fit_threads < 0:
            raise ValueError("threads and fit_threads must be >= 0 (0 = torch default / every core)")
        bad = set(self.ablate) - set(ABLATIONS)
        if bad:
            raise ValueError(f"unknown ablation(s) {sorted(bad)} (choose from {', '.join(ABLATIONS)})")
        bad = set(self.baselines) - set(MODEL_BASELINES)
        if bad:
            raise ValueError(f"unknown baseline(s) {sorted(bad)} (choose from {', '.join(MODEL_BASELINES)})")

    def as_dict(self) -> dict:
        return asdict(self)

    def policy_config(self):
        from driftrec.model.ranking.policy import PolicyConfig

        # the worker builds its config through the same function (settings.ranking; defaults shared)
        return PolicyConfig.from_settings(
            positive_threshold=self.positive_threshold, half_life_s=self.half_life_s,
            knn_user_decay=self.knn_user_decay, knn_pair_decay=self.knn_pair_decay,
            knn_max_history=self.knn_max_history, negatives=self.negatives,
            hard_pool_every=self.hard_pool_every, learn_fraction=self.learn_fraction,
            corrector_lr=self.corrector_lr, cold_threshold=self.cold_threshold,
            new_item_position=self.new_item_position, new_item_model_rank=self.new_item_model_rank, seed=self.seed)


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


def evaluate(log_: RatingLog, cfg: EvalConfig, *, progress: bool = True, diagnose: bool = False, kg=None,
             arms: dict | None = None, on_evaluation=None) -> dict:
    """Run protocol prequential-v1 over ``log_``; returns the result dict (see module docstring).

    ``kg`` (a :class:`driftrec.model.knowledge.graph.KnowledgeGraph`, else loaded from ``cfg.kg``): the
    graph joins the ranking policy (features ``kg``/``kg_cold``) and the knowledge model (entity embeddings
    trained with ``L_rec + kg_alpha * L_KG``) when the warm-up gate (:func:`kg_gate`) opens, or with
    ``cfg.kg_gate == "force"``. ``arms``: the systems to measure (default :func:`build_arms`).
    ``on_evaluation``: called at every evaluation point with ``{"position", "user", "item", "ts", "top"}``
    (``top``: driftrec's top-k item ids, best first) - what ``--through-stream`` compares served lists with."""
    t_start = time.perf_counter()
    _seed_everything(cfg.seed)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    events, n_warm, item_ids, index = _prepare_events(log_, cfg)
    if kg is None and cfg.kg:
        kg = load_eval_kg(cfg, log_)
    use_kg, kg_info = _gate_knowledge_graph(kg, events[:n_warm], item_ids, cfg)
    if arms is None:
        arms = build_arms(log_, cfg, item_ids, use_kg)
    replay = _Replay(arms, cfg, index, n_warm, diagnose=diagnose)
    replay.on_evaluation = on_evaluation
    replay.run(events, progress=progress)
    return _assemble_result(replay, log_, cfg, kg_info=kg_info, n_events=len(events), n_warm=n_warm,
                            item_ids=item_ids, elapsed=time.perf_counter() - t_start, diagnose=diagnose)


def _seed_everything(seed: int) -> None:
    """Seed Python's and NumPy's global random generators (the models and the policy seed their own)."""
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


def build_arms(log_: RatingLog, cfg: EvalConfig, item_ids: list[str], kg) -> dict:
    """The systems measured on the same points: ``driftrec`` (the ranking policy with the knowledge
    model), its ablations (``no_lm``: the knowledge model without the LM's text; ``no_kg``: policy and
    model without the graph - only when a graph is used), ``lm_only`` (the knowledge model's own ranking),
    ``sasrec``, and the policy's own popularity, decayed popularity and item-kNN sources."""
    from driftrec.model.evaluation.arms import ModelArm, PolicyArm, SourceArm
    from driftrec.model.ranking.policy import RankingPolicy

    from driftrec.model.knowledge.candidates import KGCandidates

    pcfg = cfg.policy_config()
    items = log_.items

    def graph_source():
        return None if kg is None else KGCandidates(kg, positive_threshold=cfg.positive_threshold)

    def knowledge(text: bool, graph) -> object | None:
        if not cfg.use_lm:
            return None
        from driftrec.model.knowledge.seqrec import KnowledgeTrainer

        return KnowledgeTrainer(items, item_ids, text=text, kg=graph, kg_alpha=cfg.kg_alpha, seed=cfg.seed,
                                **cfg.model)

    full = PolicyArm(SYSTEM, RankingPolicy(pcfg, items, item_ids, kg=graph_source()), knowledge(True, kg))
    state = full.policy.state  # the ablations share the full system's sources (same events, computed once)
    arms: dict = {SYSTEM: full}
    if cfg.use_lm and "lm" in cfg.ablate:
        arms["no_lm"] = PolicyArm("no_lm", RankingPolicy(pcfg, items, item_ids, use_text=False, state=state),
                                  knowledge(False, kg))
    if kg is not None and "kg" in cfg.ablate:
        arms["no_kg"] = PolicyArm("no_kg", RankingPolicy(pcfg, items, item_ids, use_kg=False, state=state),
                                  knowledge(True, None))
    if cfg.use_lm and "lm_only" in cfg.baselines:
        arms["lm_only"] = ModelArm("lm_only", item_ids, shared=lambda: full.policy.model)
    if "sasrec" in cfg.baselines:
        from driftrec.model.evaluation.sasrec import SASRecTrainer

        arms["sasrec"] = ModelArm("sasrec", item_ids, SASRecTrainer(item_ids, seed=cfg.seed))
    policy = full.policy
    for name, src in (("popularity", policy.pop), ("decayed_popularity", policy.dpop), ("itemknn", policy.knn)):
        arms[name] = SourceArm(name, src)
    return arms


class _Replay:
    """The test-then-train loop of one evaluation and what it records.

    Per event: the periodic (re)training of the sequence models (:meth:`_maybe_refit`), the test step on
    a positive for an item new to the user (:meth:`_test`: every policy ranks - its own top items are its
    hard negatives - and at an evaluation point every arm is measured), then every arm learns
    (:meth:`_learn`)."""

    def __init__(self, arms: dict, cfg: EvalConfig, index: dict[str, int], n_warm: int, *,
                 diagnose: bool = False) -> None:
        self.arms = arms
        self.main = arms[SYSTEM]
        self.policy = self.main.policy  # its statistics say which evaluated items are cold
        self.cfg = cfg
        self.index = index
        self.n_warm = n_warm
        self.diagnose = diagnose
        self.names = list(arms)
        self.hr: dict[str, list[float]] = {n: [] for n in self.names}
        self.ndcg: dict[str, list[float]] = {n: [] for n in self.names}
        self.eval_ts: list[float] = []
        # per evaluation: the target's positives before this event (cold when < cfg.cold_threshold), its
        # interactions before it, and how many of driftrec's top-k had no interaction at all yet
        self.eval_prior_pos: list[int] = []
        self.eval_prior_int: list[int] = []
        self.top_unseen: list[int] = []
        self.fits: list[dict] = []
        self.positives_seen = 0
        self.last_fit: int | None = None
        self.drift_events: list[dict] = []
        self.feature_hr: dict[str, list[float]] = {}
        self.seconds: dict[str, float] = {n: 0.0 for n in self.names}
        self.policy.corrector.on_drift(lambda ev: self.drift_events.append({"update": ev.update, "count": ev.count}))
        self.on_evaluation = None  # optional callback per evaluation point (see evaluate)
        self._position = 0
        owners_last = lambda kv: bool(getattr(getattr(kv[1], "policy", None), "owns_state", False))  # noqa: E731
        self._learning_order = sorted(arms.items(), key=owners_last)

    # ------------------------------------------------------------------------------ the loop

    def run(self, events: Sequence, *, progress: bool) -> None:
        """Replay ``events`` in order, test-then-train, with a progress bar."""
        from tqdm.auto import tqdm

        bar = tqdm(total=len(events), desc="prequential-v1", unit="ev", disable=not progress, mininterval=2.0,
                   file=sys.stderr)
        block = 0
        for p, e in enumerate(events):
            self._position = p
            if self._maybe_refit(p) or p >= block:  # batch the knowledge models' forwards of the next events
                block = p + PREFETCH_BLOCK
                ahead = [(x.user, x.item, x.rating, x.timestamp) for x in events[p:block]]
                for arm in self.arms.values():
                    arm.prefetch(ahead)
            positive = e.rating >= self.cfg.positive_threshold
            scores = self._test(p, e, positive)
            self._learn(e, scores)
            if progress and p % 2000 == 0:
                self._show_progress(bar)
            bar.update(1)
        bar.close()

    def _show_progress(self, bar) -> None:
        """The running HR of driftrec and item-kNN on the progress bar."""
        hr, evaluated = self.hr, bool(self.eval_ts)
        bar.set_postfix(evals=len(self.eval_ts), hr=f"{np.mean(hr[SYSTEM]) if evaluated else 0:.3f}",
                        knn=f"{np.mean(hr['itemknn']) if evaluated else 0:.3f}", refresh=False)

    # ------------------------------------------------------------------------------ training

    def _maybe_refit(self, p: int) -> bool:
        """Before event ``p``: the first training of the sequence models at the end of the warm-up, then a
        warm-started retraining every ``cfg.lm_update_every`` events, each on the histories so far."""
        if self.n_warm <= 0 or p < self.n_warm:
            return False
        if self.last_fit is None or p - self.last_fit >= self.cfg.lm_update_every:
            initial = self.last_fit is None
            histories = list(self.policy.histories())
            with _torch_threads(self.cfg.fit_threads or os.cpu_count() or 1):
                for name, arm in self.arms.items():
                    t0 = time.perf_counter()
                    stats = arm.refit(histories, initial=initial)
                    if stats is not None:
                        self.fits.append({"arm": name, "position": p, "initial": initial, **stats})
                    self.seconds[name] += time.perf_counter() - t0
            self.last_fit = p
            return True
        return False

    # ----------------------------------------------------------------------------- test step

    def _test(self, p: int, e, positive: bool) -> dict[str, np.ndarray]:
        """The test step on a positive for an item new to the user: every policy arm ranks (its hard
        negatives for learning), and at an evaluation point (after the warm-up, every ``cfg.every``-th
        such positive) every arm is measured. Returns the scores computed, by arm."""
        u, i = e.user, self.index[e.item]
        if not positive or i in self.policy.seen.get(u, ()):
            return {}
        evaluate = False
        if p >= self.n_warm:
            self.positives_seen += 1
            evaluate = (self.positives_seen - 1) % self.cfg.every == 0
        scores = {}
        for name, arm in self.arms.items():
            if evaluate:
                t0 = time.perf_counter()
                scores[name] = arm.scores(u, e.timestamp)
                self.seconds[name] += time.perf_counter() - t0
        if evaluate:
            self._record_evaluation(u, i, e.timestamp, self.policy.allowed(u), scores)
        return scores

    def _record_evaluation(self, u: str, i: int, ts: float, allowed: np.ndarray, scores: dict[str, np.ndarray]) -> None:
        """HR@k and NDCG@k of item ``i`` under every arm, the cold-item statistics, and (with
        ``diagnose``) each feature's HR alone."""
        cfg, policy = self.cfg, self.policy
        if self.diagnose:
            F = policy.features(u, None, ts)
            for j, fname in enumerate(policy.feature_names):
                self.feature_hr.setdefault(fname, []).append(rank_metrics(F[:, j], i, allowed, cfg.k)[0])
        self.eval_prior_pos.append(int(policy.n_pos[i]))
        self.eval_prior_int.append(int(policy.n_int[i]))
        topk = policy.top(scores[SYSTEM], allowed, cfg.k)
        self.top_unseen.append(int((policy.n_int[topk] == 0).sum()))
        if self.on_evaluation is not None:
            self.on_evaluation({"position": self._position, "user": u, "item": policy.item_ids[i], "ts": ts,
                                "top": [policy.item_ids[j] for j in topk]})
        for name, s in scores.items():
            h, g = rank_metrics(s, i, allowed, cfg.k)
            self.hr[name].append(h)
            self.ndcg[name].append(g)
        self.eval_ts.append(ts)

    # ---------------------------------------------------------------------------- learn step

    def _learn(self, e, scores: dict[str, np.ndarray]) -> None:
        """Every arm learns from the event (a policy with its own scores at a tested positive); the arm
        whose policy owns the shared state goes last, so every policy learns from the state before the
        event."""
        for name, arm in self._learning_order:
            t0 = time.perf_counter()
            arm.observe(e.user, e.item, e.rating, e.timestamp, scores.get(name))
            self.seconds[name] += time.perf_counter() - t0


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run the block with ``n`` torch CPU threads (training batches parallelise well; the per-event
    one-user forwards of the test step do not, so the replay goes back to ``cfg.threads`` after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _metrics(hr: Sequence[float], ndcg: Sequence[float], mask: np.ndarray | None, k: int) -> dict:
    v_hr, v_ndcg = np.asarray(hr, dtype=np.float64), np.asarray(ndcg, dtype=np.float64)
    if mask is not None:
        v_hr, v_ndcg = v_hr[mask], v_ndcg[mask]
    n = len(v_hr)
    return {f"hr@{k}": float(v_hr.mean()) if n else 0.0, f"ndcg@{k}": float(v_ndcg.mean()) if n else 0.0}


def _arm_results(replay: _Replay, cfg: EvalConfig, name: str) -> dict:
    """One arm's HR@k / NDCG@k over all evaluations, and on the cold ones (the target had fewer than
    ``cfg.cold_threshold`` positives before), with the never-interacted ones among them."""
    k = cfg.k
    pos = np.asarray(replay.eval_prior_pos, dtype=np.int64)
    cold = pos < cfg.cold_threshold
    never = cold & (np.asarray(replay.eval_prior_int, dtype=np.int64) == 0)
    hr, ndcg = replay.hr[name], replay.ndcg[name]
    never_m = _metrics(hr, ndcg, never, k)
    return {
        **_metrics(hr, ndcg, None, k),
        "cold": {**_metrics(hr, ndcg, cold, k), "count": int(cold.sum()),
                 "never_interacted": {f"hr@{k}": never_m[f"hr@{k}"], "count": int(never.sum())}},
    }


def _overall_results(replay: _Replay, cfg: EvalConfig) -> tuple[dict, dict]:
    """Per arm: ``results`` (the system and the baselines) and ``ablations`` (the system without a part)."""
    results, ablations = {}, {}
    for name in replay.names:
        (ablations if name.startswith("no_") else results)[name] = _arm_results(replay, cfg, name)
    return results, ablations


def _window_results(replay: _Replay, cfg: EvalConfig) -> list[dict]:
    """The metrics per arm in ``cfg.windows`` consecutive windows of evaluations (time order)."""
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
    """The result dict of :func:`evaluate`: metrics overall (with their cold blocks), the ablations, the
    cold summary, per window, the config and the system's state (corrector, drift, model trainings)."""
    results, ablations = _overall_results(replay, cfg)
    info = replay.main.info()
    return {
        "protocol": PROTOCOL,
        "evaluations": len(replay.eval_ts),
        "results": results,
        "ablations": ablations,
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
            "users": len(replay.policy.hist),
        },
        "system": {
            **{k: v for k, v in info.items() if k != "model"},
            "drift_events": replay.drift_events[:100],
            "lm": {"enabled": cfg.use_lm, "fits": [f for f in replay.fits if f["arm"] == SYSTEM]},
        },
        "fits": replay.fits,
        "seconds": {n: round(s, 2) for n, s in replay.seconds.items()},
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
    p.add_argument("--no-lm", action="store_true",
                   help="skip the knowledge model (LM text + graph embeddings): collaborative features only")
    p.add_argument("--lm-update-every", "--model-update-every", dest="lm_update_every", type=int,
                   default=EvalConfig.lm_update_every,
                   help="events between warm-started retrainings of the knowledge model and SASRec "
                        f"(default {EvalConfig.lm_update_every})")
    p.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE",
                   help="knowledge-model training option (repeatable), e.g. --model-set epochs=3")
    p.add_argument("--ablate", default=",".join(EvalConfig.ablate),
                   help="comma list of parts to measure the system without, on the same points: "
                        f"{', '.join(ABLATIONS)} ('' for none; kg only with --kg)")
    p.add_argument("--baselines", default=",".join(EvalConfig.baselines),
                   help=f"comma list of model baselines: {', '.join(MODEL_BASELINES)} ('' for none); popularity, "
                        "decayed popularity and item-kNN are always measured")
    p.add_argument("--half-life-days", type=float, default=EvalConfig.half_life_s / 86400.0)
    p.add_argument("--hard-pool-every", type=int, default=EvalConfig.hard_pool_every,
                   help="ranking.hard_pool_every: rank the catalogue for hard negatives at every n-th learning "
                        "positive of a user (the worker's setting of the same name)")
    p.add_argument("--learn-fraction", type=float, default=EvalConfig.learn_fraction,
                   help="ranking.learn_fraction: the share of positives the fusion learns from")
    p.add_argument("--new-item-position", type=int, default=EvalConfig.new_item_position,
                   help="ranking.new_item_position: where the knowledge model's best never-interacted item enters "
                        "a user's ranking (1 = first; 0 = off, the default)")
    p.add_argument("--new-item-model-rank", type=int, default=EvalConfig.new_item_model_rank,
                   help="ranking.new_item_model_rank: only when the model ranks that item within its own top N "
                        "(default 3)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the per-event one-user forwards took 2.3 ms on two threads "
                        "of a busy 2-core machine vs 0.5 ms on one; about equal when idle; 0 = torch default)")
    p.add_argument("--fit-threads", type=int, default=0,
                   help="torch CPU threads while the sequence models train (default 0: every core)")
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
    p.add_argument("--through-stream", action="store_true",
                   help="also run the log through an embedded broker and a real worker (ranking.engine=policy) "
                        "with the knowledge model trained on the warm-up, and report the served lists' HR/NDCG "
                        "next to the replay's on the same points (driftrec.through_stream; use --limit)")
    return p


def _model_options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--model-set wants KEY=VALUE, not {pair!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def evaluate_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.through_stream:
        print("--through-stream runs through `driftrec evaluate` (it starts a broker and a worker)", file=sys.stderr)
        return 2
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

    try:
        log_ = load(args.data, args.format)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        cfg = _config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _run_and_print(args, log_, cfg)


def _config(args) -> EvalConfig:
    return EvalConfig(
        every=args.every,
        limit=args.limit,
        seed=args.seed,
        use_lm=not args.no_lm,
        lm_update_every=args.lm_update_every,
        model=_model_options(args.model_set),
        ablate=tuple(a for a in args.ablate.split(",") if a),
        baselines=tuple(b for b in args.baselines.split(",") if b),
        half_life_s=args.half_life_days * 86400.0,
        hard_pool_every=args.hard_pool_every,
        learn_fraction=args.learn_fraction,
        new_item_position=args.new_item_position,
        new_item_model_rank=args.new_item_model_rank,
        threads=args.threads,
        fit_threads=args.fit_threads,
        cold_threshold=args.cold_threshold,
        kg=args.kg,
        kg_link=args.kg_link,
        kg_format=args.kg_format,
        kg_alpha=args.kg_alpha,
        kg_gate=args.kg_gate,
    )


def _run_and_print(args, log_, cfg: EvalConfig) -> int:
    from driftrec.model.knowledge.graph import KGError

    try:
        result = evaluate(log_, cfg, progress=not args.quiet)
    except (KGError, ValueError) as exc:
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
    print(f"{'system':<20} {'HR@' + str(k):>8} {'NDCG@' + str(k):>9} {'cold HR':>8} {'cold NDCG':>9} {'never HR':>9}")
    rows = list(result["results"].items()) + [(f"ablation {n}", r) for n, r in result["ablations"].items()]
    for name, r in rows:
        c = r["cold"]
        print(f"{name:<20} {r[f'hr@{k}']:>8.4f} {r[f'ndcg@{k}']:>9.4f} {c[f'hr@{k}']:>8.4f} {c[f'ndcg@{k}']:>9.4f} "
              f"{c['never_interacted'][f'hr@{k}']:>9.4f}")
    print(f"(cold: {cold['evaluations']} evaluations, {cold['evaluations_new_item']} of them on never-interacted items)")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    if args.report:
        md = write_report(result, args.report)
        print(f"report: {md}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(evaluate_main())
