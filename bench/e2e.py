"""Event -> recommendation latency through the real pieces at a fixed offered load, with ingest beside it.

One ``driftrec worker`` on an embedded broker, the default engine (the ranking policy; ``engine="loop"``
adds the LM scorer worker and ranks through it). A 400-item catalogue and 3,000 interactions of 200
users are on the topics first; with the policy engine ``driftrec train --once`` then trains the knowledge
model on them and publishes it into the run's adapter folder, so the worker serves what a deployment
serves (``model=False`` / ``--no-model``: no knowledge model, the collaborative features only). The
worker observes the warm-up. Then, open loop (requests are sent on a clock, never waiting for answers):

* **at the target load**: after 10 s of ingest alone (``event_rate`` clicks/ratings/s, default 2,000: the
  worker reaches its steady state; not measured), ``rate`` requests/s (default 50) for ``seconds`` (30)
  while the events go on -> ``e2e_p50_ms`` / ``e2e_p95_ms`` / ``e2e_p99_ms``, the achieved
  request rate (``e2e_achieved_rps``) and how many were answered in time;
* **the step test**: the same at 100, 200 and 400 requests/s (10 s each) -> ``e2e_max_rps_p99_250ms``, the
  highest offered rate whose p99 stayed within 250 ms with every request answered (0 = not even 50).

A request's latency is ``produced_at`` of its recommendation minus the request's ``event_time`` (stamped
when it is sent): produce, consume, validation, features, ranking and the publish. Requests not answered
within 30 s of the end of a step count as missing (``e2e_missing``) and make the step fail.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from driftrec.core.broker import broker, free_port
from driftrec.core.settings import Settings
from driftrec.demo import Children, _wait_http, child_env

P99_BUDGET_MS = 250.0


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def _metric(port: int, name: str, having: str = "") -> float:
    """Sum of a metric's samples (those whose label set contains ``having``)."""
    total = 0.0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if (line.startswith(name + " ") or line.startswith(name + "{")) and having in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


async def _step(p, world, events, sent: dict[str, float], got: dict[str, float], tag: str, rate: float,
                seconds: float, event_rate: float, metrics_port: int | None = None) -> dict[str, Any]:
    """Offer ``rate`` requests/s for ``seconds`` with ``event_rate`` events/s beside them (open loop). With
    ``metrics_port``, the ranking policy's learning backlog is read every second (its peak, its value at
    the end of the step) and its learning rate over the step."""
    ids: list[str] = []
    t0 = time.monotonic()
    tick = 0.02  # 50 ticks a second: requests and events spread evenly over each second
    n = 0
    backlog: list[float] = []
    next_probe = t0
    observed0 = _metric(metrics_port, "driftrec_ranking_observed_total") if metrics_port else 0.0
    while (elapsed := time.monotonic() - t0) < seconds:
        if metrics_port and time.monotonic() >= next_probe:
            next_probe += 1.0
            backlog.append(await asyncio.to_thread(_metric, metrics_port, "driftrec_ranking_backlog"))
        due_requests = int(elapsed * rate) - len(ids)
        for _ in range(max(due_requests, 0)):
            t = time.time()
            rid = f"{tag}-{len(ids)}"
            sent[rid] = t
            ids.append(rid)
            await p.send_nowait({"type": "recommendation_request", "event_id": rid, "event_time": t,
                                 "user_id": world.user_id(len(ids) % world.n_users), "k": 10})
        due_events = int(elapsed * event_rate) - n
        for _ in range(max(due_events, 0)):
            await p.send_nowait(dict(next(events).to_wire(), event_time=time.time()))
            n += 1
        await asyncio.sleep(tick)
    offered_s = time.monotonic() - t0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(i not in got for i in ids):
        await asyncio.sleep(0.1)
    lat = [got[i] * 1000 for i in ids if i in got]
    learning = {}
    if metrics_port:
        observed = _metric(metrics_port, "driftrec_ranking_observed_total") - observed0
        learning = {"backlog_peak": max(backlog, default=0.0), "backlog_end": _metric(metrics_port, "driftrec_ranking_backlog"),
                    "learnt_per_s": observed / (time.monotonic() - t0)}
    return {**learning, "offered_rps": rate, "achieved_rps": len(ids) / offered_s, "requests": len(ids), "answered": len(lat),
            "missing": len(ids) - len(lat), "events_per_s": n / offered_s, "p50_ms": pct(lat, 50),
            "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99), "mean_ms": statistics.fmean(lat) if lat else None}


async def _measure(settings: Settings, bootstrap: str, metrics_port: int, children: Children, rate: float,
                   seconds: float, event_rate: float, steps: tuple[float, ...]) -> dict[str, Any]:
    from driftrec.client import AsyncProducer, subscribe

    world = _world()
    sent: dict[str, float] = {}
    got: dict[str, float] = {}

    async def consume() -> None:
        async for rec in subscribe(settings, bootstrap_servers=bootstrap, from_beginning=True):
            rid = rec.get("request_id")
            if rid in sent and rid not in got:
                got[rid] = rec["produced_at"] - sent[rid]

    task = asyncio.create_task(consume())
    try:
        async with AsyncProducer(settings, bootstrap_servers=bootstrap) as p:
            deadline = time.monotonic() + 180
            while _metric(metrics_port, "driftrec_events_ingested_total", 'outcome="ok"') < WARM_EVENTS + len(world.items):
                children.check()
                if time.monotonic() > deadline:
                    raise RuntimeError("the worker did not ingest the warm-up events in 180 s")
                await asyncio.sleep(0.5)
            # answers of a short warm-up step (the ranker's first requests) are not measured
            events = world.events(10**9, seed=99)
            await _step(p, world, events, sent, got, "warm", 10, 5, 0)
            onset = await _step(p, world, events, sent, got, "onset", 0, 10, event_rate, metrics_port)  # ingest alone
            main = await _step(p, world, events, sent, got, "main", rate, seconds, event_rate, metrics_port)
            stepped = []
            for r in steps:
                s = await _step(p, world, events, sent, got, f"step{int(r)}", r, 10, event_rate, metrics_port)
                stepped.append(s)
                if s["missing"] or s["p99_ms"] is None or s["p99_ms"] > P99_BUDGET_MS:
                    break
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    ok = [s["offered_rps"] for s in [main, *stepped]
          if not s["missing"] and s["p99_ms"] is not None and s["p99_ms"] <= P99_BUDGET_MS]
    return {
        "e2e_p50_ms": main["p50_ms"], "e2e_p95_ms": main["p95_ms"], "e2e_p99_ms": main["p99_ms"],
        "e2e_offered_rps": rate, "e2e_achieved_rps": main["achieved_rps"], "e2e_missing": main["missing"],
        "e2e_background_events_per_s": main["events_per_s"], "answered": main["answered"],
        "requests": main["requests"], "e2e_max_rps_p99_250ms": max(ok, default=0.0), "steps": stepped,
        "onset_events_per_s": onset["events_per_s"],
        # the policy learns every event in turn: a backlog that keeps growing means it does not keep up
        "e2e_learning_backlog_peak": main.get("backlog_peak"), "e2e_learning_backlog_end": main.get("backlog_end"),
        "e2e_learnt_events_per_s": main.get("learnt_per_s"),
    }


WARM_EVENTS = 3000


def _world():
    from driftrec.model.evaluation.world import World

    return World(n_users=200, n_items=400, seed=11)


async def _prewarm(settings: Settings, bootstrap: str) -> None:
    """The catalogue and the warm-up interactions, on the topics before the trainer and the worker start."""
    from driftrec.client import AsyncProducer

    world = _world()
    async with AsyncProducer(settings, bootstrap_servers=bootstrap) as p:
        await p.send_many(world.items)
        await p.send_many([dict(ev.to_wire(), event_time=time.time()) for ev in world.events(WARM_EVENTS)])


def _train_once(settings: Settings, bootstrap: str, run_dir: Path) -> dict[str, Any]:
    """``driftrec train --once`` on the warm-up interactions: the knowledge model the worker then serves."""
    import subprocess
    import sys

    env = child_env(settings, bootstrap, run_dir, DRIFTREC_RANKING__ENGINE="policy", DRIFTREC_METRICS__PORT="0",
                    DRIFTREC_TRAINER__MIN_EXAMPLES="100")
    out = run_dir / "train.json"
    done = subprocess.run([sys.executable, "-m", "driftrec.cli", "train", "--once", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    result = json.loads(out.read_text()) if out.is_file() else {}
    if done.returncode != 0 or result.get("outcome") != "promoted":
        raise RuntimeError(f"the knowledge model was not trained ({result.get('outcome')}): {done.stderr[-2000:]}")
    return result


def run(settings: Settings, repeats: int = 3, rate: float = 50.0, seconds: float = 30.0,
        event_rate: float = 2000.0, steps: tuple[float, ...] = (100.0, 200.0, 400.0),
        engine: str = "policy", model: bool = True) -> list[dict[str, Any]]:
    runs = []
    for _ in range(repeats):
        run_dir = Path(tempfile.mkdtemp(prefix="driftrec-bench-e2e-"))
        try:
            with broker(settings) as bootstrap, Children() as children:
                asyncio.run(_prewarm(settings, bootstrap))
                trained = _train_once(settings, bootstrap, run_dir) if engine == "policy" and model else None
                metrics_port = free_port()
                extra = {"DRIFTREC_METRICS__PORT": str(metrics_port), "DRIFTREC_RANKING__ENGINE": engine}
                if engine == "loop":
                    port = free_port()
                    url = f"http://127.0.0.1:{port}"
                    children.start("scorer", ["scorer", "--port", str(port)], child_env(settings, bootstrap, run_dir),
                                   run_dir / "scorer.log")
                    if not _wait_http(f"{url}/readyz", 180, children):
                        raise RuntimeError("scorer not ready")
                    extra["DRIFTREC_SCORER__URL"] = url
                children.start("worker", ["worker"], child_env(settings, bootstrap, run_dir, **extra),
                               run_dir / "worker.log")
                if not _wait_http(f"http://127.0.0.1:{metrics_port}/metrics", 120, children):
                    raise RuntimeError("the worker did not start")
                out = asyncio.run(_measure(settings, bootstrap, metrics_port, children, rate, seconds, event_rate,
                                           steps))
                out["engine"] = engine
                out["knowledge_model"] = trained.get("version") if trained else None
                runs.append(out)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
    return runs


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=("policy", "loop"), default="policy")
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--events", type=float, default=2000.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--no-model", action="store_true",
                    help="policy engine without a knowledge model (collaborative features only)")
    a = ap.parse_args()
    print(json.dumps(run(Settings.load(), repeats=1, rate=a.rate, seconds=a.seconds, event_rate=a.events,
                         engine=a.engine, model=not a.no_model), indent=2, default=str))
