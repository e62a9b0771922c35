"""``driftrec train`` for the ranking policy (``ranking.engine: policy``): the knowledge model's
periodic, warm-started updates, gated and published as verified checkpoints.

One run (:meth:`KnowledgeTrainingWorker.run_once`) over the newest interactions (the same window and
triggers as the LoRA trainer, :mod:`driftrec.model.training.worker`):

1. **Split**: the newest ``trainer.holdout_frac`` of the window's interactions are held out; each positive
   among them (a click, or a rating >= ``ranking.positive_threshold``) with some history before it is a
   gate case (history -> that item). Everything older (the context and the rest of the window) is the
   training set: per user, the interactions oldest first - what ``driftrec evaluate`` fits the same
   model on (:meth:`driftrec.model.ranking.policy.PolicyState.histories`).
2. **Train**: :meth:`KnowledgeTrainer.fit` continues from the trainer's weights (the first run of a
   process continues from the ACTIVE checkpoint when there is one; a catalogue that grew or changed its
   texts gets a new trainer warm-started from the old network, id rows matched by item id).
3. **Gate**: HR@10 / NDCG@10 of the candidate and of the serving (ACTIVE) model on the held-out cases,
   over the whole catalogue, the user's earlier items excluded (:class:`driftrec.model.training.gate.Gate`,
   ``trainer.gate_tolerance``).
4. **Publish** a promoted candidate (:func:`driftrec.model.knowledge.checkpoint.publish`: checkpoint
   folder ``k0001``, ``k0002``, ... then the ACTIVE pointer, atomically); the workers' ranking policy
   re-reads ACTIVE every ``ranking.model_watch_interval_s``, verifies the checkpoint and hot-swaps it
   (``streams/policy_ranker.py``). A rejected candidate is undone (weights and optimiser state).

The knowledge graph (``ranking.kg_path``) joins the objective (``L = L_rec + trainer.kg_alpha * L_KG``).
Nothing is announced on the adapters topic: the shared adapter directory is the hand-over, as for
the workers' checks of ACTIVE. Rollback on online HR@10 is the LoRA path's; here the gate is the guard.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from driftrec.core.contracts import Item
from driftrec.core.interactions import Interaction
from driftrec.model.knowledge.graph import load_catalogue_graph
from driftrec.model.knowledge.checkpoint import (CheckpointRejected, active_version, knowledge_root, load_knowledge,
                                                 next_version, publish)
from driftrec.model.training.examples import interaction_from
from driftrec.model.training.gate import Gate, OnlineMonitor
from driftrec.model.training.runs import RunResult, finish_run

log = logging.getLogger(__name__)

K = 10
MAX_CASES = 1000  # newest held-out positives the gate scores (each one ranks the whole catalogue)


def rank_metrics(model, cases: Sequence[tuple[list[str], str]], item_ids: Sequence[str], k: int = K) -> dict[str, float]:
    """HR@k / NDCG@k of ``model`` on ``cases`` (history, target): the whole catalogue ranked, the
    history's items excluded (as the served lists exclude what the user has seen); ties as everywhere
    (:func:`driftrec.model.ranking.metrics.rank_metrics`)."""
    from driftrec.model.ranking.metrics import rank_metrics as target_metrics

    index = {i: n for n, i in enumerate(item_ids)}
    hits = ndcg = 0.0
    n = 0
    for history, target in cases:
        t = index.get(target)
        if t is None:
            continue
        scores = np.asarray(model.score_items(history, [None] * len(history), item_ids), dtype=np.float64)
        allowed = np.ones(len(item_ids), dtype=bool)
        allowed[[index[i] for i in history if i in index and i != target]] = False
        h, g = target_metrics(scores, t, allowed, k)
        hits, ndcg, n = hits + h, ndcg + g, n + 1
    return {"hr@10": hits / n if n else float("nan"), "ndcg@10": ndcg / n if n else float("nan"), "n": n}


def _device(setting: str) -> str:
    """``model.device`` for training: a GPU when there is one (``auto``), else the CPU."""
    from driftrec.model.lm import choose_device

    return str(choose_device(setting).device)


class KnowledgeTrainingWorker:
    """Trainer + gate + publisher of the knowledge model for one domain (events are passed in)."""

    def __init__(self, settings, domain: str | None = None, *, items: Iterable[Item] = (), kg=None,
                 seed: int = 0, options: Mapping[str, Any] | None = None) -> None:
        self.settings = settings
        self.ts = settings.trainer
        self.domain = domain or settings.model.default_domain
        self.root = knowledge_root(settings.model.adapter_dir)
        self.positive_threshold = settings.ranking.positive_threshold
        self.seed = seed
        self.options = dict(options or {})
        self.model_path = settings.model.model_path or None
        self.device = _device(settings.model.device)
        self.items: dict[str, Item] = {}
        self._kg_path = settings.ranking.kg_path
        self.kg = kg
        self.trainer = None
        self._trained_on: dict[str, str] = {}  # item id -> text the trainer's rows were built from
        self.gate = Gate(self.ts.gate_tolerance)
        self.monitor = OnlineMonitor(self.ts.online_window, min_updates=max(30, self.ts.online_window // 4))
        self.runs: list[RunResult] = []
        self.promoted: list[str] = []
        self.serving_version = active_version(self.root, self.domain)
        self._serving = None  # (version, model)
        self.set_items(items)

    # ------------------------------------------------------------------------------ state
    def set_items(self, items: Iterable[Item]) -> None:
        for it in items:
            if (it.domain or self.settings.model.default_domain) == self.domain:
                self.items[it.item_id] = it

    def owns(self, event: dict) -> bool:
        return (event.get("domain") or self.settings.model.default_domain) == self.domain

    def observe(self, event: Any) -> None:
        """Online monitoring (the drift trigger): what was shown, and the feedback that followed."""
        data = event if isinstance(event, dict) else None
        if data is None:
            return
        if data.get("type") == "recommendation":
            self.monitor.on_recommendation(data)
            return
        it = interaction_from(data)
        if it is not None:
            self.monitor.on_feedback(it.user_id, it.item_id, positive=self._positive(it), event_time=it.event_time,
                                     recommendation_id=it.recommendation_id)

    def check_rollback(self):
        return None  # see the module docstring

    def _positive(self, it: Interaction) -> bool:
        return it.rating is None or it.rating >= self.positive_threshold

    # ---------------------------------------------------------------------------- trainer
    def _graph(self):
        if self.kg is None and self._kg_path:
            self.kg = load_catalogue_graph(self._kg_path, self.items)
        return self.kg

    def _ensure_trainer(self):
        """A trainer over the catalogue as it is now, continuing from what came before."""
        from driftrec.model.knowledge.seqrec import KnowledgeTrainer

        texts = {i: it.text() for i, it in self.items.items()}
        if self.trainer is not None and texts == self._trained_on:
            return self.trainer
        item_ids = list(self.items)
        old = self.trainer
        trainer = KnowledgeTrainer(self.items, item_ids, text=True, kg=self._graph(), kg_alpha=self.ts.kg_alpha,
                                   seed=self.seed, name=f"{self.domain}-knowledge", model_path=self.model_path,
                                   device=self.device, **self.options)
        if old is not None:
            carried = trainer.warm_start(old.net, old.item_ids)
            log.info("catalogue changed (%d -> %d items): new trainer, %d id rows carried over", len(old.item_ids),
                     len(item_ids), carried)
        else:
            served = self.serving_model()
            if served is not None:
                carried = trainer.warm_start(served.net, served.item_ids)
                log.info("trainer for %s resumes from knowledge model %s (%d id rows)", self.domain,
                         self.serving_version, carried)
        self.trainer, self._trained_on = trainer, texts
        return trainer

    def serving_model(self):
        """The ACTIVE model (verified), or None (none yet, or refused: then nothing serves it either)."""
        version = self.serving_version
        if version is None:
            return None
        if self._serving is not None and self._serving[0] == version:
            return self._serving[1]
        try:
            model = load_knowledge(self.root / self.domain / version, self.items, self.model_path)
        except (CheckpointRejected, OSError) as exc:
            log.error("serving knowledge model %s/%s cannot be loaded (%s): the gate has no baseline", self.domain,
                      version, exc)
            model = None
        self._serving = (version, model)
        return model

    # -------------------------------------------------------------------------------- run
    def split(self, events: Sequence[Any], context: Sequence[Any] = ()) -> tuple[list, list]:
        """(training histories, gate cases) from ``context`` + ``events`` (time order); see the module."""
        window = [it for it in (interaction_from(e) for e in events) if it is not None and it.item_id in self.items]
        older = [it for it in (interaction_from(e) for e in context) if it is not None and it.item_id in self.items]
        n_hold = int(round(len(window) * self.ts.holdout_frac))
        train, held = older + window[: len(window) - n_hold], window[len(window) - n_hold:]
        hist: dict[str, list[tuple[str, float | None]]] = {}
        for it in train:
            hist.setdefault(it.user_id, []).append((it.item_id, it.rating))
        seen = {u: [i for i, _ in h] for u, h in hist.items()}
        cases = []
        for it in held:
            before = seen.setdefault(it.user_id, [])
            if before and self._positive(it):
                cases.append((list(before), it.item_id))
            before.append(it.item_id)
        return list(hist.items()), cases[-MAX_CASES:]

    def run_once(self, events: Sequence[Any], *, trigger: str = "manual", max_steps: int | None = None,
                 context: Sequence[Any] = ()) -> RunResult:
        """Train on ``events`` (time order; ``context``: older events), gate, publish if promoted."""
        del max_steps  # the knowledge model trains whole epochs (SeqRecConfig.epochs)
        t0 = time.perf_counter()
        result = RunResult("skipped", trigger, serving_version=self.serving_version)
        try:
            histories, cases = self.split(events, context)
            n_train = sum(len(h) for _, h in histories)
            result.examples, result.holdout = n_train, len(cases)
            if n_train < self.ts.min_examples or not cases or len(self.items) < K + 1:
                log.info("knowledge training skipped: %d interactions, %d gate cases, %d items (min %d interactions)",
                         n_train, len(cases), len(self.items), self.ts.min_examples)
                return self._finish(result, t0)
            trainer = self._ensure_trainer()
            before = trainer.state()
            t1 = time.perf_counter()
            stats = trainer.fit(histories)
            result.train_seconds = time.perf_counter() - t1
            result.stats = {k: v for k, v in stats.items() if k != "seconds"}
            t2 = time.perf_counter()
            item_ids = list(trainer.item_ids)
            cand = rank_metrics(trainer.model(), cases, item_ids)
            served = self.serving_model()
            serv = rank_metrics(served, cases, item_ids) if served is not None else {"hr@10": float("nan"),
                                                                                        "ndcg@10": float("nan")}
            decision = self.gate.decide(cand, serv, serving_version=self.serving_version)
            result.gate_seconds = time.perf_counter() - t2
            if decision.promote:
                version = next_version(self.root, self.domain)
                publish(trainer, self.root, version, self.domain, keep_versions=self.settings.model.keep_versions)
                decision.version = version
                result.version = version
                result.outcome = "promoted"
                self.serving_version = version
                self._serving = (version, trainer.model())
                self.promoted.append(version)
            else:
                trainer.restore(before)
                result.outcome = "rejected"
            result.decision = decision.as_dict()
        except Exception as exc:  # noqa: BLE001 - a failed run must not kill the trainer
            log.exception("knowledge training run failed")
            result.outcome = "failed"
            result.error = f"{type(exc).__name__}: {exc}"
        return self._finish(result, t0)

    def _finish(self, result: RunResult, t0: float) -> RunResult:
        return finish_run(self.runs, result, t0, "knowledge training run")
