"""``driftrec demo``: the whole loop on embedded defaults, on a fresh machine with no network.

Starts the embedded broker, the LM scorer and the Faust worker(s) as child processes, publishes a
synthetic catalogue, replays a synthetic world's interactions with a recommendation request every
few events, and prints the recommendations as they arrive on the recommendations topic. Stops after
``--events N`` (once every request has been answered, or a grace period passed) or on Ctrl-C, and
stops every process it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from driftrec.core.broker import broker, free_port
from driftrec.core.settings import Settings


_RUN_CONTROL_KEY = secrets.token_hex(32)


def child_env(settings: Settings, bootstrap: str, run_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for a child process that should share this run's broker and stores.

    Checkpoints (LoRA adapters, knowledge models) stay in the run's folder unless an adapter folder is
    configured (``model.adapter_dir`` in the settings file or ``DRIFTREC_MODEL__ADAPTER_DIR``): a demo or
    a benchmark must neither serve a model an earlier run left in ``.driftrec/adapters`` nor leave one
    there for the next ``driftrec worker``."""
    from driftrec.core.settings import ModelSettings

    env = dict(os.environ)
    adapters = settings.model.adapter_dir
    configured = "DRIFTREC_MODEL__ADAPTER_DIR" in os.environ or adapters != ModelSettings().adapter_dir
    env.update(
        DRIFTREC_KAFKA__BOOTSTRAP_SERVERS=bootstrap,
        DRIFTREC_KAFKA__BROKER_KIND="tansu" if settings.kafka.embedded else settings.kafka.broker_kind,
        DRIFTREC_STREAM__DATA_DIR=str(run_dir / "streams"),
        DRIFTREC_FEAST__REPO_DIR=str(run_dir / "feast"),
        DRIFTREC_MODEL__ADAPTER_DIR=str((adapters if adapters.is_absolute() else Path.cwd() / adapters)
                                        if configured else run_dir / "adapters"),
        PYTHONUNBUFFERED="1",
        DRIFTREC_API__PORT="0",  # several children on one host: each worker's API on a free port
    )
    if settings.security.control_key is None and "DRIFTREC_SECURITY__CONTROL_KEY" not in env:
        # this run's trainer and scorer sign and check adapter announcements with a key of their own
        env["DRIFTREC_SECURITY__CONTROL_KEY"] = _RUN_CONTROL_KEY
    env.update(extra)
    return env


class Children:
    """Child processes that are stopped (TERM, then KILL) when the block exits."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
        fh = open(log_path, "ab")
        proc = subprocess.Popen([sys.executable, "-m", "driftrec.cli", *argv], env=env, stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        fh.close()
        self.procs.append((name, proc))
        return proc

    def check(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}; see its log")

    def stop(self, timeout: float = 15.0) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc in self.procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> "Children":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _wait_http(url: str, timeout: float, children: Children) -> bool:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children.check()
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def run_demo(settings: Settings, *, events: int | None = 2000, workers: int = 1, users: int = 200, items: int = 400,
             request_every: int = 20, rate: float = 100.0, scorer: bool = True, trainer: bool = True, quiet: bool = False,
             grace_s: float = 90.0) -> int:
    from driftrec.model.evaluation.world import World

    world = World(n_users=users, n_items=items)
    titles = {it.item_id: f"{it.title} ({'/'.join(it.genres)})" for it in world.items}
    run_dir = Path(tempfile.mkdtemp(prefix="driftrec-demo-"))
    t0 = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    try:
        with broker(settings, share=True) as bootstrap, Children() as children:
            say(f"broker: {'embedded Tansu on ' if settings.kafka.embedded else ''}{bootstrap}; logs in {run_dir}")
            scorer_url = None
            policy = settings.ranking.engine == "policy"
            if policy:
                scorer = False  # the ranking policy scores in the worker (its knowledge model); no HTTP scorer
            if scorer:
                port = free_port()
                scorer_url = f"http://127.0.0.1:{port}"
                children.start("scorer", ["scorer", "--port", str(port)],
                               child_env(settings, bootstrap, run_dir), run_dir / "scorer.log")
            if trainer:
                children.start("trainer", ["train"], child_env(
                    settings, bootstrap, run_dir, DRIFTREC_METRICS__PORT="0",
                    DRIFTREC_TRAINER__EVERY_EVENTS=str(max(200, (events or 2000) // 5) if policy else max(500, (events or 2000) // 2)),
                ), run_dir / "trainer.log")
            for w in range(workers):
                children.start(f"worker-{w}", ["worker"], child_env(
                    settings, bootstrap, run_dir, DRIFTREC_METRICS__PORT="0",
                    DRIFTREC_SCORER__URL=scorer_url or "http://127.0.0.1:9",
                    DRIFTREC_STREAM__DATA_DIR=str(run_dir / f"streams-{w}"),
                ), run_dir / f"worker-{w}.log")
            say(f"started {workers} worker(s) ranking with the "
                + ("ranking policy (collaborative features + knowledge model)" if policy else "LM scorer loop")
                + (f", the LM scorer at {scorer_url}" if scorer else "")
                + ((" and the knowledge-model trainer" if policy else " and the adapter trainer") if trainer else ""))
            if scorer_url:
                if _wait_http(f"{scorer_url}/readyz", 180, children):
                    say("scorer ready")
                else:
                    say("scorer not ready after 180 s: recommendations use the fallback ranking")
            stats = asyncio.run(_drive(settings, bootstrap, world, titles, events, request_every, rate,
                                       scorer_url, children, say, quiet, grace_s, wait_ready=policy,
                                       wait_model=policy and trainer))
            say(f"done: {stats['events']} events, {stats['requests']} requests, "
                f"{stats['answered']} recommendations ({stats['fallback']} fallback)")
            for line in summary_lines(stats):
                say(line)
            if stats["answered"] < stats["requests"]:
                for log_file in sorted(run_dir.glob("*.log")):
                    tail = log_file.read_text(errors="replace").splitlines()[-25:]
                    print(f"--- last lines of {log_file.name} ---", *tail, sep="\n", file=sys.stderr)
            return 0 if stats["answered"] > 0 else 1
    except KeyboardInterrupt:
        say("interrupted; stopping")
        return 130
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


K = 10  # the demo's requests ask for a top-10: the online HR@10 below


_probe_ids = itertools.count(1)


async def _probe_until(producer, probes: dict, world, children, accept, timeout_s: float, waiting=None) -> dict | None:
    """Send a probe request (user ``demo-probe``, not in the world; its answers are not counted in the
    demo's figures) every second or so until an answer satisfies ``accept``; that answer, or None after
    ``timeout_s``. ``waiting()`` is called once, at the first answer that does not."""
    from driftrec.core.contracts import RecommendationRequest

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        req = RecommendationRequest(event_id=f"demo-probe-{next(_probe_ids)}", event_time=time.time(),
                                    user_id="demo-probe", k=K, domain=world.domain)
        fut = probes[req.event_id] = loop.create_future()
        await producer.send(req)
        try:
            rec = await asyncio.wait_for(fut, 5.0)
        except asyncio.TimeoutError:
            children.check()
            continue
        if accept(rec):
            return rec
        if waiting is not None:
            waiting()
            waiting = None
        children.check()
        await asyncio.sleep(1.0)
    return None


async def _wait_ranking_ready(producer, probes: dict, world, children, say, timeout_s: float = 180.0) -> bool:
    """Probe until a request is answered by the ranking policy (not its start-up fallback): the worker has
    read the catalogue and built its policy."""
    rec = await _probe_until(producer, probes, world, children, lambda r: not r.get("fallback"), timeout_s)
    if rec is None:
        say(f"the ranking policy was not ready after {timeout_s:.0f} s: early requests get the fallback ranking")
        return False
    say(f"ranking ready ({rec.get('model_version')})")
    return True


async def _wait_first_model(producer, probes: dict, world, children, say, timeout_s: float = 180.0) -> bool:
    """Probe until a request is ranked by a knowledge model the trainer promoted (a ``model_version``
    other than ``collaborative``), at most ``timeout_s``."""
    from driftrec.streams.policy_ranker import COLLABORATIVE

    loop = asyncio.get_running_loop()
    begun = loop.time()
    waited = False

    def waiting() -> None:
        nonlocal waited
        waited = True
        say(f"halfway: waiting for the trainer's first knowledge model (at most {timeout_s:.0f} s)")

    def by_a_model(rec: dict) -> bool:
        return not rec.get("fallback") and (rec.get("model_version") or COLLABORATIVE) != COLLABORATIVE

    rec = await _probe_until(producer, probes, world, children, by_a_model, timeout_s, waiting=waiting)
    if rec is None:
        say(f"no knowledge model from the trainer after {timeout_s:.0f} s: going on with the collaborative policy")
        return False
    if waited:
        say(f"the trainer's first knowledge model serves ({rec['model_version']}) after {loop.time() - begun:.1f} s")
    return True


class OnlineComparison:
    """Online HR@10 of the served lists against popularity, on the same points: each request, then the
    user's next positive (a click, or a rating >= 4) on an item new to the user (the protocol of
    ``driftrec evaluate``), produced after it. Popularity is the count of positives produced before the
    request, the user's own items excluded; "served" is the list the worker published for that request
    (a request without an answer counts as a miss)."""

    def __init__(self, k: int = K) -> None:
        self.k = k
        self.counts: dict[str, int] = {}
        self.seen: dict[str, set[str]] = {}
        self.waiting: dict[str, tuple[str, list[str]]] = {}  # user -> (request id, popularity's top-k then)
        self.points: list[tuple[str, list[str], str]] = []  # (request id, popularity's list, next positive)
        self.lists: dict[str, tuple[str, list[str], bool, str]] = {}  # request id -> (user, items, fallback, model)

    def produced(self, wire: dict) -> None:
        user = wire.get("user_id")
        if wire.get("type") == "recommendation_request":
            seen = self.seen.get(user, set())
            top = sorted((i for i in self.counts if i not in seen), key=lambda i: (-self.counts[i], i))[: self.k]
            self.waiting[user] = (wire["event_id"], top)
            return
        item = wire.get("item_id")
        positive = wire.get("type") == "click" or (wire.get("type") == "rating" and float(wire.get("rating", 0)) >= 4)
        if not positive:
            self.seen.setdefault(user, set()).add(item)
            return
        seen = self.seen.setdefault(user, set())
        if item not in seen:  # as driftrec evaluate: a positive on an item new to the user
            waiting = self.waiting.pop(user, None)
            if waiting is not None:
                self.points.append((waiting[0], waiting[1], item))
        self.counts[item] = self.counts.get(item, 0) + 1
        seen.add(item)

    def served(self, rec: dict) -> None:
        self.lists[rec["request_id"]] = (rec.get("user_id", ""), [i["item_id"] for i in rec.get("items") or []],
                                         bool(rec.get("fallback")), str(rec.get("model_version") or ""))

    def result(self) -> dict:
        n = len(self.points)
        served = sum(1 for rid, _, item in self.points if item in (self.lists.get(rid, ("", [], False, ""))[1][: self.k]))
        popular = sum(1 for _, top, item in self.points if item in top)
        firsts = {}
        for user, items, fallback, _ in self.lists.values():
            if items and not fallback:
                firsts[user] = items[0]  # the newest answer per user
        models = sorted({m for _, _, fb, m in self.lists.values() if not fb and m})
        return {"points": n, "served_hr": served / n if n else float("nan"), "popularity_hr": popular / n if n else float("nan"),
                "users": len(firsts), "distinct_first": len(set(firsts.values())), "models": models}


def _served_version(rec: dict) -> str:
    """What ranked a recommendation: the knowledge model's version under the ranking policy
    (``collaborative`` before the first one), the LoRA adapter's under the LM-scorer loop."""
    adapter = rec.get("adapter_version") or ""
    model = rec.get("model_version") or ""
    return f"adapter {adapter}" if adapter else f"model {model}" if model else ""


def summary_lines(stats: dict) -> list[str]:
    online = stats.get("online")
    if online is None:
        return []
    r = online.result()
    lines = []
    versions = stats.get("versions") or []
    if versions:
        lines.append(f"served in turn: {' -> '.join(versions)} ({len(versions) - 1} hot-swap(s) seen in the answers)")
    if r["users"]:
        lines.append(f"personalisation: {r['distinct_first']} different first items across the last lists of "
                     f"{r['users']} users (models served: {', '.join(r['models']) or 'none'})")
    if r["points"]:
        lines.append(f"online HR@{online.k} on the demo world ({r['points']} requests followed by a positive of the "
                     f"user on a new item): served {r['served_hr']:.3f} vs popularity {r['popularity_hr']:.3f}")
    else:
        lines.append(f"online HR@{online.k}: no request was followed by a positive interaction of its user")
    return lines


async def _drive(settings, bootstrap, world, titles, events, request_every, rate, scorer_url, children, say,
                 quiet, grace_s, wait_ready: bool = False, wait_model: bool = False) -> dict:
    from driftrec.client import AsyncProducer, subscribe

    stats = {"events": 0, "requests": 0, "answered": 0, "fallback": 0}
    pending: set[str] = set()
    probes: dict[str, asyncio.Future] = {}
    online = OnlineComparison(k=K)
    stats["online"] = online
    done_producing = asyncio.Event()

    async def consume() -> None:
        agen = subscribe(settings, bootstrap_servers=bootstrap, from_beginning=True)
        try:
            async for rec in agen:
                probe = probes.pop(rec.get("request_id"), None)
                if probe is not None and not probe.done():
                    probe.set_result(rec)
                if rec.get("request_id") not in pending:
                    continue
                pending.discard(rec["request_id"])
                online.served(rec)
                stats["answered"] += 1
                stats["fallback"] += bool(rec.get("fallback"))
                version = _served_version(rec)
                served = stats.setdefault("versions", [])
                if version and not rec.get("fallback") and (not served or version != served[-1]):
                    if served:
                        say(f"hot-swap: the worker now serves {version} (was {served[-1]})")
                    served.append(version)
                if not quiet:
                    picks = ", ".join(titles.get(i["item_id"], i["item_id"]) for i in rec["items"][:3])
                    tag = "fallback" if rec.get("fallback") else version or "base"
                    say(f"{rec['user_id']:>6} <- {picks}  [{tag}]")
                if done_producing.is_set() and not pending:
                    return
        finally:
            await agen.aclose()

    consumer = asyncio.create_task(consume())
    async with AsyncProducer(settings, bootstrap_servers=bootstrap) as producer:
        await producer.send_many(world.items)
        say(f"published a catalogue of {len(world.items)} items")
        if wait_ready:
            await _wait_ranking_ready(producer, probes, world, children, say)
        interval = 1.0 / rate if rate > 0 else 0.0
        started = time.monotonic()
        futures = []
        # Halfway through a bounded run the trainer has been triggered (it trains every events/5) but, on a
        # slow CPU, may not have promoted its first knowledge model yet: the demo then waits for it (bounded)
        # so that the second half of the requests shows the hot-swap instead of racing the trainer.
        midway = events // 2 if wait_model and events else None
        for ev in world.events(events if events is not None else 10**12, request_every=request_every):
            if midway is not None and stats["events"] >= midway:
                midway = None
                await asyncio.gather(*futures)
                futures.clear()
                paused = time.monotonic()
                await _wait_first_model(producer, probes, world, children, say)
                started += time.monotonic() - paused  # the pause does not count against the replay rate
            wire = ev.to_wire()
            wire["event_time"] = time.time()
            if wire["type"] == "recommendation_request":
                wire["k"] = K
                pending.add(wire["event_id"])
                stats["requests"] += 1
            else:
                stats["events"] += 1
            online.produced(wire)
            futures.append((await producer.send_nowait(wire))[1])
            if len(futures) >= 500:
                await asyncio.gather(*futures)
                futures.clear()
                children.check()
            if interval:
                ahead = started + (stats["events"] + stats["requests"]) * interval - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await asyncio.gather(*futures)
    done_producing.set()
    say(f"replayed {stats['events']} events and {stats['requests']} requests; waiting for the last answers")
    try:
        if pending:
            await asyncio.wait_for(consumer, timeout=grace_s)
        else:
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
    except asyncio.TimeoutError:
        say(f"{len(pending)} requests unanswered after {grace_s:.0f} s")
    return stats
