"""The ingest agent: validate every inbound event; good ones to the pipeline, bad ones to dead letters.

One agent reads the raw bytes of the clicks, ratings, items and recommendation-request topics in
batches. Each record is validated against its topic's contract (:mod:`streams.validation`); a
record that fails, or that a pipeline stage rejects, goes to the dead-letter topic with its original
bytes, key, source position and the reason. Offsets are committed only after the batch has been
handled and its dead letters acknowledged by the broker, so a crash redelivers rather than loses;
stages are idempotent by ``event_id``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import TYPE_CHECKING

from driftrec import metrics
from streams.contracts import Click, DeadLetter, Item, Rating, RecommendationRequest, new_event_id
from streams.pipeline import Accepted
from streams.validation import Limits, Rejected, validate

if TYPE_CHECKING:
    from streams.app import DriftrecApp

log = logging.getLogger(__name__)

_TYPE_LABEL = {Click.TYPE: "click", Rating.TYPE: "rating", Item.TYPE: "item", RecommendationRequest.TYPE: "request"}


def topic_types(app: "DriftrecApp") -> dict[str, str]:
    t = app.settings.topics
    return {
        t.clicks.name: Click.TYPE,
        t.ratings.name: Rating.TYPE,
        t.items.name: Item.TYPE,
        t.requests.name: RecommendationRequest.TYPE,
    }


def dead_letter(rejected: Rejected, *, topic: str, raw: bytes | None, key: bytes | None,
                partition: int | None, offset: int | None) -> DeadLetter:
    return DeadLetter(
        event_id=new_event_id(),
        event_time=time.time(),
        reason=str(rejected),
        source_topic=topic,
        original_b64=base64.b64encode(raw or b"").decode("ascii"),
        source_partition=partition,
        source_offset=offset,
        original_key_b64=base64.b64encode(key).decode("ascii") if key is not None else None,
    )


def register(app: "DriftrecApp") -> None:
    settings = app.settings
    types = topic_types(app)
    limits = Limits.from_settings(settings)
    source = app.topic(*types, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    dlq = app.topic(settings.topics.dead_letters.name, key_serializer="raw", value_serializer="raw")

    async def send_dead_letters(rejections: list[tuple[Accepted | None, Rejected, dict]]) -> None:
        futures = []
        for _acc, rej, where in rejections:
            letter = dead_letter(rej, **where)
            fut = await dlq.send(key=letter.source_topic.encode(), value=letter.dumps())
            futures.append(fut)
            metrics.DEAD_LETTERS.labels(reason=rej.reason).inc()
            etype = types.get(where["topic"], "unknown")
            metrics.EVENTS_INGESTED.labels(event_type=_TYPE_LABEL.get(etype, "unknown"), outcome="dead_lettered").inc()
        # At-least-once: the batch is acked (and its offsets committed) only once the broker has them.
        await asyncio.gather(*futures)

    @app.agent(source, name="driftrec.ingest")
    async def ingest(stream):
        async for events in stream.take_events(settings.stream.batch_size, within=settings.stream.batch_window_s):
            started = time.perf_counter()
            accepted: list[Accepted] = []
            rejections: list[tuple[Accepted | None, Rejected, dict]] = []
            for ev in events:
                msg = ev.message
                raw = ev.value if isinstance(ev.value, (bytes, type(None))) else bytes(ev.value)
                where = dict(topic=msg.topic, raw=raw, key=msg.key, partition=msg.partition, offset=msg.offset)
                result = validate(raw, limits=limits, expected_type=types[msg.topic])
                if isinstance(result, Rejected):
                    rejections.append((None, result, where))
                else:
                    accepted.append(Accepted(result, msg.topic, msg.partition, msg.offset, raw, msg.key))
            try:
                stage_rejections = await app.pipeline.dispatch(accepted)
            except Exception as exc:  # noqa: BLE001 - a stage bug must not kill the worker
                # Crash semantics would redeliver the same batch forever; park it instead.
                log.exception("pipeline failed on a batch of %d events; dead-lettering them", len(accepted))
                stage_rejections = [(a, Rejected("processing", f"pipeline error: {exc!r}"[:300])) for a in accepted]
            bad = {id(a) for a, _ in stage_rejections}
            for acc, rej in stage_rejections:
                rejections.append((acc, rej, dict(topic=acc.topic, raw=acc.raw, key=acc.key,
                                                  partition=acc.partition, offset=acc.offset)))
            for acc in accepted:
                if id(acc) not in bad:
                    metrics.EVENTS_INGESTED.labels(event_type=_TYPE_LABEL[acc.event.TYPE], outcome="ok").inc()
            if rejections:
                await send_dead_letters(rejections)
            metrics.AGENT_PROCESSING_SECONDS.labels(agent="ingest").observe(time.perf_counter() - started)
