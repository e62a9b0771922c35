"""``driftrec train``: the incremental training worker (long-running, or one-shot with ``--once``).

One run (:meth:`TrainingWorker.run_once`): the newest ``trainer.window_events`` clicks and ratings (plus
the recommendations that were shown) are turned into examples (:mod:`driftrec.model.training.examples`); the newest
``trainer.holdout_frac`` of them are held out. The domain's current adapter is trained further for at most
``trainer.max_steps`` steps (:class:`driftrec.model.training.drift_trainer.DriftTrainer`, replay buffer), then the gate
(:mod:`driftrec.model.training.gate`) compares it with the adapter now serving on the holdout. A promoted candidate becomes a
new checkpoint version, is marked active in the registry and announced on the adapters topic; a rejected
one is discarded (the trainer goes back to the serving weights). ``driftrec_trainer_runs_total{outcome}``
counts promoted / rejected / skipped / failed runs.

Triggers (long-running mode): every ``trainer.every_events`` new interactions or ``trainer.every_s``
seconds (with at least one new interaction), and at once when the River drift detector on the online
error of the serving adapter fires (:class:`driftrec.model.training.gate.OnlineMonitor`, recommendations joined with the
feedback that followed). After a promotion, :class:`driftrec.model.training.gate.RollbackPolicy` compares the windowed
online HR@10 of the new version with the previous one and announces a rollback when it is worse.

Resume: on start the trainer loads the registry's active checkpoint of the domain and continues from it;
new versions are numbered after the highest existing one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Sequence

from driftrec.core import metrics
from driftrec.core.kafka_auth import client_options
from driftrec.core.signing import signed
from driftrec.model.adapters import BASE_VERSION, CheckpointError, load_checkpoint
from driftrec.model.training.gate import Gate, ItemMatrixCache, OnlineMonitor, Publisher, RollbackPolicy, evaluate_model
from driftrec.model.training.examples import ExampleBuilder, build_training_set, decode, interaction_from
from driftrec.model.training.runs import RunResult, finish_run
from driftrec.core.contracts import AdapterAnnouncement, Item

log = logging.getLogger(__name__)



class TrainingWorker:
    """Trainer + gate + publisher for one domain (no Kafka here: events are passed in)."""

    def __init__(
        self,
        settings,
        domain: str | None = None,
        *,
        items: Iterable[Item] = (),
        encoder=None,
        tokenizer=None,
        trainer=None,
        announce=None,
        seed: int = 0,
    ) -> None:
        from driftrec.model.training.drift_trainer import DriftTrainer
        from driftrec.model.lm import DevicePlan, load_encoder, load_tokenizer

        import torch

        self.settings = settings
        self.ts = settings.trainer
        self.domain = domain or settings.model.default_domain
        self.adapter_dir = Path(settings.model.adapter_dir)
        self.max_length = int(settings.model.max_length)
        model_path = settings.model.model_path or None
        self.encoder = encoder if encoder is not None else load_encoder(model_path, DevicePlan(torch.device("cpu"), torch.float32))
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path)
        self.trainer = trainer if trainer is not None else DriftTrainer(
            settings, encoder=self.encoder, tokenizer=self.tokenizer, seed=seed)
        self.publisher = Publisher(self.adapter_dir, self.domain, announce,
                                   keep_versions=settings.model.keep_versions)
        self.registry = self.publisher.registry
        self.gate = Gate(self.ts.gate_tolerance)
        self.policy = RollbackPolicy(self.ts.rollback_min_count, self.ts.rollback_tolerance)
        self.monitor = OnlineMonitor(self.ts.online_window, min_updates=max(30, self.ts.online_window // 4))
        self.items: dict[str, Item] = {}
        self.item_cache = ItemMatrixCache()
        self._serving_models: dict[str, Any] = {}
        self.seed = seed
        self.runs: list[RunResult] = []
        self.promoted: list[str] = []
        self._watch_rollback: set[str] = set()
        self.set_items(items)
        self.serving_version = self.resume()

    # ------------------------------------------------------------------------------ state
    def set_items(self, items: Iterable[Item]) -> None:
        for it in items:
            if (it.domain or self.settings.model.default_domain) == self.domain:
                self.items[it.item_id] = it
        self.trainer.negative_pool = [it.text() for it in self.items.values()]

    def resume(self) -> str:
        """Continue from the registry's active checkpoint (else the bare base model)."""
        active = self.registry.active(self.domain)
        if not active or active == BASE_VERSION:
            log.info("trainer for %s starts from the base model (no active adapter)", self.domain)
            return BASE_VERSION
        try:
            self.trainer.load_adapter(self.registry.path_for(self.domain, active), self.adapter_dir)
        except (CheckpointError, OSError) as exc:
            log.error("cannot resume from %s/%s (%s); starting from the base model", self.domain, active, exc)
            return BASE_VERSION
        log.info("trainer for %s resumes from active adapter %s", self.domain, active)
        return active

    def serving_model(self, version: str | None = None):
        version = version or self.serving_version
        if version == BASE_VERSION:
            return self.encoder
        model = self._serving_models.get(version)
        if model is None:
            model, _ = load_checkpoint(self.registry.path_for(self.domain, version), self.adapter_dir, self.encoder, merge=True)
            self._serving_models = {version: model}  # keep one: the serving version
        return model

    def evaluate(self, model, cases, cache_key=None) -> dict[str, float]:
        return evaluate_model(model, self.tokenizer, list(self.items.values()), cases, max_length=self.max_length,
                              item_cache=self.item_cache if cache_key is not None else None, cache_key=cache_key)

    def owns(self, event: dict) -> bool:
        """Whether an event (wire dict) belongs to this worker's domain (no domain = the default domain)."""
        return (event.get("domain") or self.settings.model.default_domain) == self.domain

    def builder(self) -> ExampleBuilder:
        return ExampleBuilder(self.items.get, history_items=self.ts.history_items, hard_negatives=self.ts.hard_negatives,
                              augment=self.ts.augment, augment_prob=self.ts.augment_prob, seed=self.seed + len(self.runs))

    # -------------------------------------------------------------------------------- run
    def run_once(self, events: Sequence[Any], *, trigger: str = "manual", max_steps: int | None = None,
                 context: Sequence[Any] = ()) -> RunResult:
        """Train on ``events`` (time order), gate, publish + announce if promoted.

        ``context``: older events (time order, before ``events``) that only fill the users' histories.
        """
        t0 = time.perf_counter()
        try:
            builder = self.builder()
            for e in context:
                builder.holdout_case(e)
            tset = build_training_set(events, builder, holdout_frac=self.ts.holdout_frac)
        except Exception as exc:  # noqa: BLE001
            log.exception("building the training set failed")
            return self._finish(RunResult("failed", trigger, serving_version=self.serving_version,
                                          error=f"{type(exc).__name__}: {exc}"), t0)
        return self.train_and_gate(tset.examples, tset.holdout, window=tset.window, trigger=trigger,
                                   max_steps=max_steps, t0=t0)

    def train_and_gate(self, examples: Sequence[Any], holdout: Sequence[Any], *, window: dict | None = None,
                       trigger: str = "manual", max_steps: int | None = None, t0: float | None = None) -> RunResult:
        """Continue training on ``examples``; promote (save, mark active, announce) if the gate passes."""
        t0 = time.perf_counter() if t0 is None else t0
        result = RunResult("skipped", trigger, serving_version=self.serving_version)
        try:
            result.examples, result.holdout = len(examples), len(holdout)
            if len(examples) < self.ts.min_examples or not holdout:
                log.info("training run skipped: %d examples, %d holdout cases (min %d)", len(examples),
                         len(holdout), self.ts.min_examples)
                return self._finish(result, t0)
            before = self.trainer.lora_state()
            t1 = time.perf_counter()
            stats = self.trainer.update(examples, max_steps=max_steps)
            result.train_seconds = time.perf_counter() - t1
            result.stats = stats.as_dict()
            for _ in range(stats.steps):
                metrics.TRAINER_STEP_SECONDS.observe(result.train_seconds / stats.steps)
            t2 = time.perf_counter()
            cand = self.evaluate(self.trainer.model, holdout)
            serv = self.evaluate(self.serving_model(), holdout, cache_key=("serving", self.serving_version,
                                                                            len(self.items)))
            decision = self.gate.decide(cand, serv, serving_version=self.serving_version)
            result.gate_seconds = time.perf_counter() - t2
            result.decision = decision.as_dict()
            if decision.promote:
                n_before = len(self.publisher.announced)
                version, path, _ = self.publisher.publish(self.trainer, {
                    "training_window": window or {"events": len(examples)},
                    "metrics": {"hr@10": cand["hr@10"], "ndcg@10": cand["ndcg@10"], "holdout": cand["n"],
                                "serving_hr@10": serv["hr@10"], "serving_ndcg@10": serv["ndcg@10"]},
                    "parent": self.serving_version,
                    "trigger": trigger,
                })
                decision.version = version
                result.decision = decision.as_dict()
                result.version = version
                result.announcements = self.publisher.announced[n_before:]
                self._watch_rollback.add(version)
                self.promoted.append(version)
                self.serving_version = version
                result.outcome = "promoted"
            else:
                self.trainer.restore_lora_state(before)
                result.outcome = "rejected"
        except Exception as exc:  # noqa: BLE001 - a failed run must not kill the worker
            log.exception("training run failed")
            result.outcome = "failed"
            result.error = f"{type(exc).__name__}: {exc}"
        return self._finish(result, t0)

    def _finish(self, result: RunResult, t0: float) -> RunResult:
        return finish_run(self.runs, result, t0, "training run")

    # ---------------------------------------------------------------------------- online
    def observe(self, event: Any) -> None:
        """Online monitoring: a recommendation (what was shown) or an interaction (feedback)."""
        data = event.asdict() | {"type": getattr(event, "TYPE", "")} if hasattr(event, "asdict") else event
        if not isinstance(data, dict):
            return
        if data.get("type") == "recommendation":
            self.monitor.on_recommendation(data)
            return
        it = interaction_from(data)
        if it is not None:
            self.monitor.on_feedback(it.user_id, it.item_id, positive=it.rating is None or it.rating >= 4.0,
                                     event_time=it.event_time, recommendation_id=it.recommendation_id)

    def check_rollback(self) -> AdapterAnnouncement | None:
        """Roll back the active version when its online HR@10 is worse than the previous one's."""
        active = self.registry.active(self.domain)
        if active not in self._watch_rollback:
            return None
        previous = self.registry.previous(self.domain)
        do, reason = self.policy.should_rollback(self.monitor, active, previous)
        if not do:
            return None
        log.warning("rolling back %s/%s: %s", self.domain, active, reason)
        self._watch_rollback.discard(active)
        n_before = len(self.publisher.announced)
        target, _ = self.publisher.rollback()
        if target is None:
            return None
        self.serving_version = target
        if target != BASE_VERSION:
            try:
                self.trainer.load_adapter(self.registry.path_for(self.domain, target), self.adapter_dir)
            except CheckpointError as exc:
                log.error("rolled back to %s but cannot load it into the trainer: %s", target, exc)
        return self.publisher.announced[n_before]


def training_worker(settings, domain: str | None = None, *, items: Iterable[Item] = ()):
    """The trainer ``driftrec train`` runs: the knowledge model's
    (:class:`~driftrec.model.training.knowledge_worker.KnowledgeTrainingWorker`) for ``ranking.engine:
    policy``, else the scorer's LoRA adapter's (:class:`TrainingWorker`)."""
    if settings.ranking.engine == "policy":
        from driftrec.model.training.knowledge_worker import KnowledgeTrainingWorker

        return KnowledgeTrainingWorker(settings, domain, items=items)
    return TrainingWorker(settings, domain, items=items)


# ------------------------------------------------------------------------------------ Kafka


async def read_tail(bootstrap: str, topics: Sequence[str], max_records: int, *, from_beginning: bool = False,
                    timeout_s: float = 30.0, security: dict | None = None) -> list[dict]:
    """The newest ``max_records`` records per topic (all with ``from_beginning``), decoded, unordered;
    ``security``: :func:`driftrec.core.kafka_auth.client_options`."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from driftrec.core.broker import true_end_offsets

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", **(security or {}))
    await consumer.start()
    out: list[dict] = []
    try:
        await consumer.topics()
        tps = []
        for topic in topics:
            parts = consumer.partitions_for_topic(topic) or set()
            tps.extend(TopicPartition(topic, p) for p in sorted(parts))
        if not tps:
            return out
        consumer.assign(tps)
        ends = await true_end_offsets(consumer, tps)
        begins = await consumer.beginning_offsets(tps)
        per_topic_parts: dict[str, int] = {}
        for tp in tps:
            per_topic_parts[tp.topic] = per_topic_parts.get(tp.topic, 0) + 1
        todo = {}
        for tp in tps:
            end, begin = int(ends.get(tp, 0)), int(begins.get(tp, 0))
            share = math.ceil(max_records / per_topic_parts[tp.topic])
            start = begin if from_beginning else max(begin, end - share)
            if end > start:
                consumer.seek(tp, start)
                todo[tp] = end
        deadline = time.monotonic() + timeout_s
        while todo and time.monotonic() < deadline:
            batch = await consumer.getmany(*todo.keys(), timeout_ms=300, max_records=2000)
            for tp, msgs in batch.items():
                for m in msgs:
                    if m.offset < todo.get(tp, 0):
                        data = decode(m.value)
                        if data is not None:
                            out.append(data)
            for tp in list(todo):
                if await consumer.position(tp) >= todo[tp]:
                    del todo[tp]
        if todo:
            log.warning("read_tail: %d partition(s) not read to the end within %.0fs", len(todo), timeout_s)
    finally:
        await consumer.stop()
    return out


def order_events(records: Iterable[dict]) -> list[dict]:
    """Interactions and recommendations in event-time order (stable), duplicates (event_id) dropped."""
    seen: set[str] = set()
    out = []
    for r in records:
        eid = r.get("event_id")
        if isinstance(eid, str):
            if eid in seen:
                continue
            seen.add(eid)
        out.append(r)
    return sorted(out, key=lambda r: float(r.get("event_time") or 0.0) if isinstance(r.get("event_time"), (int, float)) else 0.0)


def split_context(events: Sequence[dict], window: int) -> tuple[list[dict], list[dict]]:
    """(older events that only fill histories, the newest ``window`` interactions with their recommendations)."""
    n = 0
    cut = 0
    for i in range(len(events) - 1, -1, -1):
        if events[i].get("type") in ("click", "rating"):
            n += 1
            if n > window:
                cut = i + 1
                break
    return list(events[:cut]), list(events[cut:])


def items_from_records(records: Iterable[dict]) -> list[Item]:
    from driftrec.model.catalogue import item_from_dict

    latest: dict[str, Item] = {}
    for r in records:
        if r.get("type") not in (None, "item"):
            continue
        try:
            it = item_from_dict(r)
        except (ValueError, TypeError):
            continue
        latest[it.item_id] = it
    return list(latest.values())


class KafkaAnnouncer:
    """Publishes :class:`AdapterAnnouncement` records on the adapters topic (acks=all, no idempotence)."""

    def __init__(self, settings, bootstrap: str) -> None:
        self.settings = settings
        self.topic = settings.topics.adapters.name
        self.bootstrap = bootstrap
        self.key = settings.security.control_key_bytes()  # unsigned without a key: scorers then ignore it
        self._producer = None

    async def start(self) -> "KafkaAnnouncer":
        from aiokafka import AIOKafkaProducer

        from driftrec.core.kafka_auth import client_options

        self._producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=False,
                                          **client_options(self.settings.kafka))
        await self._producer.start()
        return self

    async def send(self, ann: AdapterAnnouncement) -> None:
        wire = signed(ann.to_wire(), self.key)
        await self._producer.send_and_wait(self.topic, json.dumps(wire).encode(), key=ann.domain.encode())
        log.info("announced %s %s/%s on %s", ann.action, ann.domain, ann.version, self.topic)

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()


async def _load_items(settings, bootstrap: str, catalogue: str | None) -> list[Item]:
    items = items_from_records(await read_tail(bootstrap, [settings.topics.items.name], 0, from_beginning=True,
                                               security=client_options(settings.kafka)))
    if catalogue:
        from driftrec.model.catalogue import Catalogue

        cat = Catalogue()
        cat.load_jsonl(catalogue)
        items.extend(cat.view(None).items.values())
    return items


async def train_once(settings, bootstrap: str, domain: str | None = None, *, catalogue: str | None = None,
                     worker: TrainingWorker | None = None) -> RunResult:
    """One run from the broker: read the window, train, gate, announce."""
    ts = settings.trainer
    topics = [settings.topics.clicks.name, settings.topics.ratings.name, settings.topics.recommendations.name]
    items = await _load_items(settings, bootstrap, catalogue)
    events = order_events(await read_tail(bootstrap, topics, ts.window_events + ts.context_events,
                                          security=client_options(settings.kafka)))
    if worker is None:
        worker = await asyncio.to_thread(training_worker, settings, domain, items=items)
    else:
        worker.set_items(items)
    evs = [e for e in events if worker.owns(e)]
    context, evs = split_context(evs, ts.window_events)
    result = await asyncio.to_thread(worker.run_once, evs, trigger="once", context=context)
    if result.announcements:
        ann = await KafkaAnnouncer(settings, bootstrap).start()
        try:
            for a in result.announcements:
                await ann.send(a)
        finally:
            await ann.stop()
    return result


async def run_forever(settings, bootstrap: str, domain: str | None = None, *, catalogue: str | None = None,
                      stop: asyncio.Event | None = None, worker: TrainingWorker | None = None) -> None:
    """The long-running worker: follow the streams, train on schedule or drift, gate, roll back."""
    from aiokafka import AIOKafkaConsumer

    ts = settings.trainer
    stop = stop or asyncio.Event()
    topics = [settings.topics.clicks.name, settings.topics.ratings.name, settings.topics.recommendations.name]
    items = await _load_items(settings, bootstrap, catalogue)
    if worker is None:
        worker = await asyncio.to_thread(training_worker, settings, domain, items=items)
    else:
        worker.set_items(items)
    backlog = [e for e in order_events(await read_tail(bootstrap, topics, ts.window_events + ts.context_events,
                                                       security=client_options(settings.kafka)))
               if worker.owns(e)]
    window: deque[dict] = deque(backlog, maxlen=ts.window_events + ts.context_events)
    drift = {"fired": False}
    if ts.drift_trigger:
        worker.monitor.on_drift(lambda ev: drift.__setitem__("fired", True))
    announcer = await KafkaAnnouncer(settings, bootstrap).start()
    consumer = AIOKafkaConsumer(*topics, settings.topics.items.name, bootstrap_servers=bootstrap, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="latest", **client_options(settings.kafka))
    await consumer.start()
    new_events, last_run = 0, time.monotonic()
    running: asyncio.Task | None = None
    log.info("trainer for %s follows %s (every %d events / %.0fs, drift trigger %s)", worker.domain, ", ".join(topics),
             ts.every_events, ts.every_s, ts.drift_trigger)
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=500, max_records=2000)
            for _tp, msgs in batch.items():
                for m in msgs:
                    data = decode(m.value)
                    if data is None:
                        continue
                    if data.get("type") == "item" or m.topic == settings.topics.items.name:
                        worker.set_items(items_from_records([data]))
                        continue
                    if not worker.owns(data):
                        continue
                    window.append(data)
                    worker.observe(data)
                    if data.get("type") in ("click", "rating"):
                        new_events += 1
            if running is not None and running.done():
                result = running.result()
                running = None
                for a in result.announcements:
                    await announcer.send(a)
            if running is None:  # never while a run uses the trainer
                ann = worker.check_rollback()
                if ann is not None:
                    await announcer.send(ann)
            if running is None and new_events > 0:
                trigger = None
                if drift["fired"]:
                    trigger = "drift"
                elif new_events >= ts.every_events:
                    trigger = "events"
                elif time.monotonic() - last_run >= ts.every_s:
                    trigger = "schedule"
                if trigger:
                    drift["fired"] = False
                    new_events, last_run = 0, time.monotonic()
                    context, evs = split_context(order_events(window), ts.window_events)
                    running = asyncio.get_running_loop().create_task(
                        asyncio.to_thread(worker.run_once, evs, trigger=trigger, context=context))
    finally:
        if running is not None:
            result = await running
            for a in result.announcements:
                await announcer.send(a)
        await consumer.stop()
        await announcer.stop()


# -------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="driftrec train", description="incremental model updates that follow drift: the knowledge model of the ranking policy (ranking.engine: policy) or the LM scorer's LoRA adapter (loop)")
    p.add_argument("--config", help="YAML settings file (default: $DRIFTREC_CONFIG)")
    p.add_argument("--domain", default=None, help="adapter domain (default: model.default_domain)")
    p.add_argument("--once", action="store_true", help="one run on the newest events, then exit")
    p.add_argument("--catalogue", default=None, help="extra items (JSON lines) besides the items topic")
    p.add_argument("--max-steps", type=int, default=None, help="override trainer.max_steps")
    p.add_argument("--json", default=None, help="with --once: write the run result as JSON to this file")
    return p


def train_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from driftrec.core.broker import BrokerError, broker
    from driftrec.core.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.load(config=args.config)
    except Exception as exc:  # noqa: BLE001
        print(f"driftrec train: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    if args.max_steps is not None:
        settings.trainer.max_steps = args.max_steps
    try:
        with broker(settings, start=False) as bootstrap:
            if args.once:
                result = asyncio.run(train_once(settings, bootstrap, args.domain, catalogue=args.catalogue))
                text = json.dumps(result.as_dict(), default=str)
                if args.json:
                    Path(args.json).write_text(text)
                print(text, flush=True)
                return 1 if result.outcome == "failed" else 0
            try:
                asyncio.run(run_forever(settings, bootstrap, args.domain, catalogue=args.catalogue))
            except KeyboardInterrupt:
                pass
            return 0
    except BrokerError as exc:
        print(f"driftrec train: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(train_main())
