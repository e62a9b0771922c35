"""TLS to the cluster: every Kafka client driftrec makes (Faust's consumer and producers, the followers,
the client library's producer and subscription, topic creation) speaks TLS when
``kafka.security_protocol=SSL``.

The broker is Tansu behind a TLS-terminating proxy (Tansu 0.6's own TLS listener does not complete a
handshake): clients reach it only through the proxy, which advertises itself as the broker, so a
client that does not speak TLS is refused and one that checks certificates must trust the test's CA.
The certificate is made here with the ``openssl`` command (skipped, saying so, where there is none).
SASL is configured the same way (``kafka.sasl_*``) but has no broker to test against on this machine:
its mapping to aiokafka and Faust is covered in tests/core/test_kafka_auth.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import time

import pytest

from driftrec.core.broker import EmbeddedBroker, create_topics, free_port
from driftrec.core.kafka_auth import client_options
from driftrec.core.settings import KafkaSettings
from driftrec.feature_store.reader import FeatureReader
from driftrec.model.evaluation.world import World
from tests.e2e.test_features_e2e import _catalogue, _events, _records, _settings, _wait_equal, ground_truth
from tests.support import Proc, TcpProxy, env_for

pytestmark = pytest.mark.slow


def _certificate(tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed: no certificate for the TLS broker")
    cert, key = tmp_path / "broker.pem", tmp_path / "broker.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=driftrec-test-broker",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture
def tls_kafka(tmp_path):
    cert, key = _certificate(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(str(cert), str(key))
    broker_port, port = free_port(), free_port()
    proxy = TcpProxy(broker_port, listen_port=port, ssl_context=server)  # up first: the broker advertises it
    emb = EmbeddedBroker(port=broker_port, advertised_port=port)
    try:
        emb.start()
        # the features e2e's settings (half-life, history length: what its ground truth assumes), over TLS
        settings = _settings(emb.bootstrap_servers, tmp_path).model_copy(update={"kafka": KafkaSettings(
            bootstrap_servers=emb.bootstrap_servers, broker_kind="tansu", security_protocol="SSL", ssl_cafile=cert)})
        asyncio.run(create_topics(emb.bootstrap_servers, settings))
        yield emb.bootstrap_servers, settings
    finally:
        proxy.close()
        emb.stop()


async def _produce(settings, records) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all",
                                enable_idempotence=False, linger_ms=5, **client_options(settings.kafka))
    await producer.start()
    try:
        await asyncio.gather(*[await producer.send(t, key=k, value=v) for t, k, v in records])
    finally:
        await producer.stop()


async def _recommendations(settings, n: int, timeout: float) -> list[dict]:
    from driftrec.client import subscribe

    out: list[dict] = []

    async def read() -> None:
        async for rec in subscribe(settings, from_beginning=True):
            out.append(rec)
            if len(out) >= n:
                return

    await asyncio.wait_for(read(), timeout)
    return out


def test_a_plaintext_client_is_refused_by_the_tls_listener(tls_kafka):
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaConnectionError

    bootstrap, _ = tls_kafka

    async def plain() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=3000)
        try:
            await asyncio.wait_for(producer.start(), 20)
        finally:
            await producer.stop()

    with pytest.raises((KafkaConnectionError, asyncio.TimeoutError)):
        asyncio.run(plain())


def test_a_worker_over_tls_counts_every_event_and_answers_requests(tls_kafka, tmp_path):
    """Events produced over TLS reach the Feast store exactly (the worker's Faust consumer, changelogs and
    followers over TLS); requests are answered and read back with the client library over TLS."""
    bootstrap, settings = tls_kafka
    world = World(n_users=15, n_items=40, seed=41)
    events = _events(world, 400, seed=41)
    truth = ground_truth(events, {it.item_id: it.genres for it in world.items})
    asyncio.run(_produce(settings, _catalogue(settings, world)))
    worker = Proc(["worker"], env_for(settings), name="tls-worker")
    worker.metrics_port
    reader = FeatureReader(settings)
    try:
        asyncio.run(_produce(settings, _records(settings, events)))
        _wait_equal(reader, truth, 120, "features over TLS to equal the ground truth", worker)
        requests = [(settings.topics.requests.name, u.encode(),
                     json.dumps({"type": "recommendation_request", "event_id": f"tls-{n}", "event_time": time.time(),
                                 "user_id": u, "k": 3}).encode())
                    for n, u in enumerate(world.user_id(i) for i in range(5))]
        asyncio.run(_produce(settings, requests))
        recs = asyncio.run(_recommendations(settings, 5, 120))
        assert sorted(r["request_id"] for r in recs) == [f"tls-{n}" for n in range(5)]
        assert all(r["items"] for r in recs)
        assert worker.proc.poll() is None
    finally:
        worker.stop()
        reader.close()
