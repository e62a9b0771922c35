"""Redis online store: config and writer.

Writes go through :class:`Rows` (Feast's layout, one pipeline per batch), run by the worker's
writer process (:mod:`driftrec.feature_store.process`).
``skip_dedup: true``: the features stage is the only writer of an entity (its partition's owner)
and writes its state in order, and a row's event time is the entity's newest event, which a late
event does not move - Redis' default skip-older-or-equal check would drop exactly those updates.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence

from driftrec.core.settings import Settings
from driftrec.feature_store.backends.base import Backend, OnlineStoreConfig, RowStore
from driftrec.feature_store.codec import Row, event_datetime, varint

STORE = "redis"


@dataclass(frozen=True)
class RedisConfig(OnlineStoreConfig):
    connection_string: str
    key_ttl_seconds: int = 0
    skip_dedup: bool = True

    def __post_init__(self) -> None:
        if not self.connection_string:
            raise ValueError("the Redis online store needs a connection string (host:port)")
        if self.key_ttl_seconds < 0:
            raise ValueError(f"key_ttl_seconds must be >= 0, not {self.key_ttl_seconds}")

    def as_feast(self) -> dict:
        cfg = {"type": "redis", "connection_string": self.connection_string, "skip_dedup": self.skip_dedup}
        if self.key_ttl_seconds:
            cfg["key_ttl_seconds"] = self.key_ttl_seconds
        return cfg


def online_store():
    from feast.infra.online_stores.redis import RedisOnlineStore

    return RedisOnlineStore()


def ping(url: str, timeout: float = 1.0) -> bool:
    """Whether a Redis server answers at ``host:port[,options]`` (Feast's connection string)."""
    import redis as redis_client

    host_port = url.split(",")[0]
    host, _, port = host_port.rpartition(":")
    try:
        return bool(redis_client.Redis(host=host or "127.0.0.1", port=int(port or 6379),
                                       socket_connect_timeout=timeout, socket_timeout=timeout).ping())
    except Exception:  # noqa: BLE001 - any failure means "not reachable"
        return False


def encode_timestamp(ts: datetime) -> bytes:
    """``Timestamp.FromDatetime(ts).SerializeToString()`` (seconds = field 1, nanos = field 2; zeros omitted)."""
    delta = ts.astimezone(timezone.utc) - _EPOCH
    seconds = delta.days * 86400 + delta.seconds
    nanos = delta.microseconds * 1000
    out = b"\x08" + varint(seconds) if seconds else b""
    if nanos:
        out += b"\x10" + varint(nanos)
    return out


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class Rows(RowStore):
    """The Redis backend's row store: Feast's layout, one pipeline per batch (blocking).

    A hash per entity (key: serialized entity key + project) with ``_ts:<view>`` and one
    murmur3-keyed field per feature. ``skip_dedup`` (always on here, see the module) means Feast
    writes every row unconditionally with one ``HSET`` (+ ``EXPIRE``) per entity in a
    non-transactional pipeline; this sends the same commands with the same bytes, encoded without
    Feast's per-row protos. Run by the writer process (:mod:`driftrec.feature_store.process`).
    """

    def __init__(self, fs) -> None:
        from feast.infra.online_stores.helpers import _mmh3
        from feast.infra.online_stores.redis import _versioned_fv_name

        super().__init__(fs)
        self.online = online_store()
        self.layout = []  # per view: (ts field, [(field key, feature, encoder)])
        for view, codec in zip(self.views, self.codecs):
            name = _versioned_fv_name(view, self.config)
            fields = [(_mmh3(f"{name}:{feature}"), feature, encode) for feature, encode in codec.encoders]
            self.layout.append((f"_ts:{name}".encode(), fields))

    def write(self, user_rows: Sequence[Row], item_rows: Sequence[Row]) -> None:
        config, online = self.config, self.online
        oc = config.online_store
        if not oc.skip_dedup:  # not how driftrec configures it; Feast's own method then
            created = datetime.now(tz=timezone.utc)
            for view, codec, rows in zip(self.views, self.codecs, (user_rows, item_rows)):
                if rows:
                    online.online_write_batch(config, view, codec.protos(rows, created), None)
            return
        project = config.project.encode()
        version = config.entity_key_serialization_version
        ttl = oc.key_ttl_seconds
        pipe = online._get_client(oc).pipeline(transaction=False)
        for (ts_key, fields), codec, rows in zip(self.layout, self.codecs, (user_rows, item_rows)):
            key_of, join_key = codec.entity_key, codec.join_key
            for row in rows:
                name = key_of(row[join_key], version) + project
                mapping = {ts_key: encode_timestamp(event_datetime(row))}
                for f_key, feature, encode in fields:
                    mapping[f_key] = encode(row[feature])
                pipe.hset(name, mapping=mapping)
                if ttl:
                    pipe.expire(name=name, time=ttl)
        pipe.execute()

    def close(self) -> None:
        client = getattr(self.online, "_client", None)
        if client is not None:
            client.close()
            self.online._client = None


class RedisBackend(Backend):
    name = STORE
    rows_class = Rows

    def config(self, settings: Settings) -> RedisConfig:
        f = settings.feast
        return RedisConfig(f.redis_url, int(f.redis_key_ttl_s or 0))

    def online_store(self):
        return online_store()


BACKEND = RedisBackend()
