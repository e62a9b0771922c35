"""Kafka security settings: what is refused, and what every client is given (aiokafka keyword arguments,
Faust's broker credentials). The TLS path runs for real against a broker in tests/e2e/test_kafka_tls.py."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import shutil

import faust
import pytest
from pydantic import ValidationError

from driftrec.core.kafka_auth import client_options, faust_credentials, options_of
from driftrec.core.settings import KafkaSettings, Settings

PASSWORD = "s3cret-password-value"


def _pem(tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed: no certificate to load")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=driftrec-test-client"], check=True, capture_output=True)
    return cert, key


def test_plaintext_is_the_default_and_adds_nothing():
    k = KafkaSettings(bootstrap_servers="kafka:9092")
    assert k.security_protocol == "PLAINTEXT"
    assert client_options(k) == {}
    assert faust_credentials(k) is None


@pytest.mark.parametrize("overrides, message", [
    ({"security_protocol": "SSL"}, "needs kafka.bootstrap_servers"),  # the embedded broker is plaintext
    ({"bootstrap_servers": "k:9093", "security_protocol": "SASL_SSL", "sasl_username": "app"},
     "needs kafka.sasl_username and kafka.sasl_password"),
    ({"bootstrap_servers": "k:9093", "security_protocol": "SASL_PLAINTEXT", "sasl_password": PASSWORD},
     "needs kafka.sasl_username and kafka.sasl_password"),
    ({"bootstrap_servers": "k:9093", "security_protocol": "SSL", "ssl_cafile": "/nonexistent/ca.pem"}, "no file at"),
    ({"bootstrap_servers": "k:9093", "security_protocol": "SASL_SSL", "sasl_username": "app",
      "sasl_password": PASSWORD, "sasl_mechanism": "GSSAPI"}, "sasl_mechanism"),
    ({"bootstrap_servers": "k:9093", "security_protocol": "TLS"}, "security_protocol"),
])
def test_incomplete_or_unknown_security_is_refused_with_the_setting_named(overrides, message):
    with pytest.raises(ValidationError) as err:
        KafkaSettings(**overrides)
    assert message in str(err.value)
    assert PASSWORD not in str(err.value)  # the input (a password) is not echoed in the error


def test_certificate_and_key_go_together_and_need_tls(tmp_path):
    cert, key = _pem(tmp_path)
    with pytest.raises(ValidationError, match="go together"):
        KafkaSettings(bootstrap_servers="k:9093", security_protocol="SSL", ssl_certfile=cert)
    with pytest.raises(ValidationError, match="does not use TLS"):
        KafkaSettings(bootstrap_servers="k:9093", security_protocol="SASL_PLAINTEXT", sasl_username="a",
                      sasl_password=PASSWORD, ssl_cafile=cert)


def test_ssl_gives_every_client_a_context_that_trusts_the_ca_and_presents_the_certificate(tmp_path):
    cert, key = _pem(tmp_path)
    k = KafkaSettings(bootstrap_servers="k:9093", security_protocol="SSL", ssl_cafile=cert, ssl_certfile=cert,
                      ssl_keyfile=key, ssl_check_hostname=False)
    opts = client_options(k)
    assert opts["security_protocol"] == "SSL" and "sasl_mechanism" not in opts
    ctx = opts["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname is False
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "driftrec-test-client"),),)]
    creds = faust_credentials(k)
    assert isinstance(creds, faust.SSLCredentials) and creds.context is ctx


def test_sasl_ssl_maps_the_mechanism_and_credentials_to_aiokafka_and_faust(tmp_path):
    cert, _ = _pem(tmp_path)
    k = KafkaSettings(bootstrap_servers="k:9093", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-256",
                      sasl_username="driftrec", sasl_password=PASSWORD, ssl_cafile=cert)
    opts = client_options(k)
    assert {key: opts[key] for key in ("security_protocol", "sasl_mechanism", "sasl_plain_username",
                                       "sasl_plain_password")} == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256", "sasl_plain_username": "driftrec",
        "sasl_plain_password": PASSWORD}
    assert isinstance(opts["ssl_context"], ssl.SSLContext)
    creds = faust_credentials(k)
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.password, str(creds.mechanism.value)) == ("driftrec", PASSWORD, "SCRAM-SHA-256")
    assert creds.ssl_context is opts["ssl_context"]
    assert PASSWORD not in repr(k)


def test_sasl_plaintext_has_no_tls_context():
    k = KafkaSettings(bootstrap_servers="k:9092", security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                      sasl_username="u", sasl_password=PASSWORD)
    opts = client_options(k)
    assert opts["security_protocol"] == "SASL_PLAINTEXT" and "ssl_context" not in opts


def test_a_second_connection_copies_the_first_clients_security():
    from aiokafka import AIOKafkaClient

    k = KafkaSettings(bootstrap_servers="k:9092", security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                      sasl_username="u", sasl_password=PASSWORD)

    async def made() -> tuple[dict, dict]:
        secured = AIOKafkaClient(bootstrap_servers="k:9092", **client_options(k))
        plain = AIOKafkaClient(bootstrap_servers="k:9092")
        return options_of(secured), options_of(plain)

    secured, plain = asyncio.run(made())
    assert secured == client_options(k) and plain == {}


def test_the_password_never_reaches_a_child_process_dump():
    s = Settings(kafka={"bootstrap_servers": "k:9092", "security_protocol": "SASL_PLAINTEXT",
                        "sasl_username": "u", "sasl_password": PASSWORD})
    dumped = json.loads(s.dump_without_secrets())
    assert "sasl_password" not in dumped["kafka"] and PASSWORD not in s.dump_without_secrets()
    assert dumped["kafka"]["sasl_username"] == "u"
