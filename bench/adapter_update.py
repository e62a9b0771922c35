"""Benchmark: trigger -> new model serving, for both ranking engines, on this machine (CPU unless a GPU is configured).

``adapter_update_s`` is the figure of the engine the settings rank with (``ranking.engine``; the default
``policy``), the other engine's is kept beside it (``adapter_update_s_policy``, ``adapter_update_s_loop``):

* **policy** (the default product: the ranking policy and its knowledge model, whose checkpoint is the
  domain's adapter). One repeat = what ``driftrec train`` does when a trigger fires, in-process: the newest
  ``trainer.window_events`` interactions of a synthetic world (1,000 users, 1,000 items) with
  ``trainer.context_events`` older ones before them, split, warm-started fit, gate against the serving
  model, publish (checkpoint + ACTIVE pointer), then what a worker does when it sees the new ACTIVE
  version (:meth:`driftrec.streams.policy_ranker.PolicyRanker.check_model`): verify and load it
  (:func:`driftrec.model.knowledge.checkpoint.load_knowledge`) and swap it into a ranking policy that
  follows the same events, until its first recommendation comes from the new version. The first model
  of the process (trained from scratch, ``init_epochs``, the LM forward over every item text included)
  is not an update: it is reported as ``first_model_s``. A worker looks for a new ACTIVE version every
  ``ranking.model_watch_interval_s`` (``watch_interval_s``), which a deployment adds at most.
* **loop** (the LM scorer's LoRA adapter). One repeat = what the training worker does when a trigger
  fires, in-process: build examples from the newest events of a synthetic world, train the serving
  adapter for at most ``trainer.max_steps`` steps (:class:`driftrec.model.training.drift_trainer.DriftTrainer`),
  gate it against the serving adapter on the holdout (:mod:`driftrec.model.training.gate`), save the
  checkpoint version, announce it, and apply the announcement to an in-process
  :class:`driftrec.model.serving.scorer.LMScorer` (verify, merge, re-embed the catalogue) until the new
  version serves. The announcement's trip over the adapters topic is not included.

The gate tolerance is opened (1.0) so that every repeat ends in a swap; the gate's cost is still paid.
Both run on ``DRIFTREC_BENCH_UPDATE_THREADS`` torch threads (1 by default: the trainer shares a 2-core
machine with the workers).
``python -m driftrec.bench.adapter_update [repeats]`` prints the rows as JSON.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

USERS = int(os.environ.get("DRIFTREC_BENCH_UPDATE_USERS", "200"))
ITEMS = int(os.environ.get("DRIFTREC_BENCH_UPDATE_ITEMS", "200"))
EVENTS = int(os.environ.get("DRIFTREC_BENCH_UPDATE_EVENTS", "600"))
# One intra-op thread: on a busy 2-core CPU two threads were 2-3x slower per step (measured).
THREADS = int(os.environ.get("DRIFTREC_BENCH_UPDATE_THREADS", "1"))


POLICY_USERS = int(os.environ.get("DRIFTREC_BENCH_UPDATE_POLICY_USERS", "1000"))
POLICY_ITEMS = int(os.environ.get("DRIFTREC_BENCH_UPDATE_POLICY_ITEMS", "1000"))


@contextmanager
def _bench_settings(settings, prefix: str):
    """A copy of ``settings`` with an adapter folder of its own (removed after) and the gate opened, while
    torch runs on ``THREADS`` threads (restored after)."""
    import torch

    threads_before = torch.get_num_threads()
    if THREADS:
        torch.set_num_threads(THREADS)
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            s = settings.model_copy(deep=True)
            s.model.adapter_dir = Path(tmp)
            s.trainer.gate_tolerance = 1.0
            yield s
    finally:
        torch.set_num_threads(threads_before)


def run(settings, repeats: int = 3) -> list[dict[str, Any]]:
    """One row per repeat: ``adapter_update_s`` (the configured engine's) and both engines' blocks."""
    engine = settings.ranking.engine
    policy = run_policy(settings, repeats)
    loop = run_loop(settings, repeats)
    rows = []
    for p, lo in zip(policy, loop):
        rows.append({
            "engine": engine,
            "adapter_update_s": p["adapter_update_s"] if engine == "policy" else lo["adapter_update_s"],
            "adapter_update_s_policy": p["adapter_update_s"],
            "adapter_update_s_loop": lo["adapter_update_s"],
            "policy": p,
            "loop": lo,
        })
    return rows


def run_policy(settings, repeats: int = 3) -> list[dict[str, Any]]:
    """The ranking policy's knowledge model: trigger -> the new version serving in a ranking policy."""
    import torch

    from driftrec.model.evaluation.world import World
    from driftrec.model.knowledge.checkpoint import load_knowledge
    from driftrec.model.ranking.policy import PolicyConfig, RankingPolicy
    from driftrec.model.training.knowledge_worker import KnowledgeTrainingWorker

    out: list[dict[str, Any]] = []
    with _bench_settings(settings, "driftrec-bench-update-policy-") as s:
        window, context = s.trainer.window_events, s.trainer.context_events
        world = World(n_users=POLICY_USERS, n_items=POLICY_ITEMS, seed=17)
        events = list(world.events(context + window * (repeats + 1)))
        items = {it.item_id: it for it in world.items}
        model_path = s.model.model_path or None
        worker = KnowledgeTrainingWorker(s, items=world.items)
        policy = RankingPolicy(PolicyConfig(), items, list(items))
        fed = 0

        def follow(upto: int) -> None:  # the worker's ranking policy has seen the events so far
            nonlocal fed
            policy.follow_many([(e.user_id, e.item_id, None if getattr(e, "rating", None) is None
                                 else float(e.rating), e.event_time) for e in events[fed:upto]])
            fed = upto

        first_model_s = None
        for r in range(repeats + 1):
            lo = r * window
            ctx, win = events[lo: lo + context], events[lo + context: lo + context + window]
            follow(lo + context + window)
            t0 = time.perf_counter()
            result = worker.run_once(win, context=ctx, trigger="bench")
            t1 = time.perf_counter()
            served = None
            if result.version:
                model = load_knowledge(worker.root / worker.domain / result.version, items, model_path)
                policy.set_model(model)
                user = events[lo + context + window - 1].user_id
                recs = policy.recommend(user, 10, events[lo + context + window - 1].event_time + 1)
                served = result.version if policy.model is model and len(recs) == 10 else None
            t2 = time.perf_counter()
            took = t2 - t0 if result.version and served == result.version else None
            if r == 0:  # the first model of the process, from scratch: not an update
                first_model_s = took
                continue
            row = {
                "adapter_update_s": took,
                "train_s": result.train_seconds,
                "gate_s": result.gate_seconds,
                "publish_s": (t1 - t0) - result.train_seconds - result.gate_seconds,
                "swap_s": t2 - t1,
                "epochs": (result.stats or {}).get("epochs"),
                "steps": (result.stats or {}).get("steps"),
                "interactions": result.examples,
                "holdout": result.holdout,
                "outcome": result.outcome,
                "version": result.version,
                "served": served,
                "users": POLICY_USERS,
                "items": POLICY_ITEMS,
                "window_events": window,
                "context_events": context,
                "watch_interval_s": s.ranking.model_watch_interval_s,
                "torch_threads": torch.get_num_threads(),
                "load_1m": os.getloadavg()[0],
            }
            if r == 1 and first_model_s is not None:  # once: the median of the rows that have it
                row["first_model_s"] = first_model_s
            out.append(row)
    return out


def run_loop(settings, repeats: int = 3) -> list[dict[str, Any]]:
    """The LM scorer's LoRA adapter: trigger -> the new adapter serving in an LMScorer."""
    import torch

    from driftrec.model.evaluation.world import World
    from driftrec.model.lm import DevicePlan, load_encoder, load_tokenizer
    from driftrec.model.serving.scorer import LMScorer
    from driftrec.model.training.worker import TrainingWorker

    out: list[dict[str, Any]] = []
    with _bench_settings(settings, "driftrec-bench-update-") as s:
        world = World(n_users=USERS, n_items=ITEMS, seed=17)
        events = list(world.events(EVENTS * (repeats + 1)))
        model_path = s.model.model_path or None
        base = load_encoder(model_path, DevicePlan(torch.device("cpu"), torch.float32))
        tok = load_tokenizer(model_path)
        scorer = LMScorer(s, base_model=base, tokenizer=tok)
        try:
            scorer.catalogue.upsert(world.items)
            scorer.start()
            worker = TrainingWorker(s, items=world.items, encoder=base, tokenizer=tok)
            for r in range(repeats):
                window = events[r * EVENTS: (r + 1) * EVENTS]
                t0 = time.perf_counter()
                result = worker.run_once(window, trigger="bench")
                t1 = time.perf_counter()
                for ann in result.announcements:
                    asyncio.run(scorer.on_announcement(ann))
                served = scorer.version_info().adapter_version
                t2 = time.perf_counter()
                out.append({
                    "adapter_update_s": t2 - t0 if result.version and served == result.version else None,
                    "train_s": result.train_seconds,
                    "gate_s": result.gate_seconds,
                    "build_examples_s": result.seconds - result.train_seconds - result.gate_seconds,
                    "swap_s": t2 - t1,
                    "steps": (result.stats or {}).get("steps"),
                    "examples": result.examples,
                    "holdout": result.holdout,
                    "outcome": result.outcome,
                    "version": result.version,
                    "served": served,
                    "max_steps": s.trainer.max_steps,
                    "batch_size": s.trainer.batch_size,
                    "items": ITEMS,
                    "torch_threads": torch.get_num_threads(),
                    "load_1m": os.getloadavg()[0],
                })
        finally:
            scorer.close()
    return out


if __name__ == "__main__":  # python -m driftrec.bench.adapter_update [repeats]
    import json
    import sys

    from driftrec.core.settings import Settings

    print(json.dumps(run(Settings.load(), int(sys.argv[1]) if len(sys.argv) > 1 else 1), indent=2))
