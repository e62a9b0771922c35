"""Pipeline throughput with one Faust worker, then two sharing the partitions.

Each run starts ``n`` full workers (every agent; no scorer is reachable, which clicks and ratings
do not need) on a fresh embedded broker, waits until every one of them has joined and processed
events, then produces a backlog of clicks and ratings at full speed (the producer's batch path,
~1 s) and measures it like ``driftrec.bench.ingest``: from the first backlog event counted as ingested (watched
from before the first record is sent) to the last, plus the item rows that follow one hop behind (:func:`driftrec.bench.ingest.backlog_window`,
summed over the workers' metrics endpoints).

On these 2-core machines the workers share the cores with each other, their writer processes and
the broker, so a second worker can only add what one worker leaves idle: the figure says how much
that is here, not how the pipeline scales on a bigger machine.

The backlog is produced only once the group is settled (every worker consumed some of each of the last
``STABLE_ROUNDS`` warm-up rounds), and each run records the share of the backlog each worker ingested
(``worker_shares_2_workers``), so a run whose partitions were unevenly spread shows it.
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
from driftrec.core.broker import broker
from driftrec.demo import Children, child_env
from driftrec.core.settings import Settings


STABLE_ROUNDS = 3


def throughput(settings: Settings, n_workers: int, n_events: int, *, timeout: float = 300.0) -> dict[str, Any]:
    """``{"events_per_s", "shares"}``: the backlog's rate, and the share of it each worker ingested."""
    world = _World(n_users=2000, n_items=1000, seed=21)
    run_dir = Path(tempfile.mkdtemp(prefix="driftrec-bench-workers-"))
    try:
        with broker(settings) as bootstrap, Children() as children:
            asyncio.run(_produce(bootstrap, settings, world.catalogue))
            project = f"bench_{uuid.uuid4().hex[:8]}"
            procs, ports = [], []
            for w in range(n_workers):
                log_path = run_dir / f"worker-{w}.log"
                procs.append(children.start(f"worker-{w}", ["worker"], child_env(
                    settings, bootstrap, run_dir, DRIFTREC_METRICS__PORT="0", DRIFTREC_LOG_LEVEL="WARNING",
                    DRIFTREC_STREAM__DATA_DIR=str(run_dir / f"streams-{w}"), DRIFTREC_FEAST__PROJECT=project,
                    DRIFTREC_SCORER__URL="http://127.0.0.1:9"), log_path))
                ports.append(_wait_port(log_path, procs[-1]))
            # Warm-up until the group is settled: every worker has written features and, in each of the last
            # STABLE_ROUNDS rounds of 100 events, ingested some of them (it owns partitions and consumes them;
            # a rebalance still under way - Tansu's JoinGroup is slow - would leave one idle in the backlog).
            deadline = time.monotonic() + 180
            last = [0.0] * n_workers
            stable = 0
            while stable < STABLE_ROUNDS:
                asyncio.run(_produce(bootstrap, settings, [world.event(time.time()) for _ in range(100)]))
                time.sleep(1.0)
                scrapes = [_scrape(p) for p in ports]
                done = [_metric(x, "driftrec_events_ingested_total", outcome="ok") for x in scrapes]
                wrote = all(_metric(x, "driftrec_feature_rows_written_total", feature_view="item_features") > 0
                            for x in scrapes)
                stable = stable + 1 if wrote and all(d > b for d, b in zip(done, last)) else 0
                last = done
                children.check()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the {n_workers} workers did not all keep consuming for {STABLE_ROUNDS} "
                                       "rounds within 180 s")
            time.sleep(3.0)
            s0 = [_scrape(p) for p in ports]
            backlog = [world.event(time.time()) for _ in range(n_events)]
            window, _produced_s = produce_backlog(bootstrap, settings, backlog, ports, s0=s0, timeout=timeout)
            after = [_scrape(p) for p in ports]
            shares = [(_metric(a, "driftrec_events_ingested_total", outcome="ok")
                       - _metric(b, "driftrec_events_ingested_total", outcome="ok")) / n_events for a, b in zip(after, s0)]
            return {"events_per_s": n_events / window["all_s"], "shares": shares}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def run(settings: Settings, repeats: int = 3, n_events: int = 60_000) -> list[dict[str, Any]]:
    runs = []
    for _ in range(repeats):
        one = throughput(settings, 1, n_events)
        two = throughput(settings, 2, n_events)
        runs.append({"events_per_s_1_worker": one["events_per_s"], "events_per_s_2_workers": two["events_per_s"],
                     "workers_speedup": two["events_per_s"] / one["events_per_s"],
                     "worker_shares_2_workers": sorted(two["shares"])})
    return runs


if __name__ == "__main__":
    print(json.dumps(run(Settings.load(), repeats=1), indent=2))
