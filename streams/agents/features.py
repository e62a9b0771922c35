"""The features stage: clicks and ratings -> running user and item state -> Feast online store.

Two steps, each batched (Faust's per-event cost is the bottleneck, so everything here works on
the ingest agent's batches, not per event):

1. **User step** - a pipeline stage (``app.pipeline.register("features", ...)``) over the
   ingest agent's batches of clicks and ratings, which are keyed by user id. Rejects what it
   cannot use (unknown item, non-finite or far-future time, non-finite rating) back to the ingest
   agent, which dead-letters it. Applies each event to the user's :class:`~streams.state.UserState`
   (deduplicated by event id; :mod:`streams.state`), forwards the interactions re-keyed by item id to
   the ``topics.events`` topic (one message per target partition per batch), stores the touched user
   states in the ``features-users`` table (changelogged) and writes one row per touched user to the
   online store.
2. **Item step** - an agent over ``topics.events`` that applies the forwarded interactions to the
   item states (``features-items`` table, deduplicated by source offset) and writes one row per
   touched item per batch.

Crash safety (at-least-once everywhere): Faust flushes its producer (changelogs, forwards) before
it commits offsets, and the stage hooks that flush so that it also waits for the online-store
write in flight (writes overlap the next batch, one at a time, in order). So committed offsets
imply durable state, forwards and rows. A crash replays the uncommitted records: the user memory
recognises the ones already applied (``redelivered``) and forwards them again; the item states,
which remember the highest source offset applied per source partition, skip what they already
have. Online-store rows are a projection of the state (row = f(state)), so re-writing them after a
replay is harmless.

Table partitions: the changelog partition of a table key is the partition of the source record
(clicks/ratings partition p -> users table partition p; events partition p -> items table
partition p). Batches mix partitions, so the stage sets Faust's current-event context to the
record's partition around every table access (:func:`in_partition`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import weakref
import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from driftrec import metrics
from feature_store.writer import FeatureWriter, create_writer
from streams.contracts import Click, Rating
from streams.pipeline import Accepted, Rejection
from streams.state import CLICK, RATING, Interaction, ItemDelta, ItemState, UserState, Verdict, source_code
from streams.validation import Rejected

if TYPE_CHECKING:  # pragma: no cover
    from streams.app import DriftrecApp

log = logging.getLogger(__name__)

USERS_TABLE = "features-users"
ITEMS_TABLE = "features-items"
_CACHE_MAX = 200_000
_DEBUG = bool(__import__("os").environ.get("DRIFTREC_FEATURES_DEBUG"))
_WRITE_RETRIES = (0.1, 0.5, 1.0)


# --- Faust current-event context -------------------------------------------------------------


@dataclass
class _Message:
    topic: str
    partition: int


class _PartitionEvent:
    """Stands in for a Faust event where tables only look at ``event.message.{topic,partition}``."""

    __slots__ = ("message", "__weakref__")

    def __init__(self, topic: str, partition: int) -> None:
        self.message = _Message(topic, partition)


@contextlib.contextmanager
def in_partition(topic: str, partition: int) -> Iterator[None]:
    """Table reads/writes inside go to ``partition`` (store and changelog), as for a record of it."""
    from faust.streams import _current_event

    ev = _PartitionEvent(topic, partition)
    token = _current_event.set(weakref.ref(ev))
    try:
        yield
    finally:
        _current_event.reset(token)


def item_partition(item_id: str, partitions: int) -> int:
    return zlib.crc32(item_id.encode()) % partitions


# --- the stage ---------------------------------------------------------------------------------


class FeaturesStage:
    def __init__(self, app: "DriftrecApp", writer: FeatureWriter | None = None) -> None:
        self.app = app
        self.settings = s = app.settings
        t = s.topics
        self.topic_codes = {t.clicks.name: "c", t.ratings.name: "r"}
        self.events_topic_name = t.events.name
        self.events_partitions = t.events.partitions
        if t.clicks.partitions != t.ratings.partitions:
            raise ValueError("clicks and ratings must be co-partitioned (same partition count)")
        raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
        # bytes keys and values: raw serializers (the states serialize themselves)
        self.users = app.Table(USERS_TABLE, partitions=t.clicks.partitions, help="features: user state",
                               key_type=bytes, value_type=bytes)
        self.items = app.Table(ITEMS_TABLE, partitions=t.events.partitions, help="features: item state",
                               key_type=bytes, value_type=bytes)
        self.events_topic = app.topic(t.events.name, partitions=t.events.partitions, **raw)
        self.writer = writer or create_writer(s)
        self.half_life = s.feast.popularity_half_life_s
        self._users: dict[bytes, UserState] = {}
        self._items: dict[bytes, ItemState] = {}
        self._pending_users: dict[str, dict] = {}
        self._pending_items: dict[str, dict] = {}
        self._catalogue_ready = False
        self._inflight: asyncio.Future | None = None
        # item id -> genres, cached while the catalogue tells us about changes
        self._genres: dict[str, tuple | None] = {}
        cat = getattr(app, "catalogue", None)
        self._genres_cached = hasattr(cat, "on_item")
        if self._genres_cached:
            cat.on_item(self._on_catalogue_item)
        self._commit_hooked = False
        self._skipped = {v: metrics.FEATURE_EVENTS_SKIPPED.labels(reason=v.value)
                         for v in (Verdict.REDELIVERED, Verdict.DUPLICATE, Verdict.LATE)}
        self._replayed = metrics.FEATURE_EVENTS_SKIPPED.labels(reason="replayed")
        self._write_failures = metrics.FEATURE_WRITE_FAILURES.labels(store=self.writer.store_name)

    # -- caches mirror the tables; a rebalance (or recovery) invalidates them
    def clear_caches(self, *_args: Any, **_kwargs: Any) -> None:
        self._users.clear()
        self._items.clear()

    def _user_state(self, key: bytes, topic: str, partition: int) -> UserState:
        st = self._users.get(key)
        if st is None:
            with in_partition(topic, partition):
                raw = self.users.get(key)
            st = self._users[key] = UserState.loads(raw)
        return st

    def _item_state(self, key: bytes, topic: str, partition: int) -> ItemState:
        st = self._items.get(key)
        if st is None:
            with in_partition(topic, partition):
                raw = self.items.get(key)
            st = self._items[key] = ItemState.loads(raw)
        return st

    @staticmethod
    def _store(table, touched: dict[bytes, tuple[str, int, str]], states: dict) -> None:
        """Write the touched states to the table, one current-event context per source partition."""
        by_partition: dict[tuple[str, int], list[bytes]] = defaultdict(list)
        for key, (topic, partition, _id) in touched.items():
            by_partition[(topic, partition)].append(key)
        for (topic, partition), keys in by_partition.items():
            with in_partition(topic, partition):
                for key in keys:
                    table[key] = states[key].dumps()

    # -- catalogue
    @property
    def catalogue(self):
        return getattr(self.app, "catalogue", None)

    def genres_of(self, item_id: str):
        try:
            return self._genres[item_id]
        except KeyError:
            pass
        cat = self.catalogue
        item = cat.get(item_id) if cat is not None else None
        genres = tuple(item.genres) if item is not None and item.genres else None
        if self._genres_cached:  # only with change notifications from the catalogue
            self._genres[item_id] = genres
        return genres

    def _on_catalogue_item(self, item) -> None:
        self._genres.pop(getattr(item, "item_id", None), None)

    async def _known_items(self, batch: Sequence[Accepted]) -> set[str]:
        cat = self.catalogue
        if cat is None:
            return {a.event.item_id for a in batch}
        if not self._catalogue_ready:
            if not await cat.wait_caught_up(timeout=30.0):
                log.warning("features: the catalogue has not caught up after 30 s; checking items against what it has")
            self._catalogue_ready = True
        wanted = {a.event.item_id for a in batch}
        deadline = time.monotonic() + self.settings.stream.unknown_item_grace_s
        while True:
            missing = {i for i in wanted if i not in cat}
            if not missing or time.monotonic() >= deadline:
                return wanted - missing
            await asyncio.sleep(0.05)  # an item produced just before its first click may still be on its way

    def _check(self, acc: Accepted, now: float, known: set[str]) -> Rejected | None:
        ev = acc.event
        if not isinstance(ev.event_time, (int, float)) or not math.isfinite(ev.event_time):
            return Rejected("bad_value", "event_time must be finite")
        if ev.event_time > now + self.settings.stream.max_future_skew_s:
            return Rejected("future_time", f"event_time {ev.event_time} is {ev.event_time - now:.0f}s in the future")
        if isinstance(ev, Rating) and (ev.rating is None or not math.isfinite(ev.rating)):
            return Rejected("bad_value", "rating must be finite")
        if ev.item_id not in known:
            return Rejected("unknown_item", f"item {ev.item_id!r} is not in the catalogue")
        return None

    # -- step 1: users
    async def process_interactions(self, batch: Sequence[Accepted]) -> list[Rejection]:
        batch = [a for a in batch if isinstance(a.event, (Click, Rating)) and a.topic in self.topic_codes]
        if not batch:
            return []
        if len(self._users) >= _CACHE_MAX:  # only between batches: touched states live in the cache until stored
            self._users.clear()
        now = time.time()
        _p0 = time.perf_counter()
        known = await self._known_items(batch)
        _p1 = time.perf_counter()
        rejections: list[Rejection] = []
        touched: dict[bytes, tuple[str, int, str]] = {}  # user key -> (topic, partition, user id)
        forward: dict[int, list[list]] = defaultdict(list)
        for acc in batch:
            bad = self._check(acc, now, known)
            if bad is not None:
                rejections.append((acc, bad))
                continue
            ev = acc.event
            inter = Interaction(
                event_id=ev.event_id, event_time=float(ev.event_time), user_id=ev.user_id, item_id=ev.item_id,
                kind=RATING if isinstance(ev, Rating) else CLICK,
                rating=float(ev.rating) if isinstance(ev, Rating) else None,
                source=source_code(self.topic_codes[acc.topic], acc.partition), offset=acc.offset,
            )
            key = ev.user_id.encode()
            state = self._user_state(key, acc.topic, acc.partition)
            verdict = state.apply(inter, recent_items=self.settings.stream.recent_items,
                                  dedupe_ids=self.settings.stream.dedupe_ids)
            if verdict is Verdict.NEW:
                touched[key] = (acc.topic, acc.partition, ev.user_id)
            else:
                self._skipped[verdict].inc()
            if verdict in (Verdict.NEW, Verdict.REDELIVERED):
                forward[item_partition(ev.item_id, self.events_partitions)].append(ItemDelta.of(inter).to_list())
        _p2 = time.perf_counter()
        # 1. forward re-keyed by item (buffered; Faust flushes its producer before every offset commit)
        self._hook_commit()
        for p, deltas in sorted(forward.items()):
            await self.events_topic.send(key=b"features", value=json.dumps({"d": deltas}, separators=(",", ":")).encode(),
                                         partition=p, force=True)
        _p3 = time.perf_counter()
        # 2. state -> changelogged table
        self._store(self.users, touched, self._users)
        rows = [self._users[key].feature_row(user_id, self.genres_of) for key, (_t, _p, user_id) in touched.items()]
        # 3. rows -> online store, overlapping the next batch (see _submit)
        _p4 = time.perf_counter()
        if rows:
            await self._submit(rows, [])
        _p5 = time.perf_counter()
        if _DEBUG:  # DRIFTREC_FEATURES_DEBUG=1: per-batch phase timings (profiling aid)
            log.warning("features batch n=%d users=%d known=%.1fms apply=%.1fms fwd=%.1fms table=%.1fms write=%.1fms",
                        len(batch), len(rows), (_p1-_p0)*1e3, (_p2-_p1)*1e3, (_p3-_p2)*1e3, (_p4-_p3)*1e3, (_p5-_p4)*1e3)
        return rejections

    # -- step 2: items
    async def process_item_messages(self, messages: Sequence[tuple[str, int, bytes]]) -> int:
        """Apply forwarded interactions ``(topic, partition, value)``; returns the rows written."""
        if len(self._items) >= _CACHE_MAX:
            self._items.clear()
        touched: dict[bytes, tuple[str, int, str]] = {}
        for topic, partition, value in messages:
            try:
                deltas = [ItemDelta.from_list(v) for v in json.loads(value)["d"]]
            except (ValueError, KeyError, TypeError, IndexError):
                log.error("features: skipping a malformed message on %s[%d]", topic, partition)
                continue
            for d in deltas:
                key = d.item_id.encode()
                state = self._item_state(key, topic, partition)
                if state.apply(d, half_life_s=self.half_life):
                    touched[key] = (topic, partition, d.item_id)
                else:
                    self._replayed.inc()
        self._store(self.items, touched, self._items)
        rows = [self._items[key].feature_row(item_id) for key, (_t, _p, item_id) in touched.items()]
        if rows:
            self._hook_commit()
            await self._submit([], rows)
        return len(rows)

    async def _write(self, user_rows: list[dict], item_rows: list[dict]) -> None:
        """Write rows (plus any left over from a failed write); never raises: the state is the truth."""
        if self._pending_users or self._pending_items:
            merged_u = {**self._pending_users, **{r["user_id"]: r for r in user_rows}}
            merged_i = {**self._pending_items, **{r["item_id"]: r for r in item_rows}}
            user_rows, item_rows = list(merged_u.values()), list(merged_i.values())
            self._pending_users, self._pending_items = {}, {}
        for attempt, pause in enumerate((*_WRITE_RETRIES, None)):
            try:
                await self.writer.write_batch(user_rows, item_rows)
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - online store away: retry, then carry the rows over
                self._write_failures.inc()
                if pause is None:
                    log.exception("features: online-store write failed %d times; keeping %d+%d rows for the next batch",
                                  attempt + 1, len(user_rows), len(item_rows))
                    self._pending_users.update({r["user_id"]: r for r in user_rows})
                    self._pending_items.update({r["item_id"]: r for r in item_rows})
                    return
                log.warning("features: online-store write failed (attempt %d); retrying in %.1f s", attempt + 1, pause)
                await asyncio.sleep(pause)

    async def _submit(self, user_rows: list[dict], item_rows: list[dict]) -> None:
        """Start writing rows once the previous write is done (one write in flight, in batch order).

        The write of batch N overlaps the processing of batch N+1. It still completes before the
        offsets of batch N are committed: :meth:`_hook_commit` makes the producer flush that Faust
        runs before every commit wait for the write in flight too.
        """
        await self.drain()
        self._inflight = asyncio.ensure_future(self._write(user_rows, item_rows))

    async def drain(self) -> None:
        """Wait for the online-store write in flight (if any)."""
        task = self._inflight
        if task is not None:
            await asyncio.shield(task)
            if self._inflight is task:
                self._inflight = None

    def _hook_commit(self) -> None:
        """Offsets are committed only after the rows of their batches are in the online store."""
        if self._commit_hooked:
            return
        producer = self.app.producer
        flush = producer.flush

        async def flush_then_commit() -> None:
            await self.drain()
            await flush()

        producer.flush = flush_then_commit
        self._commit_hooked = True

    async def flush_pending(self) -> None:
        if self._pending_users or self._pending_items:
            await self._submit([], [])


def register(app: "DriftrecApp") -> FeaturesStage:
    settings = app.settings
    stage = FeaturesStage(app)
    app.features = stage  # type: ignore[attr-defined] - for tests and the bench
    app.pipeline.register("features", stage.process_interactions, types=(Click.TYPE, Rating.TYPE))

    @app.agent(stage.events_topic, name="driftrec.features.items")
    async def item_features(stream):
        async for events in stream.take_events(settings.stream.batch_size, within=settings.stream.batch_window_s):
            started = time.perf_counter()
            await stage.process_item_messages(
                [(e.message.topic, e.message.partition, e.value) for e in events])
            metrics.AGENT_PROCESSING_SECONDS.labels(agent="features_items").observe(time.perf_counter() - started)

    @app.task
    async def start_feature_writer() -> None:
        await stage.writer.start()

    @app.timer(interval=1.0)
    async def retry_feature_writes() -> None:
        await stage.flush_pending()

    app.on_partitions_revoked.connect(_async_handler(stage.clear_caches))
    app.on_partitions_assigned.connect(_async_handler(stage.clear_caches))
    return stage


def _async_handler(fn):
    async def handler(*args: Any, **kwargs: Any) -> None:
        fn()
    return handler
