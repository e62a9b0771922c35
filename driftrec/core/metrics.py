"""Every Prometheus metric of driftrec, defined once, here.

Import the module-level objects and use them; never create a metric anywhere else::

    from driftrec.core import metrics
    metrics.EVENTS_INGESTED.labels(event_type="click", outcome="ok").inc()
    with metrics.AGENT_PROCESSING_SECONDS.labels(agent="validate").time():
        ...

Naming rules (checked by ``tests/test_observability.py``):

* every name starts with ``driftrec_``;
* base units only, spelled out as a suffix: ``_seconds``, ``_bytes`` (never ms / MB);
* counters end in ``_total`` (prometheus_client adds it: the name passed to ``Counter`` omits it);
* info-style metrics end in ``_info`` and carry the value 1;
* labels take values from small fixed sets only (event type, outcome, agent name, store, domain,
  decision, reason class, source, endpoint, HTTP status, topic...). A user id, item id, request id,
  free-text error message or anything else unbounded is NEVER a label value: put it in a log line.

Histogram buckets: ``LATENCY_FAST_BUCKETS`` for in-process work (100 us .. 2.5 s),
``SCORING_BUCKETS`` for scorer calls (1 ms .. 2.5 s, dense around the tens of ms),
``FRESHNESS_BUCKETS`` for event-time based latencies (5 ms .. 60 s; 0.25 s is a bucket boundary so
the 250 ms freshness SLO is measured exactly), ``TRAINER_BUCKETS`` for training steps.

Exposition: ``start_metrics_server(port)`` for a process of its own (Faust worker, trainer), or
``aiohttp_metrics_handler`` mounted at ``/metrics`` in an aiohttp app (the scorer).
"""

from __future__ import annotations

import platform
import threading
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
    start_http_server,
)
from prometheus_client.metrics import MetricWrapperBase

from driftrec import __version__

__all__ = [
    "LATENCY_FAST_BUCKETS",
    "SCORING_BUCKETS",
    "FRESHNESS_BUCKETS",
    "TRAINER_BUCKETS",
    "start_metrics_server",
    "stop_metrics_servers",
    "aiohttp_metrics_handler",
    "set_active_adapter",
    "all_metrics",
    "exported_sample_names",
]

# --------------------------------------------------------------------------------------- buckets

LATENCY_FAST_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)
SCORING_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
)
FRESHNESS_BUCKETS = (  # 0.25 s is the freshness SLO: a boundary, so "share within it" is exact
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0, 60.0,
)
TRAINER_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)

# ------------------------------------------------------------------------------ ingest / pipeline

EVENTS_INGESTED = Counter(
    "driftrec_events_ingested",
    "Events read from the input topics, by event type (click/rating/item/request) and outcome "
    "(ok = validated and forwarded, dead_lettered = sent to the dead-letter topic).",
    ["event_type", "outcome"],
)
DEAD_LETTERS = Counter(
    "driftrec_dead_letters",
    "Events sent to the dead-letter topic, by reason class "
    "(decode/schema/too_large/future_time/too_old/unknown_type/processing).",
    ["reason"],
)
AGENT_PROCESSING_SECONDS = Histogram(
    "driftrec_agent_processing_seconds",
    "Time one Faust agent spends on one event (or one batch for batching agents), by agent name.",
    ["agent"],
    buckets=LATENCY_FAST_BUCKETS,
)
EVENT_LOOP_LAG_SECONDS = Histogram(
    "driftrec_event_loop_lag_seconds",
    "How late a worker's event loop wakes from a short sleep: the longest stretch it was busy with "
    "one step (a large batch, a garbage collection) and every other task waited.",
    buckets=LATENCY_FAST_BUCKETS,
)
CONSUMER_LAG = Gauge(
    "driftrec_consumer_lag_messages",
    "Messages between the committed/consumed offset and the high watermark, summed over the "
    "partitions this worker owns, by topic.",
    ["topic"],
)

CONSUMER_UNCOMMITTED = Gauge(
    "driftrec_consumer_uncommitted_records",
    "Records between the group's committed offset and the high watermark, summed over the partitions "
    "this worker owns, by topic: read-but-unacknowledged records included, so a batch whose outputs never "
    "become durable (commits stalled) shows here while the read-offset lag stays low.",
    ["topic"],
)

STALE_BATCHES = Counter(
    "driftrec_consumer_stale_batches_total",
    "Fetched batches dropped before processing because a rebalance began after they were fetched (their "
    "records are read again from the committed offsets by whoever owns the partitions now), by batch agent.",
    ["agent"],
)
OUTPUT_RETRIES = Counter(
    "driftrec_output_retries_total",
    "Batch outputs re-issued after a failure (dead letters), by batch agent; the worker stops once "
    "the retries are spent.",
    ["agent"],
)

EVENTS_REKEYED = Counter(
    "driftrec_events_rekeyed_total",
    "Clicks and ratings found on another partition than their user id's (a record key that is not the "
    "user id) and re-produced keyed by the user id, by event type.",
    ["event_type"],
)

# ------------------------------------------------------------------------------- feature store

FEATURE_FRESHNESS_SECONDS = Histogram(
    "driftrec_feature_freshness_seconds",
    "Event time to the moment its feature update is readable in the online store, one observation per "
    "event (a row that coalesces several events counts each from its own event time), by store "
    "(sqlite/redis) and feature view (user_features/item_features; item rows are one hop further).",
    ["store", "feature_view"],
    buckets=FRESHNESS_BUCKETS,
)
FEATURE_NEWEST_EVENT_LAG_SECONDS = Gauge(
    "driftrec_feature_newest_event_lag_seconds",
    "Wall clock minus the event time of the newest event written to the online store, by store.",
    ["store"],
)
FEATURE_ROWS_WRITTEN = Counter(
    "driftrec_feature_rows_written",
    "Rows written to the online store, by store and feature view.",
    ["store", "feature_view"],
)
FEATURE_WRITE_SECONDS = Histogram(
    "driftrec_feature_write_seconds",
    "Duration of one online-store write (one batch), by store.",
    ["store"],
    buckets=LATENCY_FAST_BUCKETS,
)
FEATURE_EVENTS_SKIPPED = Counter(
    "driftrec_feature_events_skipped",
    "Interactions the features stage did not apply again, by reason (redelivered = same event "
    "and source position replayed after a crash, duplicate = same event id from another position, "
    "late = older than the per-user dedupe memory reaches, replayed = item update already applied).",
    ["reason"],
)
FEATURE_ITEM_UPDATES = Counter(
    "driftrec_feature_item_updates",
    "Interactions applied to item states, by source: local = in the user step (this worker owns the "
    "item's partition), forwarded = through the events topic to the item step.",
    ["source"],
)
FEATURE_WRITE_FAILURES = Counter(
    "driftrec_feature_write_failures",
    "Online-store write attempts that failed (the rows are retried with back-off, then the worker stops), "
    "by store and reason (timeout = the writer process did not answer within feast.write_timeout_s and "
    "was killed, writer_exited = it died, writer_start = a new one could not start, store_error = the "
    "store refused the write, other).",
    ["store", "reason"],
)

# ------------------------------------------------------------------------------------- serving

SCORING_LATENCY_SECONDS = Histogram(
    "driftrec_scoring_latency_seconds",
    "Scorer model time for one scoring request (after queueing), by domain.",
    ["domain"],
    buckets=SCORING_BUCKETS,
)
SCORING_QUEUE_SECONDS = Histogram(
    "driftrec_scoring_queue_seconds",
    "Time a scoring request waits in the scorer before the model starts on it.",
    buckets=SCORING_BUCKETS,
)
SCORER_REQUESTS = Counter(
    "driftrec_scorer_requests",
    "HTTP requests handled by the scorer, by endpoint (route name) and HTTP status code.",
    ["endpoint", "status"],
)
SCORER_CLIENT_SECONDS = Histogram(
    "driftrec_scorer_client_seconds",
    "Round-trip time of a scoring call seen by the recommend agent (network + queue + model).",
    buckets=SCORING_BUCKETS,
)
SCORER_CIRCUIT_OPEN = Gauge(
    "driftrec_scorer_circuit_open",
    "1 while the recommend stage's scorer client has its circuit open (requests answered from the fallback "
    "without calling the scorer), else 0.",
)
SCORER_CIRCUIT_OPENS = Counter(
    "driftrec_scorer_circuit_opens",
    "Times the scorer client's circuit opened (consecutive failures, a refused connection, or a failed trial).",
)
API_REQUESTS = Counter(
    "driftrec_api_requests",
    "Requests to the worker's synchronous API (GET /v1/recommendations/{user_id}), by HTTP status code.",
    ["status"],
)
API_REQUEST_SECONDS = Histogram(
    "driftrec_api_request_seconds",
    "Time the worker's synchronous API took to answer one recommendation request (ranking included).",
    buckets=SCORING_BUCKETS,
)
E2E_LATENCY_SECONDS = Histogram(
    "driftrec_event_to_recommendation_seconds",
    "Event time of the triggering event/request to the recommendation being published.",
    buckets=FRESHNESS_BUCKETS,
)
RECOMMENDATIONS_PUBLISHED = Counter(
    "driftrec_recommendations_published",
    "Recommendation lists published to the recommendations topic.",
)
FALLBACKS = Counter(
    "driftrec_recommendation_fallbacks",
    "Recommendations served without the LM scorer, by reason "
    "(scorer_timeout/scorer_error/scorer_unavailable/scorer_circuit_open/deadline/policy_error/policy_not_ready).",
    ["reason"],
)
RANKING_BACKLOG = Gauge(
    "driftrec_ranking_backlog",
    "Interactions delivered to the worker's ranking policy and not learnt yet (ranking.engine=policy; with "
    "ranking.learner=process, those whose fusion has not come back from the learner process included).",
)
RANKING_OBSERVED = Counter(
    "driftrec_ranking_observed",
    "Interactions (clicks and ratings, in topic order) the worker's ranking policy has learnt from "
    "(ranking.engine=policy; with ranking.learner=process: whose fusion came back from the learner process).",
)
RANKING_LEARNER_EXITS = Counter(
    "driftrec_ranking_learner_exits",
    "Times the ranking policy's learner process went away (the worker then learns in its own process).",
)
CANDIDATES = Counter(
    "driftrec_candidates",
    "Candidates gathered for scoring, by candidate source (popular/recent/co_visit/kg/...).",
    ["source"],
)

# ---------------------------------------------------------------------------------- adaptation

CORRECTION_ERROR = Gauge(
    "driftrec_correction_error",
    "Windowed mean absolute error of the River online correction, by domain.",
    ["domain"],
)
CORRECTION_ABS_ERROR = Histogram(
    "driftrec_correction_abs_error",
    "Absolute error of the River online correction per observed outcome (unitless score).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0),
)
DRIFT_DETECTIONS = Counter(
    "driftrec_drift_detections",
    "Concept drift detections raised by the online correction, by domain and detector.",
    ["domain", "detector"],
)
ADAPTER_ACTIVE = Gauge(
    "driftrec_adapter_active_info",
    "1 for the adapter version currently served, per domain (set with set_active_adapter).",
    ["domain", "version"],
)
ADAPTER_SWAPS = Counter(
    "driftrec_adapter_swaps",
    "Adapter hot-swap attempts in the scorer, by domain and outcome (ok/failed/rejected).",
    ["domain", "outcome"],
)
CHECKPOINT_REJECTIONS = Counter(
    "driftrec_checkpoint_rejections",
    "Adapter checkpoints refused before loading, by reason "
    "(checksum/shape/config/missing_file/too_large/untrusted).",
    ["reason"],
)
CONTROL_REJECTED = Counter(
    "driftrec_control_messages_rejected",
    "Control messages (adapter activate/rollback) on Kafka not acted on, by reason "
    "(malformed/no_key/unsigned/bad_signature/stale/replayed).",
    ["reason"],
)
ROLLBACKS = Counter(
    "driftrec_rollbacks",
    "Adapter rollbacks to the previous promoted version, by domain.",
    ["domain"],
)

# ------------------------------------------------------------------------------------- trainer

TRAINER_STEP_SECONDS = Histogram(
    "driftrec_trainer_step_seconds",
    "Duration of one incremental optimisation step of the trainer.",
    buckets=TRAINER_BUCKETS,
)
TRAINER_RUNS = Counter(
    "driftrec_trainer_runs",
    "Incremental training runs, by outcome (promoted/rejected/failed/skipped).",
    ["outcome"],
)
GATE_DECISIONS = Counter(
    "driftrec_gate_decisions",
    "Evaluation gate decisions for candidate adapters (decision=promote/reject).",
    ["decision"],
)
for _decision in ("promote", "reject"):  # both series exist from the start, so increase() sees the first
    GATE_DECISIONS.labels(decision=_decision)

ONLINE_HR_AT_10 = Gauge(
    "driftrec_online_hr_at_10",
    "Windowed online hit rate at 10 of published recommendations, by model (served/baseline/...).",
    ["model"],
)
ONLINE_NDCG_AT_10 = Gauge(
    "driftrec_online_ndcg_at_10",
    "Windowed online NDCG at 10 of published recommendations, by model.",
    ["model"],
)

# ------------------------------------------------------------------------------- series priming


def prime(domains=("default",), topics=()) -> None:
    """Create the fixed label sets at 0, so dashboards and alerts see series before the first event.

    (A labelled counter has no series until a label set is used; ``increase()`` over a series that
    appears at 1 misses that first event, and "no data" cannot be told from "zero".)
    """
    for domain in domains:
        CORRECTION_ERROR.labels(domain=domain)
        DRIFT_DETECTIONS.labels(domain=domain, detector="adwin")
        ROLLBACKS.labels(domain=domain)
        for outcome in ("ok", "failed", "rejected"):
            ADAPTER_SWAPS.labels(domain=domain, outcome=outcome)
    for reason in ("checksum", "corrupt", "shape", "config", "missing_file", "too_large", "untrusted"):
        CHECKPOINT_REJECTIONS.labels(reason=reason)
    for reason in ("malformed", "no_key", "unsigned", "bad_signature", "stale", "replayed"):
        CONTROL_REJECTED.labels(reason=reason)
    for reason in ("scorer_timeout", "scorer_error", "scorer_unavailable", "scorer_circuit_open", "deadline",
                   "policy_error", "policy_not_ready"):
        FALLBACKS.labels(reason=reason)
    for outcome in ("promoted", "rejected", "failed", "skipped"):
        TRAINER_RUNS.labels(outcome=outcome)
    for status in ("200", "400", "404", "503"):
        API_REQUESTS.labels(status=status)
    ONLINE_HR_AT_10.labels(model="served")
    ONLINE_NDCG_AT_10.labels(model="served")
    for topic in topics:
        CONSUMER_LAG.labels(topic=topic)
        CONSUMER_UNCOMMITTED.labels(topic=topic)


# --------------------------------------------------------------------------------------- build

BUILD_INFO = Info("driftrec_build", "driftrec build information (exposed as driftrec_build_info).")
BUILD_INFO.info({"version": __version__, "python": platform.python_version()})

# ------------------------------------------------------------------------------------- helpers

_active_adapter_lock = threading.Lock()
_active_adapter: dict[str, str] = {}


def set_active_adapter(domain: str, version: str) -> None:
    """Mark ``version`` as the adapter served for ``domain`` (and drop the previous version's series)."""
    with _active_adapter_lock:
        previous = _active_adapter.get(domain)
        if previous is not None and previous != version:
            try:
                ADAPTER_ACTIVE.remove(domain, previous)
            except KeyError:
                pass
        ADAPTER_ACTIVE.labels(domain=domain, version=version).set(1)
        _active_adapter[domain] = version


_servers: list[Any] = []


def start_metrics_server(port: int = 0, addr: str = "127.0.0.1") -> int:
    """Serve ``/metrics`` of the default registry from a background thread; returns the bound port.

    ``port=0`` picks a free port. Uses prometheus_client's own ``start_http_server``.
    """
    result = start_http_server(port, addr=addr)
    server = result[0] if isinstance(result, tuple) else None
    if server is None:  # pragma: no cover - prometheus_client < 0.19 returns None
        if port == 0:
            raise RuntimeError("prometheus_client too old to report the bound port; pass a fixed port")
        return port
    _servers.append(result)
    return int(server.server_port)


def stop_metrics_servers() -> None:
    """Shut down every server started by ``start_metrics_server`` (mainly for tests)."""
    while _servers:
        server, thread = _servers.pop()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def aiohttp_metrics_handler(request: Any) -> Any:
    """aiohttp handler: ``app.router.add_get("/metrics", aiohttp_metrics_handler)``."""
    from aiohttp import web

    return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})


def all_metrics() -> dict[str, MetricWrapperBase]:
    """Python name -> metric object, for every metric defined in this module."""
    return {name: obj for name, obj in globals().items() if isinstance(obj, MetricWrapperBase)}


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def exported_sample_names() -> set[str]:
    """Every time-series name these metrics can expose (``_total``, ``_bucket``... included)."""
    names: set[str] = set()
    for metric in all_metrics().values():
        for suffix in _SUFFIXES[metric._type]:
            names.add(metric._name + suffix)
    return names
