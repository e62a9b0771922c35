"""The Faust application: one factory, agents registered by the modules in ``streams.agents``.

``create_app(settings, bootstrap_servers)`` builds a :class:`DriftrecApp` (a ``faust.App``) with
the broker-appropriate timeouts (short ones against Tansu, whose JoinGroup answers after about half
the session timeout), at-least-once delivery (offsets are committed only after a batch's outputs are
acknowledged by the broker; consumers are idempotent by ``event_id``) and the pipeline stages.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import faust

from driftrec.broker import is_tansu, patch_faust_for_tansu, session_timeouts
from driftrec.settings import Settings
from streams import faust_fixes
from streams.catalogue import CatalogueFollower, TopicFollower
from streams.pipeline import Pipeline

log = logging.getLogger(__name__)

# Modules with a ``register(app)`` function, in pipeline order.
AGENT_MODULES = (
    "streams.agents.ingest",
    "streams.agents.features",
    "streams.agents.recommend",
)


class DriftrecApp(faust.App):
    settings: Settings
    pipeline: Pipeline
    catalogue: CatalogueFollower
    bootstrap_servers: str


def follow(app: faust.App, follower: TopicFollower) -> TopicFollower:
    """Run a follower as a task of the app (started and stopped with the worker)."""

    async def run_follower() -> None:
        await follower.run()

    run_follower.__name__ = f"follow_{follower.name}"
    app.task(run_follower)
    return follower


def create_app(settings: Settings, bootstrap_servers: str, *, agents: tuple[str, ...] = AGENT_MODULES) -> DriftrecApp:
    faust_fixes.apply()  # at-least-once needs a producer flush that really flushes (see the module)
    if is_tansu(settings):
        patch_faust_for_tansu()
    session_timeout, heartbeat = session_timeouts(settings)
    s = settings.stream
    data_dir = Path(s.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    app = DriftrecApp(
        s.app_id,
        broker=[f"kafka://{hp}" for hp in bootstrap_servers.split(",")],
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
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        stream_wait_empty=False,
        # Metrics are served by prometheus_client (driftrec.metrics), not Faust's web server,
        # so several workers on one host need no port each.
        web_enabled=False,
        table_standby_replicas=0,
        logging_config=None,
    )
    app.settings = settings
    app.bootstrap_servers = bootstrap_servers
    app.pipeline = Pipeline()
    app.catalogue = follow(app, CatalogueFollower(settings, bootstrap_servers))
    if os.environ.get("DRIFTREC_AGENTS"):  # development aid: a subset of agents
        agents = tuple(os.environ["DRIFTREC_AGENTS"].split(","))
    for name in agents:
        module = __import__(name, fromlist=["register"])
        module.register(app)
    from driftrec import metrics

    inputs = [settings.topics.clicks.name, settings.topics.ratings.name, settings.topics.items.name,
              settings.topics.requests.name]
    metrics.prime(domains=(settings.model.default_domain,), topics=inputs)

    @app.timer(interval=5.0)
    async def export_consumer_lag() -> None:
        """Messages behind the high watermark on this worker's partitions, per input topic."""
        consumer = app.consumer
        lag: dict[str, int] = {t: 0 for t in inputs}
        for tp in consumer.assignment():
            hw = consumer.highwater(tp)
            read = consumer._read_offset.get(tp)
            if hw is not None and tp.topic in lag:
                lag[tp.topic] += max(int(hw) - (int(read) + 1 if read is not None else 0), 0)
        for topic, value in lag.items():
            metrics.CONSUMER_LAG.labels(topic=topic).set(value)

    log.info("driftrec app %s: pipeline stages %s", s.app_id, app.pipeline.stage_names)
    return app
