"""The ingest agent: validate every inbound event; good ones to the pipeline, bad ones to dead letters.

One agent reads the raw bytes of the clicks, ratings, items and recommendation-request topics a
fetch at a time (:mod:`driftrec.streams.batching`). Each record is validated against its topic's contract
(:mod:`driftrec.core.validation`); a record that fails, or that a pipeline stage rejects, goes to the
dead-letter topic with its original bytes, key, source position and the reason. A batch's records
are acknowledged (their offsets may be committed) only after every stage's outputs for it and its
dead letters are durable, so a crash redelivers rather than loses; stages are idempotent.

A pipeline stage that raises on an event costs that event only (:mod:`driftrec.streams.pipeline`
isolates it: a ``processing`` dead letter naming the stage and the exception); a stage that fails on
every event alone is a broken dependency, not bad input, and stops the worker (nothing is
dead-lettered, the batch is replayed after the restart).

**Mis-keyed clicks and ratings are re-keyed.** A user's state lives in the partition of its events
(the users table is co-partitioned with clicks and ratings), so a click whose record key is not its
``user_id`` (a key-less producer, a key of the session or the item) on another partition than the
user id's would split the user's state over partitions - and over workers. Such a record is
produced again to its topic keyed by the user id, on the user id's partition (the default Kafka
partitioner's), and the original is acknowledged once the broker has the copy; the copy is what the
stages see. Re-keying rather than dead-lettering: the event is valid, only its producer's key was
wrong, and the fix loses nothing; it is safe to repeat (a crash before the commit re-keys the
original again, and the user's event-id memory drops the second copy as a duplicate), and a copy is
keyed by its user id, so it is never re-keyed again. ``driftrec_events_rekeyed_total`` counts them.
"""

from __future__ import annotations

import base64
import logging
import time
from typing import TYPE_CHECKING

from driftrec.core import metrics
from driftrec.core.broker import user_partition
from driftrec.core.contracts import Click, DeadLetter, Item, Rating, RecommendationRequest, new_event_id
from driftrec.streams import faults
from driftrec.streams.batching import MessageBatch, Retry, batch_agent
from driftrec.streams.pipeline import Accepted, StageFailed
from driftrec.core.validation import Limits, Rejected, validate

if TYPE_CHECKING:
    from driftrec.streams.app import DriftrecApp

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


MAX_KEY_BYTES = 1024


def dead_letter(rejected: Rejected, *, topic: str, raw: bytes | None, key: bytes | None,
                partition: int | None, offset: int | None, max_bytes: int = 256 * 1024) -> DeadLetter:
    """The dead letter for a rejected record: the reason, where it came from and its bytes - at most
    ``max_bytes`` of them, so that a huge record still makes a letter the broker accepts (a letter
    the broker refused would stall the batch, and the same batch after every restart)."""
    raw = raw or b""
    kept = raw[:max_bytes]
    reason = str(rejected)
    if len(kept) < len(raw):
        reason += f" [dead letter holds the first {len(kept)} of {len(raw)} bytes]"
    return DeadLetter(
        event_id=new_event_id(),
        event_time=time.time(),
        reason=reason,
        source_topic=topic,
        original_b64=base64.b64encode(kept).decode("ascii"),
        source_partition=partition,
        source_offset=offset,
        original_key_b64=base64.b64encode(key[:MAX_KEY_BYTES]).decode("ascii") if key is not None else None,
        original_bytes=len(raw),
        truncated=len(kept) < len(raw),
    )


def register(app: "DriftrecApp") -> None:
    settings = app.settings
    types = topic_types(app)
    limits = Limits.from_settings(settings)
    sources = [app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
               for name in types]
    dlq = app.topic(settings.topics.dead_letters.name, key_serializer="raw", value_serializer="raw")
    by_name = dict(zip(types, sources))
    user_keyed = {settings.topics.clicks.name: settings.topics.clicks.partitions,
                  settings.topics.ratings.name: settings.topics.ratings.partitions}
    rekeyed = {Click.TYPE: metrics.EVENTS_REKEYED.labels(event_type="click"),
               Rating.TYPE: metrics.EVENTS_REKEYED.labels(event_type="rating")}
    dlq_failures = [faults.dead_letter_failures()]  # a fault-injection hook (driftrec.streams.faults)
    ok = {t: metrics.EVENTS_INGESTED.labels(event_type=label, outcome="ok") for t, label in _TYPE_LABEL.items()}
    seconds = metrics.AGENT_PROCESSING_SECONDS.labels(agent="ingest")

    def dead_letter_output(key: bytes, value: bytes) -> Retry:
        async def send() -> None:
            if dlq_failures[0]:
                dlq_failures[0] -= 1
                raise faults.InjectedFault("injected dead-letter send failure")
            await (await dlq.send(key=key, value=value))

        return Retry(send, "a dead letter")

    def rekey_output(acc: Accepted) -> Retry:
        async def send() -> None:
            topic = by_name[acc.topic]
            part = user_partition(acc.event.user_id, user_keyed[acc.topic])
            await (await topic.send(key=acc.event.user_id.encode(), value=acc.raw, partition=part))

        return Retry(send, "a re-keyed event")

    def misplaced(acc: Accepted) -> bool:
        """A click or rating whose key is not its user id, on another partition than the user id's."""
        n = user_keyed.get(acc.topic)
        if n is None:
            return False
        uid = acc.event.user_id
        return acc.key != uid.encode() and acc.partition != user_partition(uid, n)

    async def send_dead_letters(rejections: list[tuple[Rejected, dict]]) -> list:
        futures = []
        for rej, where in rejections:
            letter = dead_letter(rej, **where, max_bytes=settings.stream.dead_letter_max_bytes)
            futures.append(dead_letter_output(letter.source_topic.encode(), letter.dumps()))
            metrics.DEAD_LETTERS.labels(reason=rej.reason).inc()
            etype = types.get(where["topic"], "unknown")
            metrics.EVENTS_INGESTED.labels(event_type=_TYPE_LABEL.get(etype, "unknown"), outcome="dead_lettered").inc()
        return futures

    async def ingest(batch: MessageBatch) -> list:
        started = time.perf_counter()
        now = time.time()
        accepted: list[Accepted] = []
        rejections: list[tuple[Rejected, dict]] = []
        moved: list[Retry] = []
        for msg in batch.messages:
            raw = msg.value if isinstance(msg.value, (bytes, type(None))) else bytes(msg.value)
            result = validate(raw, limits=limits, now=now, expected_type=types[msg.topic])
            if isinstance(result, Rejected):
                rejections.append((result, dict(topic=msg.topic, raw=raw, key=msg.key, partition=msg.partition,
                                                offset=msg.offset)))
            else:
                acc = Accepted(result, msg.topic, msg.partition, msg.offset, raw, msg.key)
                if misplaced(acc):
                    moved.append(rekey_output(acc))
                    rekeyed[result.TYPE].inc()
                else:
                    accepted.append(acc)
        try:
            outcome = await app.pipeline.dispatch(accepted)
        except StageFailed as exc:
            # Not the events' fault (each failed alone): stop, and replay the batch after the restart.
            log.critical("%s; stopping the worker", exc)
            app.crash_soon(exc)
            raise
        bad = {id(a) for a, _ in outcome.rejected}
        for acc, rej in outcome.rejected:
            rejections.append((rej, dict(topic=acc.topic, raw=acc.raw, key=acc.key, partition=acc.partition,
                                         offset=acc.offset)))
        for acc in accepted:
            if id(acc) not in bad:
                ok[acc.event.TYPE].inc()
        durable = list(outcome.durable) + moved
        if rejections:
            # at-least-once: the batch is acknowledged only once the broker has its dead letters
            durable.extend(await send_dead_letters(rejections))
        seconds.observe(time.perf_counter() - started)
        return durable

    batch_agent(app, sources, name="driftrec.ingest", handler=ingest)
