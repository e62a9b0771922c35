"""``python -m driftrec.bench.learning``: how fast the ranking policy learns, per learning setting.

The worker's ranking policy learns every interaction of every worker (its fusion in the learner process,
``ranking.learner: process``, in chunks of 64; or on the worker's learning thread, in chunks of 16), so its
learning rate bounds the event rate a worker follows. This measures it in one process, one torch and one BLAS
thread (as the worker runs it): the e2e benchmark's synthetic world (200 users, 400 items, seed 11), a
policy warmed with 3,000 interactions, a knowledge model trained on them (``KnowledgeTrainer``, text on,
no graph), then 6,000 more interactions through ``RankingPolicy.observe_many`` in chunks of
``streams.policy_ranker.LEARN_CHUNK`` (16, what the worker's learning thread does) -> ``events_per_s``; ``one_by_one_events_per_s`` is ``observe`` per event (no batched
forwards); ``state_only_events_per_s`` is ``RankingPolicy.follow_many`` alone (what the worker itself does
per event with the learner process: the state, no fusion). Each setting of (``hard_pool_every``, ``learn_fraction``) in ``--settings`` starts from the
same warmed state. The quality side of the same settings comes from ``driftrec evaluate`` (README).

``python -m driftrec.bench.learning --json bench/results/learning.json`` (medians of ``--repeats``, 3 by
default; also ``driftrec bench --only learning``).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import sys
import time
from typing import Any

PROFILES = ((1, 1.0), (2, 1.0), (4, 1.0), (4, 0.5), (4, 0.25))  # (hard_pool_every, learn_fraction)


def key(every: int, fraction: float) -> str:
    """The flat result key of one setting, e.g. ``learn_events_per_s_every1_frac1.0``."""
    return f"learn_events_per_s_every{every}_frac{fraction}"


def _world():
    from driftrec.bench.e2e import _world as e2e_world

    return e2e_world()


def run(settings=None, repeats: int = 1, *, profiles=PROFILES, events: int = 6000, chunk: int | None = None) -> list[dict[str, Any]]:
    """``repeats`` runs (each: every profile from the same warmed state); one flat dict per run.
    ``settings`` is not used (every ``bench`` module's ``run(settings, repeats)`` convention, for
    ``driftrec bench``): the policy's settings are the profiles'."""
    if chunk is None:
        from driftrec.streams.policy_ranker import LEARN_CHUNK

        chunk = LEARN_CHUNK
    return [_once(profiles, events, chunk) for _ in range(repeats)]


def _once(profiles, events: int, chunk: int) -> dict[str, Any]:
    import torch

    from driftrec.model.knowledge.seqrec import KnowledgeTrainer
    from driftrec.model.ranking.policy import PolicyConfig, RankingPolicy

    torch.set_num_threads(1)
    w = _world()
    items = {it.item_id: it for it in w.items}
    ids = list(items)
    stream = [(e.user_id, e.item_id, None if getattr(e, "rating", None) is None else float(e.rating), e.event_time)
              for e in w.events(3000 + events)]
    warm, rest = stream[:3000], stream[3000:]
    base = RankingPolicy(PolicyConfig(), items, ids)
    for ev in warm:
        base.observe(*ev)
    trainer = KnowledgeTrainer(items, ids)
    trainer.fit(list(base.histories()), initial=True)
    model = trainer.model()
    snapshot = pickle.dumps(base)
    # what the worker does itself with the learner process: the state only (RankingPolicy.follow_many)
    p = pickle.loads(snapshot)
    p.set_model(model)
    t0 = time.perf_counter()
    for a in range(0, len(rest), chunk):
        p.follow_many(rest[a:a + chunk])
    state_only = len(rest) / (time.perf_counter() - t0)
    print(json.dumps({"state_only_events_per_s": state_only}), flush=True)
    out = []
    for every, fraction in profiles:
        row: dict[str, Any] = {"hard_pool_every": every, "learn_fraction": fraction}
        for mode in ("batched", "one_by_one"):
            p = pickle.loads(snapshot)
            p.cfg = PolicyConfig(hard_pool_every=every, learn_fraction=fraction)
            p.set_model(model)
            t0 = time.perf_counter()
            if mode == "batched":
                for a in range(0, len(rest), chunk):
                    p.observe_many(rest[a:a + chunk])
            else:
                for ev in rest:
                    p.observe(*ev)
            dt = time.perf_counter() - t0
            row["events_per_s" if mode == "batched" else "one_by_one_events_per_s"] = len(rest) / dt
            row["fusion_examples"] = p.corrector.n_learned
        out.append(row)
        print(json.dumps(row), flush=True)
    flat = {key(r["hard_pool_every"], r["learn_fraction"]): r["events_per_s"] for r in out}
    return {**flat, "state_only_events_per_s": state_only, "profiles": out, "items": len(ids), "events": len(rest), "chunk": chunk,
            "machine": {"cpu": _cpu(), "cpus": os.cpu_count(), "python": platform.python_version(),
                        "torch": torch.__version__},
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    ap = argparse.ArgumentParser(prog="python -m driftrec.bench.learning", description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=6000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="write the result here")
    a = ap.parse_args(argv)
    import statistics

    runs = run(repeats=a.repeats, events=a.events)
    result = {k: statistics.median(r[k] for r in runs) for k in runs[0]
              if k.startswith("learn_events_per_s") or k == "state_only_events_per_s"}
    result.update(runs=runs, repeats=a.repeats, command="python -m driftrec.bench.learning " + " ".join(sys.argv[1:] if argv is None else argv))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
