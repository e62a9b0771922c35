"""The worker's synchronous API (``GET /v1/recommendations/{user_id}``): latency and throughput.

An embedded broker and one ``driftrec worker`` serving what a deployment serves: the default ranking
policy with its knowledge model. A 2,000-item catalogue and 3,000 interactions of 200 users are on the
topics first; ``driftrec train --once`` trains the knowledge model on them and publishes it into the
run's adapter folder (as the e2e benchmark does), the worker starts, loads it and observes the warm-up
(``model=False``: no knowledge model, the collaborative features only). Then:

* **sequential**: 300 requests one after another (k=10, random users) -> ``api_p50_ms`` / ``api_p99_ms``;
* **the step test** (open loop: requests sent on a clock, never waiting for answers; no ingest): 100,
  200, 300, 400, 600, 800, 1,000 and 1,200 requests/s for 5 s each, stopping at the first step whose p99 is
  over 50 ms or that had an error or a fallback answer -> ``served_max_rps_p99_50ms``, the highest
  rate that held (``served_rates`` holds each step). This is the served path's counterpart of the LM
  scorer's ``score_max_rps`` (the ``loop`` engine's HTTP scorer): every answer ranks the whole
  catalogue with the knowledge model's scores and the fusion, behind validation and HTTP;
* **loaded**: 8 concurrent clients for 10 s while 500 events/s are produced in the background (the
  worker ingests them, writes features and the policy observes them on the same event loop) ->
  ``api_rps`` (answers per second) and ``api_loaded_p99_ms``.

Latency is the client's round trip (HTTP on loopback + validation + ranking over the whole catalogue);
the client runs on the same machine. Every answer must name the knowledge model (``model_version``);
fallback answers (``"fallback": true``) are counted in ``api_fallbacks``; the run is void if any.
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

from driftrec.bench.e2e import _train_once, pct
from driftrec.core.broker import broker, free_port
from driftrec.core.settings import Settings
from driftrec.demo import Children, _wait_http, child_env

N_USERS, N_ITEMS, WARM_EVENTS = 200, 2000, 3000
STEP_RATES = (100.0, 200.0, 300.0, 400.0, 600.0, 800.0, 1000.0, 1200.0)
STEP_BUDGET_MS = 50.0


def _world():
    from driftrec.model.evaluation.world import World

    return World(n_users=N_USERS, n_items=N_ITEMS, seed=13)


async def _prewarm(settings: Settings, bootstrap: str) -> None:
    """The catalogue and the warm-up interactions, on the topics before the trainer and the worker start."""
    from driftrec.client import AsyncProducer

    world = _world()
    async with AsyncProducer(settings, bootstrap_servers=bootstrap) as p:
        await p.send_many(world.items)
        await p.send_many([dict(ev.to_wire(), event_time=time.time()) for ev in world.events(WARM_EVENTS)])



def _observed(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("driftrec_ranking_observed_total "):
                return float(line.split()[1])
    return 0.0


async def _get(session, url: str, lat: list[float], fallbacks: list[int], models: set | None = None) -> None:
    t0 = time.perf_counter()
    async with session.get(url) as resp:
        body = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {body}")
    lat.append((time.perf_counter() - t0) * 1000)
    if body.get("fallback"):
        fallbacks.append(1)
    if models is not None:
        models.add(body.get("model_version"))


async def _steps(session, api: str, users: list[str], rates, seconds: float, budget_ms: float,
                 models: set) -> list[dict]:
    """Open-loop steps of GET requests (see the module docstring); stops at the first step that fails."""
    rng = random.Random(5)
    steps = []
    for rate in rates:
        lat: list[float] = []
        errors: list[str] = []
        fallbacks: list[int] = []

        async def one() -> None:
            try:
                await _get(session, f"{api}/v1/recommendations/{rng.choice(users)}?k=10", lat, fallbacks, models)
            except Exception as exc:  # noqa: BLE001 - counted as an error of the step
                errors.append(repr(exc))

        tasks = []
        t0 = time.perf_counter()
        n = 0
        while (elapsed := time.perf_counter() - t0) < seconds:
            while n < int(elapsed * rate):
                tasks.append(asyncio.create_task(one()))
                n += 1
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
        step = {"rate": rate, "requests": n, "achieved_rps": n / seconds, "errors": len(errors),
                "fallbacks": len(fallbacks), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                "first_error": errors[0] if errors else None}
        steps.append(step)
        if errors or fallbacks or not lat or step["p99_ms"] > budget_ms:
            break
    return steps


async def _measure(settings: Settings, bootstrap: str, api: str, metrics_port: int, children: Children,
                   clients: int, loaded_s: float, event_rate: float, step_rates, step_s: float) -> dict[str, Any]:
    import aiohttp

    from driftrec.client import AsyncProducer

    world = _world()
    rng = random.Random(3)
    users = [world.user_id(u) for u in range(N_USERS)]
    models: set = set()
    async with AsyncProducer(settings, bootstrap_servers=bootstrap) as p:
        deadline = time.monotonic() + 180
        while _observed(metrics_port) < WARM_EVENTS:
            children.check()
            if time.monotonic() > deadline:
                raise RuntimeError("the worker's policy did not observe the warm-up events in 180 s")
            await asyncio.sleep(0.5)
        if not _wait_http(f"{api}/readyz", 60, children):
            raise RuntimeError("the worker's API did not become ready")

        fallbacks: list[int] = []
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2000),
                                         timeout=aiohttp.ClientTimeout(total=30)) as session:
            for _ in range(20):  # warm the path (first requests build per-user state)
                await _get(session, f"{api}/v1/recommendations/{rng.choice(users)}?k=10", [], [])
            seq: list[float] = []
            for _ in range(300):
                await _get(session, f"{api}/v1/recommendations/{rng.choice(users)}?k=10", seq, fallbacks, models)
            steps = await _steps(session, api, users, step_rates, step_s, STEP_BUDGET_MS, models)

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
                    await _get(session, f"{api}/v1/recommendations/{r.choice(users)}?k=10", loaded, fallbacks,
                               models)

            t0 = time.monotonic()
            await asyncio.gather(background(), *[client(s) for s in range(clients)])
            elapsed = time.monotonic() - t0
    ok = [st["rate"] for st in steps
          if st["errors"] == 0 and st["fallbacks"] == 0 and st["p99_ms"] is not None and st["p99_ms"] <= STEP_BUDGET_MS]
    return {
        "api_p50_ms": pct(seq, 50), "api_p99_ms": pct(seq, 99), "api_mean_ms": statistics.fmean(seq),
        "served_max_rps_p99_50ms": max(ok, default=0.0), "served_rates": steps,
        "model_versions": sorted(str(m) for m in models),
        "api_rps": len(loaded) / elapsed, "api_loaded_p50_ms": pct(loaded, 50), "api_loaded_p99_ms": pct(loaded, 99),
        "api_clients": clients, "api_background_events_per_s": event_rate, "api_fallbacks": len(fallbacks),
        "catalogue_items": len(world.items),
    }


def run(settings: Settings, repeats: int = 3, clients: int = 8, loaded_s: float = 10.0,
        event_rate: float = 500.0, step_rates=STEP_RATES, step_s: float = 5.0,
        model: bool = True) -> list[dict[str, Any]]:
    runs = []
    for _ in range(repeats):
        run_dir = Path(tempfile.mkdtemp(prefix="driftrec-bench-api-"))
        try:
            with broker(settings) as bootstrap, Children() as children:
                asyncio.run(_prewarm(settings, bootstrap))
                trained = _train_once(settings, bootstrap, run_dir) if model else None
                api_port, metrics_port = free_port(), free_port()
                children.start("worker", ["worker"], child_env(
                    settings, bootstrap, run_dir, DRIFTREC_METRICS__PORT=str(metrics_port),
                    DRIFTREC_API__PORT=str(api_port), DRIFTREC_RANKING__ENGINE="policy"), run_dir / "worker.log")
                if not _wait_http(f"http://127.0.0.1:{api_port}/healthz", 120, children):
                    raise RuntimeError("the worker's API did not start")
                out = asyncio.run(_measure(settings, bootstrap, f"http://127.0.0.1:{api_port}", metrics_port,
                                           children, clients, loaded_s, event_rate, step_rates, step_s))
                out["knowledge_model"] = trained.get("version") if trained else None
                if trained and [m.rsplit("/", 1)[-1] for m in out["model_versions"]] != [out["knowledge_model"]]:
                    raise RuntimeError(f"answers came from {out['model_versions']}, not only from the trained "
                                       f"knowledge model {out['knowledge_model']}")
                runs.append(out)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
    return runs


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-model", action="store_true",
                    help="the policy without a knowledge model (collaborative features only)")
    ap.add_argument("--step-seconds", type=float, default=5.0)
    a = ap.parse_args()
    print(json.dumps(run(Settings.load(), repeats=1, step_s=a.step_seconds, model=not a.no_model), indent=2,
                     default=str))
