"""``driftrec evaluate --through-stream``: the replay's lists against what a real worker serves.

The in-process replay (protocol prequential-v1, :func:`driftrec.model.evaluation.prequential.evaluate`) and
a real stream - an embedded Tansu broker and a ``driftrec worker`` subprocess with
``ranking.engine=policy`` - see the same log, the same catalogue, the same knowledge model and, with
``--kg``, the same knowledge graph (the worker's ``ranking.kg_path``; the model is trained with it):

1. the knowledge model is trained on the warm-up prefix (the first ``warmup_frac`` of the events),
   published (:func:`~driftrec.model.knowledge.checkpoint.publish`) into the worker's
   ``<adapter_dir>/knowledge``, and loaded back verified; both sides serve that fixed model (no refit
   during the window: the replay's policy arm has no trainer);
2. the replay runs in process and records driftrec's top-k at every evaluation point;
3. the stream: the catalogue (one partition per topic, so the follower's order is the log's), then the
   events; before each evaluation point's event the driver waits until the worker has observed every
   event produced so far (``driftrec_ranking_observed_total``), sends a recommendation request timed at
   the event, waits for the answer, and only then produces the event.

The report: the share of served lists identical to the replay's, and HR@k / NDCG@k of the served lists
next to the replay's on the same points (the replay's own metric breaks score ties uniformly in
expectation; ``replay_lists`` is the replay's lists scored like the served ones).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from driftrec.core.settings import RankingSettings, Settings

log = logging.getLogger(__name__)

OBSERVED = "driftrec_ranking_observed_total"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{.*\})?\s+([-+0-9.eEinfNa]+)$")


class ThroughStreamError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------- the worker


class WorkerProcess:
    """``driftrec worker`` as a child process with its settings in a YAML file; output collected."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        import yaml

        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "worker.yaml"
        config.write_text(yaml.safe_dump(json.loads(settings.dump_without_secrets())))
        env = {k: v for k, v in os.environ.items() if not k.startswith("DRIFTREC_")}
        env.update({"DRIFTREC_CONFIG": str(config), "DRIFTREC_RANKING__ENGINE": "policy", "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "driftrec.cli", "worker"], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._port: int | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise ThroughStreamError(f"the worker exited ({self.proc.returncode}):\n{self.tail()}")

    async def metrics_port(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        rx = re.compile(r"metrics on [^:\s]+:(\d+)")
        while self._port is None:
            for line in list(self.lines):
                m = rx.search(line)
                if m:
                    self._port = int(m.group(1))
                    break
            else:
                self.alive()
                if time.monotonic() > deadline:
                    raise ThroughStreamError(f"the worker did not start in {timeout:.0f}s:\n{self.tail()}")
                await asyncio.sleep(0.1)
        return self._port

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self._port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            m = _SAMPLE.match(line)
            if m and m.group(1) == name:
                total += float(m.group(2))
        return total

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        return self.proc.returncode


def stream_settings(base: Settings, bootstrap: str, workdir: Path, ranking: RankingSettings) -> Settings:
    """``base`` pointed at ``bootstrap`` (as Tansu), with every topic on one partition (the follower's
    order is the produce order), its own state folders under ``workdir`` and ``ranking``."""
    data = json.loads(base.dump_without_secrets())
    data["kafka"].update({"bootstrap_servers": bootstrap, "broker_kind": "tansu", "security_protocol": "PLAINTEXT"})
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "sasl_username"):  # the embedded broker is plaintext
        data["kafka"].pop(key, None)
    for spec in data["topics"].values():
        spec["partitions"] = 1
    data["stream"]["data_dir"] = str(workdir / "streams")
    data["feast"].update({"repo_dir": str(workdir / "feast"), "sqlite_path": None})
    data["model"]["adapter_dir"] = str(workdir / "adapters")
    data["metrics"]["port"] = 0
    data["api"]["port"] = 0
    data["ranking"] = ranking.model_dump()
    return Settings(**data)


# ----------------------------------------------------------------------------------- the driver


def train_and_publish(log_, cfg, events, n_warm: int, item_ids: list[str], root: Path, *, domain: str,
                      version: str):
    """Train the knowledge model on the warm-up prefix, publish it under ``root`` and load it back verified
    (the model both sides serve); None without a model (``cfg.use_lm`` False)."""
    if not cfg.use_lm:
        return None, None
    from driftrec.model.knowledge.checkpoint import load_knowledge, publish
    from driftrec.model.knowledge.seqrec import KnowledgeTrainer

    hist: dict[str, list[tuple[str, float]]] = {}
    for e in events[:n_warm]:
        hist.setdefault(e.user, []).append((e.item, e.rating))
    from driftrec.model.knowledge.graph import load_catalogue_graph

    kg = load_catalogue_graph(cfg.kg, log_.items)  # None without --kg; loaded as the worker's trainer does
    trainer = KnowledgeTrainer(log_.items, item_ids, text=True, kg=kg, kg_alpha=cfg.kg_alpha, seed=cfg.seed,
                               **cfg.model)
    stats = trainer.fit(list(hist.items()), initial=True)
    folder = publish(trainer, root, version, domain)
    return load_knowledge(folder, log_.items), stats


def replay_fixed(log_, cfg, model, item_ids: list[str], *, progress: bool = False) -> tuple[dict, list[dict]]:
    """The replay with ``model`` fixed (no refit) and, with ``cfg.kg``, the graph's features; returns its
    result and driftrec's top-k per evaluation."""
    from driftrec.model.evaluation.arms import PolicyArm, SourceArm
    from driftrec.model.evaluation.prequential import SYSTEM, evaluate
    from driftrec.model.ranking.policy import RankingPolicy

    from driftrec.streams.policy_learner import policy_graph

    # the graph's candidate source exactly as the worker builds it from ranking.kg_path (used whatever the
    # replay's warm-up gate says: a worker given a graph uses it; the gate's reading is in the result)
    graph = policy_graph(cfg.kg, log_.items, cfg.positive_threshold)
    policy = RankingPolicy(cfg.policy_config(), log_.items, item_ids, model=model, kg=graph)
    arms: dict[str, Any] = {SYSTEM: PolicyArm(SYSTEM, policy, None)}
    for name, src in (("popularity", policy.pop), ("decayed_popularity", policy.dpop), ("itemknn", policy.knn)):
        arms[name] = SourceArm(name, src)
    points: list[dict] = []
    result = evaluate(log_, cfg, progress=progress, arms=arms, on_evaluation=points.append)
    result["policy_features"] = list(policy.feature_names)
    return result, points


def list_metrics(lists: list[list[str]], targets: list[str], k: int) -> dict:
    hr = ndcg = 0.0
    for top, target in zip(lists, targets):
        top = top[:k]
        if target in top:
            hr += 1.0
            ndcg += 1.0 / math.log2(top.index(target) + 2)
    n = max(len(targets), 1)
    return {f"hr@{k}": hr / n, f"ndcg@{k}": ndcg / n}


async def produce_catalogue(item_ids: list[str], items: dict, settings: Settings) -> None:
    """The catalogue, in the replay's item order (one partition keeps it), before the worker starts: its
    policy is built over the whole catalogue, as the replay's."""
    from aiokafka import AIOKafkaProducer

    from driftrec.core.contracts import Item

    from driftrec.core.kafka_auth import client_options

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all",
                                enable_idempotence=False, linger_ms=5, **client_options(settings.kafka))
    await producer.start()
    try:
        now = time.time()
        futs = []
        for iid in item_ids:
            it = items[iid]
            item = Item(event_id=f"item-{iid}", event_time=now, item_id=iid, title=it.title, genres=list(it.genres),
                        year=it.year, tags=list(it.tags), description=it.description)
            futs.append(await producer.send(settings.topics.items.name, key=iid.encode(),
                                            value=json.dumps(item.to_wire()).encode()))
        await asyncio.gather(*futs)
    finally:
        await producer.stop()


async def drive_stream(events, points: list[dict], settings: Settings, worker: WorkerProcess, *, k: int,
                       timeout_s: float = 60.0, progress: bool = False) -> list[dict]:
    """Produce the events, asking the worker at every evaluation point (see the module docstring); returns
    the served recommendation per evaluation point, in order."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from driftrec.core.contracts import Rating, RecommendationRequest

    t = settings.topics
    bootstrap = settings.kafka.bootstrap_servers
    at = {pt["position"]: pt for pt in points}
    from driftrec.core.kafka_auth import client_options

    security = client_options(settings.kafka)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False, linger_ms=2,
                                **security)
    consumer = AIOKafkaConsumer(t.recommendations.name, bootstrap_servers=bootstrap, group_id=None, **security,
                                auto_offset_reset="earliest", enable_auto_commit=False, fetch_max_wait_ms=20)
    await producer.start()
    await consumer.start()
    answers: dict[str, asyncio.Future] = {}
    loop = asyncio.get_running_loop()

    async def collect() -> None:
        async for rec in consumer:
            body = json.loads(rec.value)
            fut = answers.setdefault(body.get("request_id", ""), loop.create_future())
            if not fut.done():
                fut.set_result(body)

    collector = asyncio.create_task(collect())
    served: list[dict] = []
    try:
        await worker.metrics_port(timeout_s * 3)
        pending: list = []
        produced = 0
        t0 = time.monotonic()
        for p, e in enumerate(events):
            pt = at.get(p)
            if pt is not None:
                await asyncio.gather(*pending)
                pending.clear()
                await _wait_observed(worker, produced, timeout_s * (3 if not served else 1))
                rid = f"through-stream-{p}"
                req = RecommendationRequest(event_id=rid, event_time=float(e.timestamp), user_id=e.user, k=k)
                fut = answers.setdefault(rid, loop.create_future())
                await producer.send_and_wait(t.requests.name, key=e.user.encode(),
                                             value=json.dumps(req.to_wire()).encode())
                try:
                    body = await asyncio.wait_for(asyncio.shield(fut), timeout_s)
                except asyncio.TimeoutError:
                    worker.alive()
                    raise ThroughStreamError(f"no recommendation for request {rid} in {timeout_s:.0f}s:\n"
                                             f"{worker.tail()}") from None
                served.append({"position": p, "user": e.user, "item": e.item, "body": body})
                if progress and len(served) % 50 == 0:
                    print(f"through-stream: {len(served)}/{len(points)} requests, event {p}/{len(events)}, "
                          f"{time.monotonic() - t0:.0f}s", file=sys.stderr)
            ev = Rating(event_id=f"through-stream-e{p}", event_time=float(e.timestamp), user_id=e.user,
                        item_id=e.item, rating=float(e.rating))
            pending.append(await producer.send(t.ratings.name, key=e.user.encode(),
                                               value=json.dumps(ev.to_wire()).encode()))
            produced += 1
        await asyncio.gather(*pending)
        return served
    finally:
        collector.cancel()
        await asyncio.gather(collector, return_exceptions=True)
        await consumer.stop()
        await producer.stop()


async def _wait_observed(worker: WorkerProcess, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    interval = 0.005
    while True:
        try:
            if await asyncio.to_thread(worker.metric, OBSERVED) >= n:
                return
        except OSError:
            pass
        worker.alive()
        if time.monotonic() > deadline:
            raise ThroughStreamError(f"the worker observed fewer than {n} events in {timeout:.0f}s:\n{worker.tail()}")
        await asyncio.sleep(interval)
        interval = min(interval * 1.5, 0.05)


def run_through_stream(log_, cfg, workdir: str | os.PathLike, *, bootstrap: str | None = None,
                       base_settings: Settings | None = None, version: str = "through-stream-1",
                       timeout_s: float = 60.0, progress: bool = False) -> dict:
    """Train, replay in process, run the same log through a broker and a worker; returns the comparison.

    ``bootstrap``: a running broker (its topics must not hold driftrec data yet); None starts an embedded
    Tansu broker for the run. ``base_settings``: the worker's other settings (default ``Settings()``)."""
    from driftrec.core.broker import EmbeddedBroker, create_topics
    from driftrec.model.evaluation.prequential import SYSTEM
    from driftrec.model.knowledge.checkpoint import knowledge_root

    if cfg.kg and (cfg.kg_link or cfg.kg_format != "auto"):
        raise ValueError("the worker loads a graph from one path (ranking.kg_path): no kg_link / kg_format")
    t_start = time.perf_counter()
    workdir = Path(workdir)
    events = log_.events[: cfg.limit] if cfg.limit else log_.events
    n_warm = int(cfg.warmup_frac * len(events))
    item_ids = list(log_.items)
    missing = sorted({e.item for e in events} - set(item_ids))
    if missing:
        raise ValueError(f"{len(missing)} item(s) of the events are not in the catalogue (e.g. {missing[0]!r})")
    base = base_settings or Settings()
    ranking = RankingSettings(engine="policy", **cfg.policy_config().as_dict(),
                              model_watch_interval_s=base.ranking.model_watch_interval_s,
                              kg_path=str(Path(cfg.kg).resolve()) if cfg.kg else None)
    broker = None
    if bootstrap is None:
        broker = EmbeddedBroker().start(base.kafka.broker_startup_timeout_s)
        bootstrap = broker.bootstrap_servers
    worker = None
    try:
        settings = stream_settings(base, bootstrap, workdir, ranking)
        domain = settings.model.default_domain
        t0 = time.perf_counter()
        model, fit = train_and_publish(log_, cfg, events, n_warm, item_ids,
                                       knowledge_root(settings.model.adapter_dir), domain=domain,
                                       version=version)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result, points = replay_fixed(log_, cfg, model, item_ids, progress=progress)
        replay_s = time.perf_counter() - t0
        asyncio.run(create_topics(bootstrap, settings))
        asyncio.run(produce_catalogue(item_ids, log_.items, settings))
        worker = WorkerProcess(settings, workdir / "worker")
        t0 = time.perf_counter()
        served = asyncio.run(drive_stream(events, points, settings, worker, k=cfg.k, timeout_s=timeout_s,
                                          progress=progress))
        stream_s = time.perf_counter() - t0
    finally:
        if worker is not None:
            worker.stop()
        if broker is not None:
            broker.stop()
    return compare(points, served, result, cfg.k, model_version=None if model is None else model.version,
                   extra={"train": fit, "seconds": {"train": round(train_s, 2), "replay": round(replay_s, 2),
                                                    "stream": round(stream_s, 2),
                                                    "total": round(time.perf_counter() - t_start, 2)},
                          "events": len(events), "warmup_events": n_warm, "items": len(item_ids),
                          "replay_result": result["results"][SYSTEM],
                          "policy_features": result.get("policy_features"), "kg": cfg.kg})


def compare(points: list[dict], served: list[dict], result: dict, k: int, *, model_version: str | None,
            extra: dict | None = None) -> dict:
    """The served lists against the replay's at the same points."""
    assert [p["position"] for p in points] == [s["position"] for s in served], "evaluation points differ"
    replay_lists = [p["top"] for p in points]
    served_lists = [[it["item_id"] for it in s["body"]["items"]] for s in served]
    targets = [p["item"] for p in points]
    same = [a == b[:k] for a, b in zip(replay_lists, served_lists)]
    n = len(points)
    mismatches = [{"position": p["position"], "user": p["user"], "replay": a, "served": b}
                  for p, a, b, ok in zip(points, replay_lists, served_lists, same) if not ok]
    return {
        "evaluations": n,
        "identical": int(sum(same)),
        "identical_share": (sum(same) / n) if n else 1.0,
        "fallbacks": sum(1 for s in served if s["body"].get("fallback")),
        "served_model_versions": sorted({s["body"].get("model_version", "") for s in served}),
        "model_version": model_version,
        "served": list_metrics(served_lists, targets, k),
        "replay_lists": list_metrics(replay_lists, targets, k),
        "replay": {key: v for key, v in result["results"]["driftrec"].items() if key != "cold"},
        "mismatches": mismatches[:20],
        **(extra or {}),
    }


def print_report(report: dict, k: int = 10) -> None:
    hr, nd = f"hr@{k}", f"ndcg@{k}"
    print(f"through-stream: {report['evaluations']} evaluations over {report['events']} events "
          f"({report['warmup_events']} warm-up), model {report['model_version'] or 'none (collaborative)'}, "
          f"{report['seconds']['total']:.0f}s")
    print(f"identical top-{k} lists: {report['identical']}/{report['evaluations']} "
          f"({100 * report['identical_share']:.1f}%), fallbacks {report['fallbacks']}")
    print(f"{'':<28} {'HR@' + str(k):>8} {'NDCG@' + str(k):>9}")
    for name, m in (("served (worker)", report["served"]), ("replay lists", report["replay_lists"]),
                    ("replay (prequential-v1)", report["replay"])):
        print(f"{name:<28} {m[hr]:>8.4f} {m[nd]:>9.4f}")


def through_stream_main(argv: list[str] | None = None) -> int:
    """``driftrec evaluate --through-stream [--limit N] ...``: the evaluate options, plus the stream run."""
    import tempfile

    from driftrec.model.evaluation.movielens import DataError, load
    from driftrec.model.evaluation.prequential import _config, build_parser

    parser = build_parser()
    parser.add_argument("--workdir", help="folder for the broker-side state (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.kg and (args.kg_link or args.kg_format != "auto"):
        print("error: --through-stream takes --kg as the worker loads it (ranking.kg_path: a folder with *.kg "
              "[+ *.link], or a triples file), without --kg-link / --kg-format", file=sys.stderr)
        return 2
    try:
        log_ = load(args.data, args.format)
        cfg = _config(args)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg.ablate, cfg.baselines = (), ()  # the comparison is the system's alone
    with tempfile.TemporaryDirectory(prefix="driftrec-through-stream-") as tmp:
        report = run_through_stream(log_, cfg, args.workdir or tmp, progress=not args.quiet)
    print_report(report, cfg.k)
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(report, indent=2, default=str))
    return 0
