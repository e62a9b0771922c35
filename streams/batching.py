"""Batch delivery for Faust agents: a whole fetch per agent step instead of one event.

Faust hands its streams one message at a time, and every message costs a few event-loop round
trips (the consumer waits on each delivery with two new tasks; the stream wakes once per message):
about 100 µs per event on these 2-core machines, so a Faust agent that does nothing tops out near
10,000 events/s. The features stage has to sustain twice that per worker.

This module keeps Faust's consumer (group membership, rebalances, flow control, offset commits,
table recovery) and changes only how fetched records reach the agents that ask for batches:

* :class:`BatchingConsumer` is Faust's aiokafka consumer with its own ``_drain_messages``: for a
  topic routed to a :class:`BatchRoute`, every record of one fetch (all its partitions) becomes one
  :class:`MessageBatch` that is put on the route's Faust channel in one step; other topics take
  Faust's own per-message path unchanged. Read offsets, gaps, generation changes and paused flow
  are handled as in Faust's loop, and the input records of a fetch that was out while the partitions
  were sought to their committed offsets (the end of a rebalance) are dropped and the partitions sought
  again (those records may predate the seek).
* :func:`batch_agent` registers a Faust agent on that channel. Its handler returns, per batch, the
  awaitables that make the batch's outputs durable (changelog records acknowledged by the broker,
  online-store rows written, forwards acknowledged). The batch's messages are acknowledged to
  Faust - and so become committable - only once those have completed, in batch order, by a
  separate acker task, so processing of the next batch overlaps the writes of the previous ones
  (at most ``max_in_flight`` batches wait). Offsets are committed by Faust's commit timer as usual:
  committed offsets imply durable outputs, which is what at-least-once needs.
* An output that fails or hangs must not stall commits silently. An output the handler wraps in
  :class:`Retry` (one it can issue again, idempotently: a dead letter) is re-issued with exponential
  backoff; a batch whose outputs still failed, or are not durable within ``output_timeout_s`` of
  its hand-over, stops the worker loudly (``app.crash_soon``: the process exits non-zero, a
  supervisor restarts it, and everything uncommitted is replayed from the committed offsets). No
  later batch is acknowledged meanwhile. ``driftrec_consumer_uncommitted_records`` (the app's
  timer) shows records read but not committed, so a stall is visible before that too.
* On a rebalance, batches still queued are dropped by Faust's flow control (their messages were
  never acknowledged, so they are fetched again from the committed offsets), a batch that reaches the
  agent after the rebalance began (it was being put on the channel meanwhile) is dropped unprocessed,
  as Faust's streams drop a message of an older generation
  (``driftrec_consumer_stale_batches_total``), and the revoke handler waits for the batches already
  taken to become durable before the partitions move on.

``app.batch_routes`` maps topic names to routes; :meth:`driftrec.streams.app.DriftrecApp._new_transport`
installs :class:`BatchingTransport`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Sequence

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka

if TYPE_CHECKING:  # pragma: no cover
    import faust

log = logging.getLogger(__name__)


@dataclass
class MessageBatch:
    """The records of one fetch for one route, in offset order per partition."""

    messages: list  # faust ConsumerMessage
    fetched_at: float = field(default_factory=time.time)

    def __len__(self) -> int:
        return len(self.messages)


class Retry:
    """A batch output that can be issued again: ``make()`` issues it and completes once it is durable.

    The acker re-issues it with exponential backoff when it fails (so it must be idempotent, or its
    repeats harmless: a dead letter sent twice is two copies of one letter)."""

    def __init__(self, make: Callable[[], Awaitable], what: str = "output") -> None:
        self.make = make
        self.what = what

    async def run(self, attempts: int, backoff_s: float, name: str) -> None:
        delay = backoff_s
        for attempt in range(attempts + 1):
            try:
                await self.make()
                return
            except Exception as exc:  # noqa: BLE001 - retried, then reported to the acker
                if attempt >= attempts:
                    raise
                from driftrec.core import metrics

                metrics.OUTPUT_RETRIES.labels(agent=name).inc()
                log.warning("%s: %s failed (%r); retry %d of %d in %.1fs", name, self.what, exc,
                            attempt + 1, attempts, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)


Handler = Callable[[MessageBatch], Awaitable[Sequence[Awaitable | Retry] | None]]


class BatchRoute:
    """Topics whose records are delivered to one agent as :class:`MessageBatch` objects."""

    def __init__(self, app: "faust.App", name: str, topics: Iterable[str], *, maxsize: int = 2) -> None:
        self.app = app
        self.name = name
        self.topics = frozenset(topics)
        self.channel = app.channel(maxsize=maxsize)

    async def deliver(self, batch: MessageBatch) -> None:
        # A channel only passes values to its subscribers: wait for the agent to subscribe
        # (at start-up, or while it is restarted by its supervisor) rather than drop the batch.
        channel = self.channel
        while not channel.subscriber_count:
            await asyncio.sleep(0.01)
        await channel.put(batch)


class BatchingConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer that delivers routed topics a fetch at a time."""

    #: how many seeks to the committed offsets have begun (a fetch out meanwhile may predate one)
    _driftrec_seeks = 0

    async def perform_seek(self) -> None:
        self._driftrec_seeks += 1
        await super().perform_seek()

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - exercised end to end
        routes: dict[str, BatchRoute] = getattr(self.app, "batch_routes", {})
        callback = self.callback
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        read_offset = self._read_offset
        to_message = self._to_message
        acks_enabled_for = self.app.topics.acks_enabled_for
        set_flag, unset_flag = self.diag.set_flag, self.diag.unset_flag
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                seeks = self._driftrec_seeks
                records, active = await self._wait_next_records(1.0)
                await self.sleep(0)  # as Faust: never starve the loop when fetches return at once
                if not records or self.should_stop:
                    continue
                reseek = False
                if self._driftrec_seeks != seeks:
                    # The partitions were sought to their committed offsets (the end of a rebalance's
                    # recovery) while this fetch was out - the Kafka client fetches on its own thread - so
                    # its records of the input topics may come from the positions before that seek.
                    # Taking them would move the read offsets past records that are fetched again next and
                    # then skipped as already read: never processed, never acknowledged. Drop those and
                    # seek again below; changelog records (a recovery or a standby reading) go on as usual.
                    stale = [tp for tp in records if not self._is_changelog_tp(tp)]
                    if stale:
                        records = {tp: recs for tp, recs in records.items() if tp not in stale}
                        reseek = True
                generation = self.app.consumer_generation_id
                batches: dict[BatchRoute, list] = {}
                for tp, recs in records.items():
                    if not self.flow_active or self.app.consumer_generation_id != generation:
                        batches.clear()  # a rebalance began: nothing of this fetch is delivered
                        break
                    if active is not None and tp not in active and tp not in self._buffered_partitions:
                        continue
                    self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
                    route = routes.get(tp.topic)
                    out = batches.setdefault(route, []) if route is not None else None
                    r_offset = read_offset[tp]
                    acks_enabled = acks_enabled_for(tp.topic)
                    for rec in recs:
                        offset = rec.offset
                        if r_offset is not None and offset < r_offset:
                            continue  # already read (Faust drops these too)
                        if r_offset and offset - r_offset > 1 and acks_enabled:
                            await self._add_gap(tp, r_offset + 1, offset)
                        message = to_message(tp, rec)
                        if out is not None:
                            out.append(message)
                        else:
                            await self.wait_first(callback(message), self.suspend_flow.wait())
                        r_offset = offset
                    read_offset[tp] = r_offset
                for route, messages in batches.items():
                    if messages:
                        await route.deliver(MessageBatch(messages))
                if reseek and self.flow_active:  # (a rebalance under way seeks at its end anyway)
                    await self.perform_seek()
                unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)


class BatchingTransport(faust_aiokafka.Transport):
    Consumer = BatchingConsumer


# --- agents over batches -----------------------------------------------------------------------


class OutputsFailed(RuntimeError):
    """A batch's outputs failed after their retries, or were not durable in time."""


class _Acker:
    """Acknowledges batches to Faust, in order, once their outputs are durable.

    A batch whose outputs failed (after the retries of the :class:`Retry` ones) or are still not
    durable ``timeout_s`` after its hand-over is never acknowledged, and neither is any later one:
    ``on_failure`` is told (the app's ``crash_soon``) so the worker stops loudly instead of running on
    without committing."""

    def __init__(self, app: "faust.App", name: str, max_in_flight: int, *, retries: int = 5,
                 backoff_s: float = 0.5, timeout_s: float = 300.0,
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        self.app = app
        self.name = name
        self.retries, self.backoff_s, self.timeout_s = retries, backoff_s, timeout_s
        self.on_failure = on_failure
        self.failed: BaseException | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._idle = asyncio.Event()
        self._idle.set()
        self._pending = 0

    async def submit(self, batch: MessageBatch, durable: Sequence[Awaitable | Retry]) -> None:
        await self._slots.acquire()  # back-pressure: at most max_in_flight batches not yet durable
        self._pending += 1
        self._idle.clear()
        futures = [asyncio.ensure_future(d.run(self.retries, self.backoff_s, self.name) if isinstance(d, Retry) else d)
                   for d in durable]
        self._queue.put_nowait((batch, futures, time.monotonic() + self.timeout_s))

    async def run(self) -> None:
        consumer = self.app.consumer
        while True:
            batch, futures, deadline = await self._queue.get()
            try:
                if self.failed is not None:
                    for f in futures:
                        f.add_done_callback(_retrieve)
                    continue  # the worker is stopping: nothing after a failed batch is acknowledged
                if futures:
                    error = await _durable(futures, self.name, deadline - time.monotonic())
                    if error is not None:
                        self._fail(error)
                        continue  # not acknowledged: fetched again from the committed offsets
                generation = self.app.consumer_generation_id
                ack = consumer.ack
                for m in batch.messages:
                    # A batch fetched before a rebalance is read again from the committed offsets by
                    # whoever owns its partitions now: acknowledging it could commit past that.
                    if m.generation_id == generation:
                        ack(m)
            finally:
                self._pending -= 1
                if not self._pending:
                    self._idle.set()
                self._slots.release()

    def _fail(self, error: BaseException) -> None:
        self.failed = error
        log.critical("%s: a batch's outputs failed (%r); its offsets stay uncommitted and the worker stops "
                     "(a restart replays everything uncommitted)", self.name, error)
        if self.on_failure is not None:
            self.on_failure(OutputsFailed(f"{self.name}: {error!r}"))

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


async def _durable(futures: list, name: str, timeout: float | None = None) -> BaseException | None:
    """Await every future (at most ``timeout`` s); the first error, or a TimeoutError, else None.

    The writers retry what can be retried (and the acker re-issues :class:`Retry` outputs); a batch
    whose outputs still failed is not acknowledged, so its offsets - and every later offset of its
    partitions - stay uncommitted and the records come back after the restart. The outputs are
    idempotent, so that is safe.
    """
    if timeout is not None:
        done, pending = await asyncio.wait(futures, timeout=max(timeout, 0.0))
        if pending:
            for f in pending:
                f.add_done_callback(_retrieve)
            return TimeoutError(f"{len(pending)} of {len(futures)} outputs not durable in time")
    results = await asyncio.gather(*futures, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        log.error("%s: a batch's outputs failed (%r); its offsets stay uncommitted", name, errors[0])
        return errors[0]
    return None


def _stale(app: "faust.App", batch: MessageBatch) -> bool:
    """Whether ``batch`` was fetched before the current rebalance (flow suspended, or an older generation)."""
    flow = getattr(app, "flow_control", None)
    if flow is not None and not flow.is_active():
        return True
    generation = app.consumer_generation_id
    messages = batch.messages
    return bool(messages) and (messages[0].generation_id != generation or messages[-1].generation_id != generation)


def batch_agent(app: "faust.App", topics: Iterable[Any], *, name: str, handler: Handler,
                max_in_flight: int = 64) -> BatchRoute:
    """Register a Faust agent that receives ``topics`` as :class:`MessageBatch` objects.

    ``topics`` are Faust topic objects (they are registered with the app, so the consumer
    subscribes to them); ``handler(batch)`` returns the awaitables that make the batch durable.
    """
    topics = list(topics)
    names = [n for t in topics for n in t.topics]
    if not hasattr(app, "batch_routes"):
        app.batch_routes = {}
    route = BatchRoute(app, name, names)
    for n in names:
        if n in app.batch_routes:
            raise ValueError(f"topic {n!r} is routed to {app.batch_routes[n].name!r} already")
        app.batch_routes[n] = route
    for t in topics:
        app.topics.add(t)  # subscribed by the conductor like an agent's topic
    stream = getattr(getattr(app, "settings", None), "stream", None)
    acker = _Acker(app, name, max_in_flight,
                   retries=getattr(stream, "output_retries", 5), backoff_s=getattr(stream, "output_retry_backoff_s", 0.5),
                   timeout_s=getattr(stream, "output_timeout_s", 300.0), on_failure=getattr(app, "crash_soon", None))
    route.acker = acker  # type: ignore[attr-defined]

    async def run_acker() -> None:
        await acker.run()

    run_acker.__name__ = f"ack_{name.replace('.', '_')}"
    app.task(run_acker)

    async def agent(stream):
        from driftrec.core import metrics

        stale = metrics.STALE_BATCHES.labels(agent=name)
        async for batch in stream:
            if _stale(app, batch):
                # As Faust's own streams skip a message of an older generation: its partition may belong to
                # another worker now, which reads it again from the committed offsets; processing it here
                # would write state and forwards for a partition this worker no longer owns.
                stale.inc()
                log.info("%s: dropping a batch of %d records fetched before a rebalance", name, len(batch))
                continue
            durable = await handler(batch)
            await acker.submit(batch, list(durable or ()))

    agent.__name__ = name.replace(".", "_")
    app.agent(route.channel, name=name)(agent)

    async def on_revoked(*_args: Any, **_kwargs: Any) -> None:
        # The partitions move on: let the batches already taken finish their writes first.
        timeout = max(float(app.conf.broker_session_timeout) * 0.5, 1.0)
        if not await acker.wait_idle(timeout):
            log.warning("%s: batches still not durable %.0f s into a rebalance", name, timeout)

    app.on_partitions_revoked.connect(on_revoked)
    return route
