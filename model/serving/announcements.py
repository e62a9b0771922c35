"""Optional Kafka consumer of the adapters topic: trainer announcements -> ``scorer.on_announcement``.

Every scorer replica must apply every announcement, so the consumer uses no consumer group and
starts at the end of the topic (on start-up the scorer has already scanned the adapter directory).
Only signed, recent, never-seen announcements are acted on (:mod:`driftrec.core.signing`); the others
(malformed, unsigned, forged, stale, replayed) are logged, counted in
``driftrec_control_messages_rejected_total{reason}`` and skipped. The directory watcher remains the
fallback path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterable

from driftrec.core import metrics
from driftrec.core.kafka_auth import client_options
from driftrec.core.signing import Rejected, Verifier

from driftrec.model.adapters import valid_name
from driftrec.core.contracts import AdapterAnnouncement

log = logging.getLogger(__name__)

MAX_ANNOUNCEMENT_BYTES = 64 * 1024


def decode(raw: bytes | str) -> dict:
    if isinstance(raw, bytes):
        if len(raw) > MAX_ANNOUNCEMENT_BYTES:
            raise ValueError("announcement too large")
        raw = raw.decode("utf-8")
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("not an adapter announcement")
    return data


def parse_announcement(raw: bytes | str | dict, verifier: Verifier | None = None, now: float | None = None) -> AdapterAnnouncement:
    """Decode and validate one adapters-topic message (wire JSON). Raises ValueError
    (:class:`~driftrec.core.signing.Rejected` when ``verifier`` refuses it)."""
    data = raw if isinstance(raw, dict) else decode(raw)
    if not isinstance(data, dict) or data.get("type", "adapter") != "adapter":
        raise ValueError("not an adapter announcement")
    domain, version = data.get("domain"), data.get("version")
    action = data.get("action", "activate")
    path = data.get("path", "")
    if not isinstance(domain, str) or not valid_name(domain):
        raise ValueError(f"invalid domain {domain!r}")
    if action not in ("activate", "rollback"):
        raise ValueError(f"invalid action {action!r}")
    if action == "activate" and (not isinstance(version, str) or not valid_name(version)):
        raise ValueError(f"invalid version {version!r}")
    if not isinstance(path, str):
        raise ValueError("path must be a string")
    return AdapterAnnouncement(
        event_id=str(data.get("event_id") or ""),
        event_time=float(data.get("event_time") or 0.0),
        domain=domain,
        version=str(version or ""),
        path=path,
        action=action,
    ) if verifier is None else _verified(data, verifier, now)


def _verified(data: dict, verifier: Verifier, now: float | None) -> AdapterAnnouncement:
    verifier.check(data, time.time() if now is None else now)
    return parse_announcement(data)


async def handle_messages(scorer: Any, values: AsyncIterable[bytes], verifier: Verifier) -> int:
    """Apply each acceptable announcement in ``values`` in order; returns how many were applied."""
    applied = 0
    async for value in values:
        try:
            ann = parse_announcement(value, verifier)
        except Rejected as exc:
            metrics.CONTROL_REJECTED.labels(reason=exc.reason).inc()
            log.error("not acting on an adapter announcement (%s): %s", exc.reason, exc)
            continue
        except (ValueError, UnicodeDecodeError) as exc:
            metrics.CONTROL_REJECTED.labels(reason="malformed").inc()
            log.error("skipping malformed adapter announcement: %s", exc)
            continue
        if await scorer.on_announcement(ann):
            applied += 1
    return applied


async def consume_adapter_announcements(settings: Any, scorer: Any, bootstrap: str | None = None) -> None:
    """Run until cancelled: consume ``settings.topics.adapters`` and apply announcements."""
    from aiokafka import AIOKafkaConsumer

    if not bootstrap:
        bootstrap = settings.kafka.bootstrap_servers
    if not bootstrap:
        from driftrec.core.broker import running_embedded_broker

        bootstrap = running_embedded_broker()
    if not bootstrap:
        raise RuntimeError("no Kafka bootstrap servers configured and no embedded broker running")
    consumer = AIOKafkaConsumer(
        settings.topics.adapters.name,
        bootstrap_servers=bootstrap,
        **client_options(settings.kafka),
        client_id=f"{settings.kafka.client_id}-scorer",
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="latest",
    )
    await consumer.start()
    log.info("consuming adapter announcements from %s", settings.topics.adapters.name)

    async def values():
        async for msg in consumer:
            yield msg.value

    try:
        sec = settings.security
        await handle_messages(scorer, values(), Verifier(sec.control_key_bytes(), sec.control_max_age_s))
    except asyncio.CancelledError:
        raise
    finally:
        await consumer.stop()
