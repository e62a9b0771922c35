"""Pipeline throughput with one Faust worker, then two sharing the partitions.

The workers are started and have joined the group (each has processed a probe event) before the
timed burst is produced; throughput is events / time until every event is counted as ingested
(``driftrec_events_ingested_total`` summed over the workers' metrics endpoints).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.request import urlopen

from driftrec.broker import broker
from driftrec.demo import Children, child_env
from driftrec.settings import Settings


def _ingested(ports: list[int]) -> float:
    total = 0.0
    for port in ports:
        text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for m in re.finditer(r'^driftrec_events_ingested_total\{[^}]*outcome="ok"[^}]*\} ([0-9.e+]+)$', text, re.M):
            total += float(m.group(1))
    return total


def _port(log_path: Path, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"metrics on 127\.0\.0\.1:(\d+)", log_path.read_text(errors="replace") if log_path.exists() else "")
        if m:
            return int(m.group(1))
        time.sleep(0.2)
    raise RuntimeError(f"no metrics port in {log_path}")


def throughput(settings: Settings, n_workers: int, n_events: int) -> float:
    from driftrec.client import Producer
    from driftrec.world import World

    world = World(n_users=500, n_items=300, seed=21)
    run_dir = Path(tempfile.mkdtemp(prefix="driftrec-bench-workers-"))
    try:
        with broker(settings) as bootstrap, Children() as children:
            with Producer(settings, bootstrap_servers=bootstrap) as p:
                p.send_many(world.items)
            logs = []
            for w in range(n_workers):
                log_path = run_dir / f"worker-{w}.log"
                children.start(f"worker-{w}", ["worker"], child_env(
                    settings, bootstrap, run_dir, DRIFTREC_METRICS__PORT="0",
                    DRIFTREC_STREAM__DATA_DIR=str(run_dir / f"streams-{w}"),
                    DRIFTREC_SCORER__URL="http://127.0.0.1:9"), log_path)
                logs.append(log_path)
            ports = [_port(p) for p in logs]
            # Warm-up until every worker has processed something (joined and assigned).
            probe = world.events(10**9, seed=5)
            deadline = time.monotonic() + 120
            with Producer(settings, bootstrap_servers=bootstrap) as p:
                while time.monotonic() < deadline:
                    p.send_many(dict(next(probe).to_wire(), event_time=time.time()) for _ in range(50))
                    time.sleep(1.0)
                    if all(_ingested([port]) > 0 for port in ports):
                        break
                time.sleep(3)
                base = _ingested(ports)
                events = [dict(ev.to_wire(), event_time=time.time()) for ev in world.events(n_events, seed=6)]
                t0 = time.monotonic()
                p.send_many(events)
            while time.monotonic() - t0 < 300:
                if _ingested(ports) - base >= n_events:
                    break
                time.sleep(0.05)
            return n_events / (time.monotonic() - t0)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def run(settings: Settings, repeats: int = 3, n_events: int = 20_000) -> list[dict[str, Any]]:
    runs = []
    for _ in range(repeats):
        one = throughput(settings, 1, n_events)
        two = throughput(settings, 2, n_events)
        runs.append({"events_per_s_1_worker": one, "events_per_s_2_workers": two, "workers_speedup": two / one})
    return runs


if __name__ == "__main__":
    print(json.dumps(run(Settings.load(), repeats=1), indent=2))
