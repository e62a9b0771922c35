"""Redis online store: config and writer.

Writes go through :class:`Rows` (Feast's layout, one pipeline per batch), run by the worker's
writer process (:mod:`driftrec.feature_store.process`).
``skip_dedup: true``: a row's event time is the entity's newest event, which a late event does not
move - Feast's skip-older-or-equal check would drop exactly those updates. Instead every row is
written by a small Lua script (:data:`WRITE_IF_NOT_OLDER`, one ``EVALSHA`` per entity in the
pipeline) that skips a row only when the stored ``_ts:<view>`` is strictly newer: after a rebalance
the previous owner of an entity's partition may still write a row it computed earlier, and a
killed writer process's commands can reach Redis after its retry's.
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

# KEYS[1]: the entity's hash; ARGV: ts field, ts bytes (a protobuf Timestamp), key TTL (0 = none),
# then feature field/value pairs. Writes (HSET, the same fields and bytes Feast writes, + EXPIRE)
# unless the stored timestamp is strictly newer; returns 1 if written, 0 if skipped.
WRITE_IF_NOT_OLDER = """
local function ts(b)
  local s, n, i = 0, 0, 1
  while i <= #b do
    local tag = string.byte(b, i)
    i = i + 1
    local v, m = 0, 1
    while true do
      local c = string.byte(b, i)
      if c == nil then return nil end
      i = i + 1
      v = v + (c % 128) * m
      m = m * 128
      if c < 128 then break end
    end
    if v >= 9223372036854775808 then v = v - 18446744073709551616 end
    if tag == 8 then s = v elseif tag == 16 then n = v else return nil end
  end
  return s, n
end
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local os, on = ts(old)
  local ns, nn = ts(ARGV[2])
  if os and ns and (os > ns or (os == ns and on > nn)) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], unpack(ARGV, 4))
if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return 1
"""


def _fail_fast(client) -> None:
    """No retries inside redis-py: the row sink retries a failed write itself, with back-off, and
    counts why it failed. redis-py 7 retries a refused connection 3 times with up to 7 s of jittered
    back-off, so a dead server looked like a hung one (the write hit ``feast.write_timeout_s``, its
    writer process was killed) instead of failing at once with ``store_error``."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    if hasattr(client, "set_retry"):
        client.set_retry(Retry(NoBackoff(), 0))


class Rows(RowStore):
    """The Redis backend's row store: Feast's layout, one pipeline per batch (blocking).

    A hash per entity (key: serialized entity key + project) with ``_ts:<view>`` and one
    murmur3-keyed field per feature. With ``skip_dedup`` (always on here, see the module) Feast
    writes every row unconditionally with one ``HSET`` (+ ``EXPIRE``) per entity in a
    non-transactional pipeline; this runs the same ``HSET`` (+ ``EXPIRE``) with the same bytes from
    :data:`WRITE_IF_NOT_OLDER` (skipped when the stored row is newer), encoded without Feast's per-row
    protos. redis-py loads the script when Redis lacks it (a restarted server). Run by the writer
    process (:mod:`driftrec.feature_store.process`).
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
        self._script = None
        self.skipped = 0  # rows of the last write not written (the stored row was newer)

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
        ttl = int(oc.key_ttl_seconds or 0)
        client = online._get_client(oc)
        if self._script is None or self._script.registered_client is not client:
            _fail_fast(client)
            self._script = client.register_script(WRITE_IF_NOT_OLDER)
        script = self._script
        pipe = client.pipeline(transaction=False)
        for (ts_key, fields), codec, rows in zip(self.layout, self.codecs, (user_rows, item_rows)):
            key_of, join_key = codec.entity_key, codec.join_key
            for row in rows:
                args = [ts_key, encode_timestamp(event_datetime(row)), ttl]
                for f_key, feature, encode in fields:
                    args.append(f_key)
                    args.append(encode(row[feature]))
                script(keys=[key_of(row[join_key], version) + project], args=args, client=pipe)
        self.skipped = len(pipe) - sum(pipe.execute())

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
