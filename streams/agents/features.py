"""The features stage: clicks and ratings -> running user and item state -> Feast online store.

Two steps, each over whole batches (:mod:`driftrec.streams.batching`; per-event work is what limits a Faust
worker, so nothing here is done per event that can be done per batch):

1. **User step** - a pipeline stage over the ingest agent's batches of clicks and ratings, which are
   keyed by user id. Rejects what it cannot use (unknown item, non-finite or far-future time,
   non-finite rating) back to the ingest agent, which dead-letters it. Applies each event to the
   user's :class:`~driftrec.streams.state.UserState` (:mod:`driftrec.streams.state`: redeliveries skipped by source
   offset, duplicates by event id), forwards the new interactions re-keyed by item id to the
   ``topics.events`` topic (one message per target partition per batch), stores every touched user
   state once in the ``features-users`` table (changelogged) and writes one row per touched user to
   the online store.
2. **Item step** - a batch agent over ``topics.events`` that applies the forwarded interactions to
   the item states (``features-items`` table; replays skipped by source offset) and writes one row
   per touched item per batch.

Durability and ordering (at-least-once everywhere; a batch is acknowledged only when all of it is
durable, so committed offsets imply durable state, forwards and rows):

* a user state is persisted (local store + changelog, :class:`~driftrec.streams.changelog.TableWriter`) only
  after the batch's forwards are acknowledged by the broker - so a state that says "applied" never
  has a forward that could still be lost, and a redelivered interaction need not be forwarded again;
* persists of one table run one batch after the other (a later batch never overtakes an earlier one
  in the store or the changelog);
* rows go through a :class:`~driftrec.feature_store.sink.RowSink`: one online-store write in flight, later
  rows coalesced per entity;
* a redelivered event (a replay after a crash or a rebalance) re-writes its entity's state and row,
  in case the crash came before they were durable.

Table partitions: the changelog partition of a table key is the partition of its source records
(clicks/ratings partition p -> users table partition p; events partition p -> items table
partition p).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
import zlib
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

import orjson

from driftrec.core import metrics
from driftrec.core.broker import broker_epoch
from driftrec.core.kafka_auth import client_options
from driftrec.feature_store.sink import RowSink
from driftrec.feature_store.process import create_writer
from driftrec.feature_store.writer import FeatureWriter
from driftrec.streams import faults
from driftrec.streams.batching import MessageBatch, batch_agent
from driftrec.streams.changelog import StateStore, TableWriter
from driftrec.core.contracts import Click, Rating
from driftrec.streams.pipeline import Accepted, StageResult
from driftrec.core.interactions import Interaction
from driftrec.streams.state import (ItemDelta, ItemState, UserState, Verdict, forward_record, genre_weights,
                                    source_code)
from driftrec.core.validation import Rejected

if TYPE_CHECKING:  # pragma: no cover
    from driftrec.streams.app import DriftrecApp

log = logging.getLogger(__name__)

USERS_TABLE = "features-users"
ITEMS_TABLE = "features-items"
_CACHE_MAX = 200_000


def item_partition(item_id: str, partitions: int) -> int:
    return zlib.crc32(item_id.encode()) % partitions


class _Persister:
    """Persists batches of one table's states: in batch order, with several batches in flight.

    Batch N's writes are issued (local store, changelog records to the producer) once its own
    ``after`` awaitables are done *and* batch N-1's writes have been issued - so the store and each
    changelog partition see the batches in order - and complete when the broker acknowledges them,
    while later batches are issued behind. A failure stops the chain: no later batch is persisted
    (none is acknowledged either, so all of them are replayed after a restart), and ``on_failure``
    is told - the worker cannot go on without its state.
    """

    def __init__(self, store: StateStore, on_failure: Callable[[BaseException], None] | None = None,
                 pending: dict[bytes, bytes] | None = None) -> None:
        self.store = store
        self.on_failure = on_failure
        # key -> state bytes handed to persist() whose store write is not issued yet (newest wins): a
        # cache miss reads these before the store, which lags until the batch's writes are issued
        self.pending = pending if pending is not None else {}
        self._issued: asyncio.Future | None = None  # the previous batch's writes are issued
        self._tail: asyncio.Future | None = None  # the previous batch is durable
        self.failed: BaseException | None = None

    def persist(self, values: dict[int, dict[bytes, bytes]], after: Sequence[Awaitable] = ()) -> asyncio.Future:
        """Write ``{partition: {key: state bytes}}`` once ``after`` and the earlier batches' writes are done."""
        prev_issued, after = self._issued, list(after)
        issued = self._issued = asyncio.get_running_loop().create_future()
        pending = self.pending
        for vals in values.values():
            pending.update(vals)

        async def run() -> None:
            try:
                if after:
                    await asyncio.gather(*after)
                if prev_issued is not None:
                    await prev_issued  # raises if an earlier batch failed: the chain stops there
                if self.failed is not None:
                    raise RuntimeError("an earlier batch's state could not be persisted") from self.failed
                acks = [a for p, vals in sorted(values.items()) if (a := await self.store.write(p, vals)) is not None]
            except BaseException as exc:
                self._fail(exc)
                issued.set_exception(exc)
                raise
            for vals in values.values():  # in the store now, unless a later batch changed them since
                for key, value in vals.items():
                    if pending.get(key) is value:
                        del pending[key]
            issued.set_result(None)
            try:
                if acks:
                    await asyncio.gather(*acks)
            except BaseException as exc:
                self._fail(exc)
                raise

        self._tail = fut = asyncio.ensure_future(run())
        fut.add_done_callback(_quiet)
        issued.add_done_callback(_quiet)
        return fut

    def _fail(self, exc: BaseException) -> None:
        if self.failed is None and not isinstance(exc, asyncio.CancelledError):
            self.failed = exc
            log.critical("features: state could not be persisted (%r); no later batch will be", exc)
            if self.on_failure is not None:
                self.on_failure(exc)

    async def settle(self) -> None:
        """Wait for the persists started so far (failed ones included)."""
        tail = self._tail
        if tail is not None:
            await asyncio.wait([tail])


def _quiet(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved here; the batch's acker reports it


class FeaturesStage:
    def __init__(self, app: "DriftrecApp", writer: FeatureWriter | None = None,
                 stores: tuple[StateStore, StateStore] | None = None) -> None:
        """``stores`` (user, item) replaces the Faust tables - for tests of the stage alone."""
        self.app = app
        self.settings = s = app.settings
        t = s.topics
        self.topic_codes = {t.clicks.name: "c", t.ratings.name: "r"}
        self.events_partitions = t.events.partitions
        self.events_topic_name = t.events.name
        self.local_items = s.stream.local_items
        if t.clicks.partitions != t.ratings.partitions:
            raise ValueError("clicks and ratings must be co-partitioned (same partition count)")
        raw = dict(key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
        self.events_topic = app.topic(t.events.name, partitions=t.events.partitions, **raw)
        if stores is None:
            # bytes keys and values (the states serialize themselves)
            users = app.Table(USERS_TABLE, partitions=t.clicks.partitions, help="features: user state",
                              key_type=bytes, value_type=bytes)
            items = app.Table(ITEMS_TABLE, partitions=t.events.partitions, help="features: item state",
                              key_type=bytes, value_type=bytes)
            stores = (TableWriter(app, users), TableWriter(app, items))
        self.user_store, self.item_store = stores
        crash = getattr(app, "crash_soon", None)
        self._user_persist = _Persister(self.user_store, crash)
        self._item_persist = _Persister(self.item_store, crash)
        # the broker's epoch, part of every offset mark (driftrec.streams.state); re-read after every assignment
        self.broker_epoch: str | None = None
        self._epoch_stale = True
        self._poison = faults.poison_event_id()  # a fault-injection hook (driftrec.streams.faults); None in production
        self.writer = writer or create_writer(s)
        self.rows = RowSink(self.writer, on_failure=crash)  # writes failed past feast.write_retries: stop
        self.half_life = s.feast.popularity_half_life_s
        self.recent_items = s.stream.recent_items
        self.dedupe_ids = s.stream.dedupe_ids
        self._users: dict[bytes, UserState] = {}
        self._items: dict[bytes, ItemState] = {}
        self._catalogue_ready = False
        self._unknown_since: dict[str, float] = {}  # unknown item id -> when first seen (monotonic)
        # item id -> genre weights, cached while the catalogue tells us about changes
        self._weights: dict[str, tuple] = {}
        cat = getattr(app, "catalogue", None)
        self._weights_cached = hasattr(cat, "on_item")
        if self._weights_cached:
            cat.on_item(self._on_catalogue_item)
        self._skipped = {v: metrics.FEATURE_EVENTS_SKIPPED.labels(reason=v.value)
                         for v in (Verdict.REDELIVERED, Verdict.DUPLICATE, Verdict.LATE)}
        self._replayed = metrics.FEATURE_EVENTS_SKIPPED.labels(reason="replayed")
        self._item_updates = {src: metrics.FEATURE_ITEM_UPDATES.labels(source=src) for src in ("local", "forwarded")}
        # the local item path: per owned events partition, True once its barrier came through the item
        # step (else the monotonic time of the next try); reset with every new assignment
        self._assigned: frozenset | None = None
        self._gates: dict[int, bool | float] = {}
        self._barriers: dict[str, asyncio.Future] = {}  # barrier id -> done when the item step reached it

    # -- caches mirror the tables; a rebalance (or recovery) invalidates them
    def clear_caches(self, *_args: Any, **_kwargs: Any) -> None:
        self._users.clear()
        self._items.clear()

    # -- catalogue
    @property
    def catalogue(self):
        return getattr(self.app, "catalogue", None)

    def weights_of(self, item_id: str) -> tuple:
        """An item's genre weights for the user's genre profile (cached while the catalogue reports changes)."""
        weights = self._weights.get(item_id)
        return weights if weights is not None else self._load_weights(item_id)

    def _load_weights(self, item_id: str) -> tuple:
        cat = self.catalogue
        item = cat.get(item_id) if cat is not None else None
        weights = genre_weights(item.genres if item is not None else None)
        if self._weights_cached:  # only with change notifications from the catalogue
            self._weights[item_id] = weights
        return weights

    def _on_catalogue_item(self, item) -> None:
        self._weights.pop(getattr(item, "item_id", None), None)

    async def _known_items(self, batch: Sequence[Accepted]) -> set[str]:
        cat = self.catalogue
        wanted = {a.event.item_id for a in batch}
        if cat is None:
            return wanted
        if not self._catalogue_ready:
            if not await cat.wait_caught_up(timeout=30.0):
                log.warning("features: the catalogue has not caught up after 30 s; checking items against what it has")
            self._catalogue_ready = True
        missing = {i for i in wanted if i not in cat}
        if not missing:
            return wanted
        # An item produced just before its first click may still be on its way: give every unknown id
        # the grace period once, counted from when it was first seen (a stream of clicks on ids that
        # never come must not stall every batch for the whole grace).
        now = time.monotonic()
        grace = self.settings.stream.unknown_item_grace_s
        first_seen = self._unknown_since
        deadline = max(first_seen.setdefault(i, now) for i in missing) + grace
        while missing and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            missing = {i for i in missing if i not in cat}
        if len(first_seen) > 100_000:
            first_seen.clear()
        for i in wanted - missing:
            first_seen.pop(i, None)
        return wanted - missing

    def _check(self, ev, now: float, known: set[str]) -> Rejected | None:
        t = ev.event_time
        if not isinstance(t, (int, float)) or not math.isfinite(t):
            return Rejected("bad_value", "event_time must be finite")
        if t > now + self.settings.stream.max_future_skew_s:
            return Rejected("future_time", f"event_time {t} is {t - now:.0f}s in the future")
        if isinstance(ev, Rating) and (ev.rating is None or not math.isfinite(ev.rating)):
            return Rejected("bad_value", "rating must be finite")
        if ev.item_id not in known:
            return Rejected("unknown_item", f"item {ev.item_id!r} is not in the catalogue")
        return None

    # -- step 1: users
    async def ensure_epoch(self) -> None:
        """Learn the broker's epoch (at start and after every new assignment: a restarted embedded
        broker numbers its offsets from 0 again, and its marks must not alias the old ones)."""
        if not self._epoch_stale:
            return
        bootstrap = getattr(self.app, "bootstrap_servers", None)
        if not isinstance(bootstrap, str) or not bootstrap:
            self._epoch_stale = False  # no broker (the stage alone, in tests): marks without an epoch
            return
        delay = 0.5
        while True:
            try:
                epoch = await broker_epoch(bootstrap, **client_options(self.app.settings.kafka))
                break
            except Exception as exc:  # noqa: BLE001 - retried: without it the marks could alias
                if self.broker_epoch is not None:
                    log.warning("features: could not re-read the broker's epoch (%r); keeping %s", exc, self.broker_epoch)
                    self._epoch_stale = False
                    return
                log.warning("features: could not read the broker's epoch (%r); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        if epoch != self.broker_epoch:
            log.info("features: broker epoch %s (offset marks of other epochs do not count)", epoch)
            self.broker_epoch = epoch
        self._epoch_stale = False

    def _user_bytes(self, key: bytes, partition: int) -> bytes | None:
        raw = self._user_persist.pending.get(key)
        return raw if raw is not None else self.user_store.get(key, partition)

    async def process_interactions(self, batch: Sequence[Accepted]) -> StageResult:
        """The user step over a batch. Atomic towards the caches: when it raises, the states it had
        changed are dropped from the caches (the next read takes the last persisted or pending state),
        so the pipeline can retry a subset of the batch without an event staying half-applied; the
        outputs (forwards, persists, rows) are issued only after what can raise on an event's data (a
        repeat of a forward is recognised by the item state's offset marks)."""
        batch = [a for a in batch if isinstance(a.event, (Click, Rating)) and a.topic in self.topic_codes]
        if not batch:
            return StageResult()
        if len(self._users) >= _CACHE_MAX:  # between batches only: touched states live in the cache until stored
            self._users.clear()
        await self.ensure_epoch()
        known = await self._known_items(batch)
        owned = await self.local_item_partitions()
        loaded: list[bytes] = []
        local: list[tuple[int, ItemDelta]] = []
        try:
            return await self._process_interactions(batch, known, owned, loaded, local)
        except BaseException:
            for key in loaded:  # roll back: re-read from the pending/persisted state on the next touch
                self._users.pop(key, None)
            for _q, d in local:
                self._items.pop(d.item_id.encode(), None)
            raise

    async def _process_interactions(self, batch: Sequence[Accepted], known: set[str], owned: frozenset[int],
                                    loaded: list[bytes], local: list[tuple[int, ItemDelta]]) -> StageResult:
        result = StageResult()
        cache = self._users
        now = time.time()
        touched: dict[bytes, tuple[int, str]] = {}  # user key -> (partition, user id)
        user_times: list[float] = []  # event times of the interactions the user rows carry (freshness)
        forward: dict[int, list[list]] = defaultdict(list)
        codes, recent_items, dedupe_ids = self.topic_codes, self.recent_items, self.dedupe_ids
        sources: dict[tuple[str, int], str] = {}
        epoch = self.broker_epoch
        skipped: dict[Verdict, int] = defaultdict(int)
        poison = self._poison
        for acc in batch:
            ev = acc.event
            bad = self._check(ev, now, known)
            if bad is not None:
                result.rejected.append((acc, bad))
                continue
            # a Rating always has its rating (validated), so rating None <=> a click. domain and
            # recommendation_id stay unset: the state does not use them, and each read of a Faust
            # record field is a Python descriptor call (~0.15 us an event each on this hot path)
            inter = Interaction(ev.user_id, ev.item_id, float(ev.rating) if isinstance(ev, Rating) else None,
                                float(ev.event_time), ev.event_id, None, None,
                                sources.get((acc.topic, acc.partition))
                                or sources.setdefault((acc.topic, acc.partition),
                                                      source_code(codes[acc.topic], acc.partition, epoch)),
                                acc.offset)
            key = ev.user_id.encode()
            state = cache.get(key)
            if state is None:
                state = cache[key] = UserState.loads(self._user_bytes(key, acc.partition))
            loaded.append(key)
            verdict = state.apply(inter, recent_items=recent_items, dedupe_ids=dedupe_ids)
            if poison is not None and ev.event_id == poison:
                raise faults.InjectedFault(f"injected fault on event {poison}")
            if verdict is Verdict.NEW:
                touched[key] = (acc.partition, ev.user_id)
                user_times.append(inter.event_time)
                q = item_partition(ev.item_id, self.events_partitions)
                if q in owned:
                    local.append((q, ItemDelta.of(inter)))
                else:
                    forward[q].append(forward_record(inter))
            else:
                skipped[verdict] += 1
                if verdict is Verdict.REDELIVERED:
                    touched[key] = (acc.partition, ev.user_id)  # it may not have been durable yet
        if not touched:
            self._count_skipped(skipped)
            return result
        # what can raise on an event's data comes before the first output
        values: dict[int, dict[bytes, bytes]] = defaultdict(dict)
        rows = []
        for key, (partition, user_id) in touched.items():
            state = cache[key]
            values[partition][key] = state.dumps()
            rows.append(state.feature_row(user_id, self.weights_of))
        self._count_skipped(skipped)
        sends = [await self.events_topic.send(key=b"features", value=orjson.dumps({"d": deltas}), partition=p)
                 for p, deltas in sorted(forward.items())]
        if forward:
            self._item_updates["forwarded"].inc(sum(map(len, forward.values())))
        item_rows: list = []
        item_times: list[float] = []
        if local:
            # no await between applying the items and handing their bytes and rows over: the item step
            # shares these states, and an older snapshot handed over after its newer one would win
            item_values, item_rows, item_times = self._apply_items(local)
            self._item_updates["local"].inc(len(local))
            if item_values:
                sends.append(self._item_persist.persist(item_values))
        # the user states say "applied": only once the item side of every interaction is durable
        result.durable.append(self._user_persist.persist(values, after=sends))
        result.durable.append(self.rows.submit(rows, item_rows, user_times=user_times, item_times=item_times))
        return result

    def _count_skipped(self, skipped: dict) -> None:
        for verdict, n in skipped.items():
            self._skipped[verdict].inc(n)

    async def local_item_partitions(self) -> frozenset[int]:
        """The ``topics.events`` partitions whose item states the user step may update in place now.

        Owning a partition is not enough: interactions forwarded to it earlier (by this worker, or by
        the previous owner of a source partition this worker just took over) may still wait there
        for the item step, and an item state that saw a newer offset of their source first would
        take them for replays. So after every new assignment each owned partition gets a barrier: a
        marker sent through the partition itself, behind everything already in it, while the user
        step waits (``stream.local_items_barrier_s`` at most) and forwards nothing. Once the item step
        reaches the marker the partition is applied locally until the next assignment; if it does not
        arrive in time, its interactions are forwarded as usual and a new barrier is tried later."""
        consumer = getattr(self.app, "consumer", None)
        if consumer is None or not self.local_items:
            return frozenset()
        try:
            assigned = frozenset(consumer.assignment())
        except Exception:  # noqa: BLE001 - not started / being rebalanced: forward everything
            return frozenset()
        if assigned != self._assigned:
            self._assigned, self._gates = assigned, {}
        name, gates, now = self.events_topic_name, self._gates, time.monotonic()
        owned = sorted(tp.partition for tp in assigned if tp.topic == name)
        due = [q for q in owned if gates.get(q, 0.0) is not True and now >= gates.get(q, 0.0)]
        if due:
            await self._barrier(due, gates)
        return frozenset(q for q in owned if gates.get(q) is True)

    async def _barrier(self, partitions: Sequence[int], gates: dict[int, bool | float]) -> None:
        stream = self.settings.stream
        loop = asyncio.get_running_loop()
        token = uuid.uuid4().hex
        waiting = {}
        for q in partitions:
            marker = f"{token}:{q}"
            waiting[q] = self._barriers[marker] = loop.create_future()
            await self.events_topic.send(key=b"features", value=orjson.dumps({"m": marker}), partition=q)
        try:
            await asyncio.wait(list(waiting.values()), timeout=stream.local_items_barrier_s)
        finally:
            for q in partitions:
                self._barriers.pop(f"{token}:{q}", None)
        late = []
        for q, fut in waiting.items():
            if fut.done() and not fut.cancelled():
                gates[q] = True
            else:
                fut.cancel()
                gates[q] = time.monotonic() + stream.local_items_retry_s
                late.append(q)
        if late:
            log.warning("features: the item step did not reach the barrier on %s%s within %.1fs; forwarding "
                        "their interactions, next try in %.0fs", self.events_topic_name, late,
                        stream.local_items_barrier_s, stream.local_items_retry_s)
        opened = [q for q in partitions if gates[q] is True]
        if opened:
            log.info("features: item states of %s%s are updated in the user step", self.events_topic_name, opened)

    # -- step 2: items
    async def process_item_messages(self, messages: Sequence[tuple[str, int, bytes]]) -> list[Awaitable]:
        """Apply forwarded interactions ``(topic, partition, value)``; returns what makes them durable."""
        deltas: list[tuple[int, ItemDelta]] = []
        markers = []
        for topic, partition, value in messages:
            try:
                body = orjson.loads(value)
                if "m" in body:  # a barrier of the local item path (see local_item_partitions)
                    markers.append(body["m"])
                    continue
                deltas += [(partition, ItemDelta.from_list(v)) for v in body["d"]]
            except (ValueError, KeyError, TypeError, IndexError):
                log.error("features: skipping a malformed message on %s[%d]", topic, partition)
        values, rows, times = self._apply_items(deltas)
        for marker in markers:  # everything before the marker is applied (in order) now
            fut = self._barriers.get(marker) if isinstance(marker, str) else None
            if fut is not None and not fut.done():
                fut.set_result(None)
        if not values:
            return []
        return [self._item_persist.persist(values), self.rows.submit([], rows, item_times=times)]

    def _apply_items(self, deltas: Sequence[tuple[int, ItemDelta]]) -> tuple[dict[int, dict[bytes, bytes]], list, list]:
        """Apply ``(events partition, delta)`` to the item states: ``({partition: {key: state}}, rows,
        event times)`` - the touched items' states and rows, to persist and write, and the event times of
        the deltas applied for the first time (their freshness is measured when the rows are readable)."""
        cache = self._items
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        touched: dict[bytes, tuple[int, str]] = {}
        times: list[float] = []
        half_life = self.half_life
        for partition, d in deltas:
            key = d.item_id.encode()
            state = cache.get(key)
            if state is None:
                raw = self._item_persist.pending.get(key)
                state = cache[key] = ItemState.loads(raw if raw is not None else self.item_store.get(key, partition))
            if state.apply(d, half_life_s=half_life):
                times.append(d.event_time)
            else:
                self._replayed.inc()  # re-written below all the same (it may not have been durable)
            touched[key] = (partition, d.item_id)
        values: dict[int, dict[bytes, bytes]] = defaultdict(dict)
        rows = []
        for key, (partition, item_id) in touched.items():
            state = cache[key]
            values[partition][key] = state.dumps()
            rows.append(state.feature_row(item_id))
        return values, rows, times

    async def drain(self) -> None:
        """Wait for everything submitted so far: persists and online-store writes (tests, rebalances)."""
        for persister in (self._user_persist, self._item_persist):
            await persister.settle()
        await self.rows.drain()


def register(app: "DriftrecApp") -> FeaturesStage:
    stage = FeaturesStage(app)
    app.features = stage  # type: ignore[attr-defined] - for tests and the bench
    app.pipeline.register("features", stage.process_interactions, types=(Click.TYPE, Rating.TYPE))
    seconds = metrics.AGENT_PROCESSING_SECONDS.labels(agent="features_items")

    async def item_features(batch: MessageBatch) -> list[Awaitable]:
        started = time.perf_counter()
        durable = await stage.process_item_messages([(m.topic, m.partition, m.value) for m in batch.messages])
        seconds.observe(time.perf_counter() - started)
        return durable

    batch_agent(app, [stage.events_topic], name="driftrec.features.items", handler=item_features)

    @app.task
    async def start_feature_writer() -> None:
        await stage.writer.start()

    async def on_rebalance(*_args: Any, **_kwargs: Any) -> None:
        # The caches may hold partitions that move away; states still being persisted must reach
        # the store first, or a later cache miss would read an older state.
        timeout = max(float(app.conf.broker_session_timeout) * 0.4, 1.0)
        try:
            await asyncio.wait_for(stage.drain(), timeout)
        except asyncio.TimeoutError:
            log.warning("features: writes still pending %.0f s into a rebalance", timeout)
        stage.clear_caches()
        stage._epoch_stale = True

    app.on_partitions_revoked.connect(on_rebalance)
    app.on_partitions_assigned.connect(on_rebalance)
    return stage
