"""The Faust application: one factory, agents registered by the modules in ``driftrec.streams.agents``.

``create_app(settings, bootstrap_servers)`` builds a :class:`DriftrecApp` (a ``faust.App``) with
the broker-appropriate timeouts (short ones against Tansu, whose JoinGroup answers after about half
the session timeout), at-least-once delivery (offsets are committed only after a batch's outputs are
acknowledged by the broker; consumers are idempotent by ``event_id``) and the pipeline stages.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from pathlib import Path

import faust

from driftrec.core.broker import is_tansu, session_timeouts
from driftrec.core.kafka_auth import faust_credentials
from driftrec.core.settings import Settings
from driftrec.streams import faust_patches
from driftrec.streams.batching import BatchingTransport
from driftrec.core.followers import CatalogueFollower, TopicFollower
from driftrec.streams.pipeline import Pipeline

log = logging.getLogger(__name__)

# Modules with a ``register(app)`` function, in pipeline order.
AGENT_MODULES = (
    "driftrec.streams.agents.ingest",
    "driftrec.streams.agents.features",
    "driftrec.streams.agents.recommend",
)


class DriftrecApp(faust.App):
    settings: Settings
    pipeline: Pipeline
    catalogue: CatalogueFollower
    bootstrap_servers: str

    def crash_soon(self, reason: BaseException) -> None:
        """Stop the worker because of ``reason`` (from code that cannot await): a supervisor restarts it,
        and what was not committed is replayed."""
        log.critical("stopping the worker: %r", reason)
        asyncio.ensure_future(self.crash(reason))

    def _new_transport(self):
        # Faust's aiokafka transport, with batch delivery for the agents that ask for it
        return BatchingTransport(self.conf.broker_consumer, self)


async def send_soon(app: faust.App, topic: str, value: bytes, *, key: bytes | None = None,
                    partition: int | None = None) -> asyncio.Future:
    """Hand one record to the app's Kafka producer; returns the future that completes once the broker has it
    (a batch output for :mod:`driftrec.streams.batching`).

    Faust's ``topic.send`` costs a whole turn of the event loop per record (``app.maybe_start_producer`` is
    a ``@stampede`` coroutine: every caller awaits a shared future): with a few thousand events a second
    in the loop's other tasks that measured ~6 ms a send (p99 ~35 ms), which queued the requests of a
    batch behind each other. The producer's own ``send`` only appends to its record batch."""
    producer = app.producer
    if not producer._started.is_set():  # (the worker starts it before any agent runs)
        await app.maybe_start_producer()
    return await producer._ensure_producer().send(topic, value, key=key, partition=partition)


async def stage_ready(app: faust.App, timeout: float = 120.0) -> None:
    """Wait until the worker has started and its feature writer is up (when it has one)."""
    deadline = asyncio.get_running_loop().time() + timeout
    features = getattr(app, "features", None)
    while asyncio.get_running_loop().time() < deadline:
        if features is None or features.writer.started:
            return
        await asyncio.sleep(0.2)


def follow(app: faust.App, follower: TopicFollower) -> TopicFollower:
    """Run a follower as a task of the app (started and stopped with the worker)."""

    async def run_follower() -> None:
        await follower.run()

    run_follower.__name__ = f"follow_{follower.name}"
    app.task(run_follower)
    return follower


def create_app(settings: Settings, bootstrap_servers: str, *, agents: tuple[str, ...] = AGENT_MODULES) -> DriftrecApp:
    """The worker's Faust app: patched Faust, the app itself, the agents and followers, metrics and the
    lifecycle hooks (consumer lag, start-up heap freeze, event-loop lag)."""
    _apply_faust_patches(settings)
    app = _build_faust_app(settings, bootstrap_servers)
    _attach_app_state(app, settings, bootstrap_servers)
    _register_agents(app, agents)
    inputs = _input_topics(settings)
    _prime_metrics(settings, inputs)
    _add_consumer_lag_timer(app, inputs)
    _add_startup_heap_freeze(app)
    _add_loop_lag_timer(app)
    log.info("driftrec app %s: pipeline stages %s", settings.stream.app_id, app.pipeline.stage_names)
    return app


def _apply_faust_patches(settings: Settings) -> None:
    """Apply driftrec's Faust patches, and the Tansu ones when the broker is Tansu."""
    faust_patches.apply()  # at-least-once needs a producer flush that really flushes (see the module)
    if is_tansu(settings):
        faust_patches.apply_tansu()


def _build_faust_app(settings: Settings, bootstrap_servers: str) -> DriftrecApp:
    """The :class:`DriftrecApp` with the broker-appropriate timeouts, at-least-once delivery settings and
    the table store in ``settings.stream.data_dir`` (created if missing)."""
    session_timeout, heartbeat = session_timeouts(settings)
    s = settings.stream
    data_dir = Path(s.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    return DriftrecApp(
        s.app_id,
        broker=[f"kafka://{hp}" for hp in bootstrap_servers.split(",")],
        broker_credentials=faust_credentials(settings.kafka),
        store="rocksdb://" if s.table_store == "rocksdb" else "memory://",
        datadir=str(data_dir),
        autodiscover=False,
        topic_partitions=settings.topics.clicks.partitions,
        topic_replication_factor=1,
        broker_session_timeout=session_timeout,
        broker_heartbeat_interval=heartbeat,
        broker_rebalance_timeout=max(session_timeout * 2, 20.0),
        broker_request_timeout=max(session_timeout * 3, 40.0),
        broker_commit_interval=1.0,
        broker_max_poll_records=s.batch_size,
        # changelog records go out in record batches of up to this size (driftrec.streams.changelog)
        producer_max_batch_size=1024 * 1024,
        producer_max_request_size=4 * 1024 * 1024,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        stream_wait_empty=False,
        # Metrics are served by prometheus_client (driftrec.core.metrics), not Faust's web server,
        # so several workers on one host need no port each.
        web_enabled=False,
        table_standby_replicas=0,
        logging_config=None,
    )


def _attach_app_state(app: DriftrecApp, settings: Settings, bootstrap_servers: str) -> None:
    """What the agents find on the app: the settings, the broker address, the (empty) pipeline and the
    catalogue follower (run as a task of the app)."""
    app.settings = settings
    app.bootstrap_servers = bootstrap_servers
    app.pipeline = Pipeline()
    app.catalogue = follow(app, CatalogueFollower(settings, bootstrap_servers))


def _register_agents(app: DriftrecApp, agents: tuple[str, ...]) -> None:
    """Call ``register(app)`` of each agent module, in order (``DRIFTREC_AGENTS``, comma-separated,
    replaces ``agents``: a development aid to run a subset)."""
    if os.environ.get("DRIFTREC_AGENTS"):  # development aid: a subset of agents
        agents = tuple(os.environ["DRIFTREC_AGENTS"].split(","))
    for name in agents:
        module = __import__(name, fromlist=["register"])
        module.register(app)


def _input_topics(settings: Settings) -> list[str]:
    """The topics the worker consumes (the consumer lag is exported for these)."""
    return [settings.topics.clicks.name, settings.topics.ratings.name, settings.topics.items.name,
            settings.topics.requests.name]


def _prime_metrics(settings: Settings, inputs: list[str]) -> None:
    """Create the metrics' fixed label sets (this domain, the input topics) at 0 before the first event."""
    from driftrec.core import metrics

    metrics.prime(domains=(settings.model.default_domain,), topics=inputs)


def _add_consumer_lag_timer(app: DriftrecApp, inputs: list[str]) -> None:
    """Every 5 s, export the consumer lag (read offsets) and the uncommitted records (committed offsets)
    per input topic."""
    from driftrec.core import metrics

    @app.timer(interval=5.0)
    async def export_consumer_lag() -> None:
        """Messages behind the high watermark on this worker's partitions, per input topic."""
        consumer = app.consumer
        lag: dict[str, int] = {t: 0 for t in inputs}
        uncommitted: dict[str, int] = {t: 0 for t in inputs}
        committed_at = getattr(consumer, "_committed_offset", {})
        for tp in consumer.assignment():
            hw = consumer.highwater(tp)
            if hw is None or tp.topic not in lag:
                continue
            read = consumer._read_offset.get(tp)
            lag[tp.topic] += max(int(hw) - (int(read) + 1 if read is not None else 0), 0)
            committed = committed_at.get(tp)  # the next offset to read after a restart (Kafka's convention)
            uncommitted[tp.topic] += max(int(hw) - (int(committed) if committed is not None else 0), 0)
        for topic, value in lag.items():
            metrics.CONSUMER_LAG.labels(topic=topic).set(value)
            metrics.CONSUMER_UNCOMMITTED.labels(topic=topic).set(uncommitted[topic])


def _add_startup_heap_freeze(app: DriftrecApp) -> None:
    """Once the worker is up, freeze its start-up heap out of the garbage collector's reach."""

    @app.task
    async def freeze_startup_heap() -> None:
        """Keep the garbage collector off what start-up built (Feast, pandas, Faust: millions of objects).

        A full collection walks every tracked object; with the imported libraries that took ~250 ms
        here, several times a minute, and stalled the stream each time. Once the worker is up, its
        start-up objects live for the whole process: ``gc.freeze`` moves them out of the collector's
        reach, so collections only walk what the stream allocates.
        """
        await stage_ready(app)
        gc.collect()
        gc.freeze()
        # The stream allocates and frees objects at a high rate, nearly all of them acyclic (freed by
        # reference counting): collect the young generation every 50,000 allocations, not 700.
        gc.set_threshold(50_000, 20, 20)
        log.info("start-up heap frozen: %d objects outside the garbage collector", gc.get_freeze_count())


def _add_loop_lag_timer(app: DriftrecApp) -> None:
    """Every 0.25 s, measure how late the event loop runs."""
    from driftrec.core import metrics

    @app.timer(interval=0.25)
    async def measure_loop_lag() -> None:
        """How late the event loop runs a 10 ms sleep: long steps (big batches, collections) stall everything."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.sleep(0.01)
        metrics.EVENT_LOOP_LAG_SECONDS.observe(max(loop.time() - t0 - 0.01, 0.0))
