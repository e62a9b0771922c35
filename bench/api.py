"""The worker's synchronous API (``GET /v1/recommendations/{user_id}``): latency and throughput.

An embedded broker and one ``driftrec worker`` (the default ranking policy, no knowledge model: the
collaborative policy) with a 400-item catalogue and 3,000 interactions of 200 users, observed before
measuring. Then:

* **sequential**: 300 requests one after another (k=10, random users) -> ``api_p50_ms`` / ``api_p99_ms``;
* **loaded**: 8 concurrent clients for 10 s while 500 events/s are produced in the background (the
  worker ingests them, writes features and the policy observes them on the same event loop) ->
  ``api_rps`` (answers per second) and ``api_loaded_p99_ms``.

Latency is the client's round trip (HTTP on loopback + validation + ranking over the whole catalogue).
Fallback answers (``"fallback": true``) are counted in ``api_fallbacks``; the run is void if any.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from driftrec.bench.e2e import pct
from driftrec.core.broker import broker, free_port
from driftrec.core.settings import Settings
from driftrec.demo import Children, _wait_http, child_env




def _observed(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("driftrec_ranking_observed_total "):
                return float(line.split()[1])
    return 0.0


async def _get(session, url: str, lat: list[float], fallbacks: list[int]) -> None:
    t0 = time.perf_counter()
    async with session.get(url) as resp:
        body = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {body}")
    lat.append((time.perf_counter() - t0) * 1000)
    if body.get("fallback"):
        fallbacks.append(1)


async def _measure(settings: Settings, bootstrap: str, api: str, metrics_port: int, children: Children,
                   clients: int, loaded_s: float, event_rate: float) -> dict[str, Any]:
    import aiohttp

    from driftrec.client import AsyncProducer
    from driftrec.model.evaluation.world import World

    world = World(n_users=200, n_items=400, seed=13)
    rng = random.Random(3)
    async with AsyncProducer(settings, bootstrap_servers=bootstrap) as p:
        await p.send_many(world.items)
        warm = [dict(ev.to_wire(), event_time=time.time()) for ev in world.events(3000)]
        await p.send_many(warm)
        deadline = time.monotonic() + 180
        while _observed(metrics_port) < len(warm):
            children.check()
            if time.monotonic() > deadline:
                raise RuntimeError("the worker's policy did not observe the warm-up events in 180 s")
            await asyncio.sleep(0.5)
        if not _wait_http(f"{api}/readyz", 60, children):
            raise RuntimeError("the worker's API did not become ready")

        fallbacks: list[int] = []
        async with aiohttp.ClientSession() as session:
            for _ in range(20):  # warm the path (first requests build per-user state)
                await _get(session, f"{api}/v1/recommendations/{world.user_id(rng.randrange(200))}?k=10", [], [])
            seq: list[float] = []
            for _ in range(300):
                await _get(session, f"{api}/v1/recommendations/{world.user_id(rng.randrange(200))}?k=10", seq,
                           fallbacks)

            loaded: list[float] = []
            stop = time.monotonic() + loaded_s
            events = world.events(10**9, seed=77)

            async def background() -> None:
                while time.monotonic() < stop:
                    for _ in range(int(event_rate / 10)):
                        await p.send_nowait(dict(next(events).to_wire(), event_time=time.time()))
                    await asyncio.sleep(0.1)

            async def client(seed: int) -> None:
                r = random.Random(seed)
                while time.monotonic() < stop:
                    await _get(session, f"{api}/v1/recommendations/{world.user_id(r.randrange(200))}?k=10", loaded,
                               fallbacks)

            t0 = time.monotonic()
            await asyncio.gather(background(), *[client(s) for s in range(clients)])
            elapsed = time.monotonic() - t0
    return {
        "api_p50_ms": pct(seq, 50), "api_p99_ms": pct(seq, 99), "api_mean_ms": statistics.fmean(seq),
        "api_rps": len(loaded) / elapsed, "api_loaded_p50_ms": pct(loaded, 50), "api_loaded_p99_ms": pct(loaded, 99),
        "api_clients": clients, "api_background_events_per_s": event_rate, "api_fallbacks": len(fallbacks),
        "catalogue_items": len(world.items),
    }


def run(settings: Settings, repeats: int = 3, clients: int = 8, loaded_s: float = 10.0,
        event_rate: float = 500.0) -> list[dict[str, Any]]:
    runs = []
    for _ in range(repeats):
        run_dir = Path(tempfile.mkdtemp(prefix="driftrec-bench-api-"))
        try:
            with broker(settings) as bootstrap, Children() as children:
                api_port, metrics_port = free_port(), free_port()
                children.start("worker", ["worker"], child_env(
                    settings, bootstrap, run_dir, DRIFTREC_METRICS__PORT=str(metrics_port),
                    DRIFTREC_API__PORT=str(api_port), DRIFTREC_RANKING__ENGINE="policy"), run_dir / "worker.log")
                if not _wait_http(f"http://127.0.0.1:{api_port}/healthz", 120, children):
                    raise RuntimeError("the worker's API did not start")
                runs.append(asyncio.run(_measure(settings, bootstrap, f"http://127.0.0.1:{api_port}", metrics_port,
                                                 children, clients, loaded_s, event_rate)))
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
    return runs


if __name__ == "__main__":
    print(json.dumps(run(Settings.load(), repeats=1), indent=2))
