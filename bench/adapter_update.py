"""Benchmark: trigger -> new adapter serving, on this machine (CPU unless a GPU is configured).

One repeat = what the training worker does when a trigger fires, in-process: build examples from the
newest events of a synthetic world, train the serving adapter for at most ``trainer.max_steps`` steps
(:class:`driftrec.model.training.drift_trainer.DriftTrainer`), gate it against the serving adapter on the holdout
(:mod:`driftrec.model.training.gate`), save the checkpoint version, announce it, and apply the announcement to an
in-process :class:`driftrec.model.serving.scorer.LMScorer` (verify, merge, re-embed the catalogue) until the new version
serves. ``adapter_update_s`` is the wall time from the trigger until the scorer reports the new version.
The gate tolerance is opened (1.0) so that every repeat ends in a swap; the gate's cost is still paid.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

USERS = int(os.environ.get("DRIFTREC_BENCH_UPDATE_USERS", "200"))
ITEMS = int(os.environ.get("DRIFTREC_BENCH_UPDATE_ITEMS", "200"))
EVENTS = int(os.environ.get("DRIFTREC_BENCH_UPDATE_EVENTS", "600"))
# One intra-op thread: on a busy 2-core CPU two threads were 2-3x slower per step (measured).
THREADS = int(os.environ.get("DRIFTREC_BENCH_UPDATE_THREADS", "1"))


def run(settings, repeats: int = 3) -> list[dict[str, Any]]:
    import torch

    from driftrec.model.evaluation.world import World
    from driftrec.model.lm import DevicePlan, load_encoder, load_tokenizer
    from driftrec.model.serving.scorer import LMScorer
    from driftrec.model.training.worker import TrainingWorker

    out: list[dict[str, Any]] = []
    threads_before = torch.get_num_threads()
    if THREADS:
        torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory(prefix="driftrec-bench-update-") as tmp:
        s = settings.model_copy(deep=True)
        s.model.adapter_dir = Path(tmp)
        s.trainer.gate_tolerance = 1.0
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
                ok = []
                for ann in result.announcements:
                    ok.append(asyncio.run(scorer.on_announcement(ann)))
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
            torch.set_num_threads(threads_before)
    return out


if __name__ == "__main__":  # python -m driftrec.bench.adapter_update [repeats]
    import json
    import sys

    from driftrec.core.settings import Settings

    print(json.dumps(run(Settings.load(), int(sys.argv[1]) if len(sys.argv) > 1 else 1), indent=2))
