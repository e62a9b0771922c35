"""Event -> recommendation latency through the real pieces: broker, Faust worker, LM scorer.

A request's latency is ``produced_at`` of its recommendation minus the request's ``event_time``
(stamped when it is sent), so it covers produce, consume, features read, candidate generation,
the scorer's HTTP round trip, the correction and the publish.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from driftrec.core.broker import broker, free_port
from driftrec.demo import Children, _wait_http, child_env
from driftrec.core.settings import Settings


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def _measure(settings: Settings, bootstrap: str, n_requests: int, request_rate: float, event_rate: float) -> list[float]:
    from driftrec.client import AsyncProducer, subscribe
    from driftrec.model.evaluation.world import World

    world = World(n_users=200, n_items=400, seed=11)
    sent: dict[str, float] = {}
    got: dict[str, float] = {}

    async def consume() -> None:
        async for rec in subscribe(settings, bootstrap_servers=bootstrap, from_beginning=True):
            rid = rec.get("request_id")
            if rid in sent and rid not in got:
                got[rid] = rec["produced_at"] - sent[rid]
                if len(got) >= n_requests:
                    return

    task = asyncio.create_task(consume())
    async with AsyncProducer(settings, bootstrap_servers=bootstrap) as p:
        await p.send_many(world.items)
        warm = [dict(ev.to_wire(), event_time=time.time()) for ev in world.events(2000)]
        await p.send_many(warm)
        await asyncio.sleep(20)  # let the worker join, catch up and the scorer embed the catalogue
        events = world.events(10**9, seed=99)
        per_request = max(int(event_rate / request_rate), 0)
        for i in range(n_requests):
            for _ in range(per_request):
                await p.send_nowait(dict(next(events).to_wire(), event_time=time.time()))
            t = time.time()
            rid = f"bench-{i}-{t}"
            sent[rid] = t
            await p.send({"type": "recommendation_request", "event_id": rid, "event_time": t,
                          "user_id": world.user_id(i % world.n_users), "k": 10})
            await asyncio.sleep(1.0 / request_rate)
    try:
        await asyncio.wait_for(task, timeout=60)
    except asyncio.TimeoutError:
        pass
    return [v * 1000 for v in got.values()]


def run(settings: Settings, repeats: int = 3, n_requests: int = 200, request_rate: float = 20.0,
        event_rate: float = 500.0) -> list[dict[str, Any]]:
    runs = []
    for _ in range(repeats):
        run_dir = Path(tempfile.mkdtemp(prefix="driftrec-bench-e2e-"))
        try:
            with broker(settings) as bootstrap, Children() as children:
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                children.start("scorer", ["scorer", "--port", str(port)], child_env(settings, bootstrap, run_dir),
                               run_dir / "scorer.log")
                children.start("worker", ["worker"], child_env(settings, bootstrap, run_dir, DRIFTREC_METRICS__PORT="0",
                                                               DRIFTREC_SCORER__URL=url), run_dir / "worker.log")
                if not _wait_http(f"{url}/readyz", 180, children):
                    raise RuntimeError("scorer not ready")
                lat = asyncio.run(_measure(settings, bootstrap, n_requests, request_rate, event_rate))
                runs.append({"e2e_p50_ms": pct(lat, 50), "e2e_p99_ms": pct(lat, 99), "answered": len(lat),
                             "requests": n_requests, "mean_ms": statistics.fmean(lat) if lat else None})
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
    return runs


if __name__ == "__main__":
    print(json.dumps(run(Settings.load(), repeats=1), indent=2))
