"""What a slow scorer costs ingest (issue "Hardening", fault 6): a full worker's throughput on a backlog of
events mixed with recommendation requests, with a scorer that answers at once and one that answers after
5 s.

One ``driftrec worker`` (``ranking.engine: loop``, the engine that calls the HTTP scorer; the policy
engine calls none) on an embedded broker, SQLite features. The scorer is a stand-in HTTP server
(:class:`driftrec.testing.slow_scorer.SlowScorerProcess`, a process of its own) so that only its latency differs between the two runs,
not the CPU a real model would take from the two cores. The backlog: ``n_events`` clicks and ratings with a
recommendation request after every 50. Throughput = backlog events / seconds from the first to the last
one counted as ingested (``driftrec_events_ingested_total{outcome="ok"}``, requests included).
``slow_scorer_ingest_ratio`` = slow / healthy (the issue's target: >= 0.8).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from driftrec.bench.ingest import _World, _metric, _produce, _scrape, _wait_port, produce_backlog
from driftrec.core.settings import Settings


def _one(settings: Settings, delay_s: float, n_events: int, every: int) -> dict[str, Any]:
    from driftrec.core.broker import broker
    from driftrec.demo import Children, child_env
    from driftrec.testing.slow_scorer import SlowScorerProcess

    world = _World(2000, 1000)
    run_dir = Path(tempfile.mkdtemp(prefix="driftrec-bench-scorer-fault-"))
    try:
        with broker(settings) as bootstrap, SlowScorerProcess(delay_s=delay_s, items=world.items[:20]) as scorer, \
                Children() as children:
            asyncio.run(_produce(bootstrap, settings, world.catalogue))
            log_path = run_dir / "worker.log"
            env = child_env(settings, bootstrap, run_dir, DRIFTREC_METRICS__PORT="0", DRIFTREC_RANKING__ENGINE="loop",
                            DRIFTREC_SCORER__URL=scorer.url, DRIFTREC_FEAST__PROJECT=f"bench_{uuid.uuid4().hex[:8]}",
                            DRIFTREC_LOG_LEVEL="WARNING")
            proc = children.start("worker", ["worker"], env, log_path)
            port = _wait_port(log_path, proc)
            deadline = time.monotonic() + 120
            while _metric(_scrape(port), "driftrec_feature_rows_written_total", feature_view="item_features") == 0:
                asyncio.run(_produce(bootstrap, settings, [world.event(time.time()) for _ in range(20)]))
                time.sleep(1.0)
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"worker never wrote features:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(1.0)
            s0 = _scrape(port)
            backlog: list[dict] = []
            for n in range(n_events):
                backlog.append(world.event(time.time()))
                if n % every == every - 1:
                    backlog.append({"type": "recommendation_request", "event_id": uuid.uuid4().hex,
                                    "event_time": time.time(), "user_id": backlog[-1]["user_id"], "k": 10})
            window, _produced_s = produce_backlog(bootstrap, settings, backlog, [port], s0=[s0], timeout=600)
            s1 = _scrape(port)
            fallbacks = {r: _metric(s1, "driftrec_recommendation_fallbacks_total", reason=r) -
                         _metric(s0, "driftrec_recommendation_fallbacks_total", reason=r)
                         for r in ("scorer_timeout", "scorer_circuit_open", "deadline")}
            published = (_metric(s1, "driftrec_recommendations_published_total")
                         - _metric(s0, "driftrec_recommendations_published_total"))
            return {"delay_s": delay_s, "events": len(backlog), "requests": len(backlog) - n_events,
                    "events_per_s": len(backlog) / window["users_s"], "seconds": window["users_s"],
                    "published": published, "fallbacks": fallbacks, "scorer_calls": scorer.calls}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def run(settings: Settings, repeats: int = 3, n_events: int = 60_000, every: int = 50,
        slow_s: float = 5.0) -> list[dict[str, Any]]:
    runs = []
    for _ in range(repeats):
        healthy = _one(settings, 0.0, n_events, every)
        slow = _one(settings, slow_s, n_events, every)
        runs.append({"healthy_events_per_s": healthy["events_per_s"], "slow_events_per_s": slow["events_per_s"],
                     "slow_scorer_ingest_ratio": slow["events_per_s"] / healthy["events_per_s"],
                     "healthy": healthy, "slow": slow})
    return runs


if __name__ == "__main__":
    print(json.dumps(run(Settings.load(), repeats=1), indent=2, default=str))
