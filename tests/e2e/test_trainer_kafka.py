"""`driftrec train --once` against the real embedded broker: events in from Kafka, an announcement out."""

from __future__ import annotations

import asyncio
import json

import yaml

from driftrec.model.adapters import verify_checkpoint
from driftrec.model.training.worker import read_tail, train_main
from tests.trainer_support import MAX_LENGTH, one_torch_thread, tiny_world


async def _produce(settings, bootstrap, world, n_events: int) -> None:
    from driftrec.client import AsyncProducer

    async with AsyncProducer(settings) as producer:
        await producer.send_many(world.items)
        events = list(world.events(n_events))
        await producer.send_many(events)
        # One recommendation that was shown (hard negatives for the user's next positive).
        first = events[0]
        rec = {"type": "recommendation", "schema_version": 1, "event_id": "rec-1", "event_time": first.event_time - 1,
               "request_id": "req-1", "user_id": first.user_id, "domain": "default",
               "items": [{"item_id": it.item_id, "score": 0.5, "reason": ""} for it in world.items[:5]],
               "adapter_version": "base", "model_version": "test"}
        await producer.send_raw(settings.topics.recommendations.name, json.dumps(rec).encode(), first.user_id.encode())


def test_train_once_reads_kafka_and_announces_a_new_version(kafka, tmp_path):
    bootstrap, settings = kafka
    settings.model.max_length = MAX_LENGTH
    settings.model.device = "cpu"
    settings.trainer.max_steps = 2
    settings.trainer.batch_size = 8
    settings.trainer.min_examples = 4
    settings.trainer.gate_tolerance = 1.0
    settings.trainer.user_max_length = MAX_LENGTH
    settings.trainer.item_max_length = MAX_LENGTH
    world = tiny_world(seed=21)
    asyncio.run(_produce(settings, bootstrap, world, 120))
    config = tmp_path / "driftrec.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    out = tmp_path / "run.json"
    with one_torch_thread():
        rc = train_main(["--once", "--config", str(config), "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["outcome"] == "promoted", result
    assert result["examples"] >= 60 and result["holdout"] >= 1
    version = result["version"]
    verify_checkpoint(settings.model.adapter_dir / "default" / version, settings.model.adapter_dir)
    anns = asyncio.run(read_tail(bootstrap, [settings.topics.adapters.name], 0, from_beginning=True))
    assert [(a["type"], a["action"], a["domain"], a["version"]) for a in anns] == [("adapter", "activate", "default", version)]
    assert anns[0]["path"].endswith(f"default/{version}")


def test_long_running_worker_trains_on_schedule_and_announces(kafka, tmp_path):
    from driftrec.model.training.worker import run_forever
    from tests.trainer_support import make_worker

    bootstrap, settings = kafka
    settings.model.max_length = MAX_LENGTH
    settings.model.device = "cpu"
    for key, value in {"max_steps": 2, "batch_size": 8, "min_examples": 4, "gate_tolerance": 1.0, "every_events": 40,
                       "every_s": 3600.0, "user_max_length": MAX_LENGTH, "item_max_length": MAX_LENGTH,
                       "window_events": 200, "context_events": 0}.items():
        setattr(settings.trainer, key, value)
    world = tiny_world(seed=23)
    events = list(world.events(400))

    async def main():
        from driftrec.client import AsyncProducer

        async with AsyncProducer(settings) as producer:
            await producer.send_many(world.items)
            with one_torch_thread():
                worker = await asyncio.to_thread(make_worker, settings, world)
            stop = asyncio.Event()
            task = asyncio.get_running_loop().create_task(run_forever(settings, bootstrap, stop=stop, worker=worker))
            try:
                sent = 0
                deadline = asyncio.get_running_loop().time() + 120
                while not worker.promoted and asyncio.get_running_loop().time() < deadline:
                    assert not task.done(), task.exception()
                    if sent < len(events):
                        await producer.send_many(events[sent: sent + 20])
                        sent += 20
                    await asyncio.sleep(1.0)
            finally:
                stop.set()
                await asyncio.wait_for(task, 60)
            return worker

    with one_torch_thread():
        worker = asyncio.run(main())
    assert worker.promoted[0] == "v00001"  # a second run may have started before the stop
    assert worker.runs[0].trigger == "events"
    anns = asyncio.run(read_tail(bootstrap, [settings.topics.adapters.name], 0, from_beginning=True))
    assert [(a["action"], a["version"]) for a in anns] == [("activate", v) for v in worker.promoted]


def test_train_once_with_the_policy_engine_publishes_a_knowledge_model(kafka, tmp_path):
    """``ranking.engine: policy``: the same command trains the ranking policy's knowledge model from the
    topics and publishes a verified checkpoint (the workers' policy hot-swaps ACTIVE); nothing is announced."""
    from driftrec.model.knowledge.checkpoint import active_version, knowledge_root, load_knowledge

    bootstrap, settings = kafka
    settings.ranking.engine = "policy"
    settings.trainer.min_examples = 20
    settings.trainer.gate_tolerance = 1.0
    world = tiny_world(seed=22)
    asyncio.run(_produce(settings, bootstrap, world, 300))
    config = tmp_path / "driftrec.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    out = tmp_path / "run.json"
    with one_torch_thread():
        rc = train_main(["--once", "--config", str(config), "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["outcome"] == "promoted", result
    assert result["examples"] >= 200 and result["holdout"] >= 10 and result["version"] == "k0001"
    root = knowledge_root(settings.model.adapter_dir)
    assert active_version(root) == "k0001"
    model = load_knowledge(root / "default" / "k0001", {it.item_id: it for it in world.items})
    assert sorted(model.item_ids) == sorted(it.item_id for it in world.items)
    anns = asyncio.run(read_tail(bootstrap, [settings.topics.adapters.name], 0, from_beginning=True))
    assert anns == []
