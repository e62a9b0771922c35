"""TLS and SASL for every Kafka client driftrec makes, from ``settings.kafka`` (validated there).

:func:`client_options` gives aiokafka's keyword arguments (``security_protocol``, ``ssl_context``,
``sasl_*``), :func:`faust_credentials` the same as Faust's ``broker_credentials``, and
:func:`options_of` copies them from a client that already has them (for helpers that open a second
connection). With the default ``PLAINTEXT`` all three give plain connections, as before.
"""

from __future__ import annotations

import ssl
from functools import lru_cache
from pathlib import Path
from typing import Any

from driftrec.core.settings import KafkaSettings

_OPTION_ATTRS = {  # aiokafka's client attribute -> its constructor argument
    "_security_protocol": "security_protocol",
    "_ssl_context": "ssl_context",
    "_sasl_mechanism": "sasl_mechanism",
    "_sasl_plain_username": "sasl_plain_username",
    "_sasl_plain_password": "sasl_plain_password",
}


@lru_cache(maxsize=8)
def _ssl_context(cafile: Path | None, certfile: Path | None, keyfile: Path | None, check_hostname: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose=ssl.Purpose.SERVER_AUTH, cafile=str(cafile) if cafile else None)
    ctx.check_hostname = check_hostname
    if certfile is not None:
        ctx.load_cert_chain(certfile=str(certfile), keyfile=str(keyfile) if keyfile else None)
    return ctx


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext | None:
    if not kafka.uses_ssl:
        return None
    return _ssl_context(kafka.ssl_cafile, kafka.ssl_certfile, kafka.ssl_keyfile, kafka.ssl_check_hostname)


def client_options(kafka: KafkaSettings) -> dict[str, Any]:
    """aiokafka and kafka-python keyword arguments for the configured security (empty for PLAINTEXT; the
    two libraries name these options alike)."""
    if kafka.security_protocol == "PLAINTEXT":
        return {}
    opts: dict[str, Any] = {"security_protocol": kafka.security_protocol}
    if kafka.uses_ssl:
        opts["ssl_context"] = ssl_context(kafka)
    if kafka.uses_sasl:
        assert kafka.sasl_password is not None  # the settings refuse SASL without one
        opts.update(sasl_mechanism=kafka.sasl_mechanism, sasl_plain_username=kafka.sasl_username,
                    sasl_plain_password=kafka.sasl_password.get_secret_value())
    return opts


def faust_credentials(kafka: KafkaSettings):
    """Faust's ``broker_credentials`` for the configured security (None for PLAINTEXT)."""
    import faust

    if kafka.security_protocol == "PLAINTEXT":
        return None
    if kafka.uses_sasl:
        assert kafka.sasl_password is not None
        return faust.SASLCredentials(username=kafka.sasl_username, password=kafka.sasl_password.get_secret_value(),
                                     mechanism=kafka.sasl_mechanism, ssl_context=ssl_context(kafka))
    return faust.SSLCredentials(ssl_context(kafka))


def options_of(client: Any) -> dict[str, Any]:
    """The security options an aiokafka client (or a consumer/producer's ``_client``) was made with."""
    client = getattr(client, "_client", client)
    opts = {arg: getattr(client, attr) for attr, arg in _OPTION_ATTRS.items() if getattr(client, attr, None) is not None}
    if opts.get("security_protocol", "PLAINTEXT") == "PLAINTEXT":
        return {}
    return opts
