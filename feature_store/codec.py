"""Feature rows to Feast's online bytes: :class:`RowCodec` and the wire encoders.

Both backends write exactly what Feast's own ``online_write_batch`` writes - same tables or keys,
same entity-key serialization, same value bytes - without building Feast's protobuf objects row by
row: the features stage writes every touched entity on every batch, and at tens of thousands of
events per second Python-side proto building was the largest cost of a write. :class:`RowCodec`
encodes a row's values straight to their protobuf wire bytes (``Value`` has one field per type:
string = field 2, int64 = field 4, double = field 5), and ``tests/feature_store/test_features_store.py``
checks every encoding against Feast's protos and every write against ``FeatureStore.get_online_features``.
Configurations the fast paths do not cover go through Feast's own method (:meth:`RowCodec.protos`).
"""

from __future__ import annotations

import struct
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Sequence

from driftrec.feature_store.definitions import ITEM_FEATURES, ITEM_VIEW, USER_FEATURES, USER_VIEW

Row = Mapping[str, Any]


# --- protobuf wire encoding of Feast values ------------------------------------------------------

_pack_double = struct.Struct("<d").pack


def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64: two's complement, ten bytes
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_string(v: Any) -> bytes:
    """``Value(string_val=v).SerializeToString()``."""
    b = str(v).encode()
    n = len(b)
    return (b"\x12" + bytes((n,)) if n < 0x80 else b"\x12" + varint(n)) + b


def encode_int64(v: Any) -> bytes:
    """``Value(int64_val=v).SerializeToString()``."""
    n = int(v)
    return b" " + (bytes((n,)) if 0 <= n < 0x80 else varint(n))


def encode_double(v: Any) -> bytes:
    """``Value(double_val=v).SerializeToString()``."""
    return b")" + _pack_double(float(v))


_ENCODERS: dict[str, Callable[[Any], bytes]] = {"String": encode_string, "Int64": encode_int64, "Float64": encode_double}
# value_text as Feast's SQL stores derive it (helpers.extract_text_and_num): the string, or str(number)
_TEXTS: dict[str, Callable[[Any], str]] = {"String": str, "Int64": lambda v: str(int(v)), "Float64": lambda v: str(float(v))}


def _kind(dtype: Any) -> str:
    """'String' | 'Int64' | 'Float64' for a Feast type object."""
    name = str(dtype)
    if "String" in name:
        return "String"
    if "Int" in name:
        return "Int64"
    return "Float64"


class RowCodec:
    """One feature view's rows: entity ids, feature kinds, and their encodings."""

    def __init__(self, view: str, join_key: str, features: dict[str, Any]) -> None:
        self.view = view
        self.join_key = join_key
        self.features = [(name, _kind(dtype)) for name, dtype in features.items()]
        self.encoders = [(name, _ENCODERS[kind]) for name, kind in self.features]
        self.texts = [(name, _ENCODERS[kind], _TEXTS[kind]) for name, kind in self.features]
        self._keys: dict[tuple[str, int], bytes] = {}

    def entity_key(self, entity_id: str, version: int) -> bytes:
        """Feast's serialized entity key for this view's entity (cached: rows repeat entities)."""
        cache = self._keys
        got = cache.get((entity_id, version))
        if got is None:
            from feast.infra.key_encoding_utils import serialize_entity_key

            if len(cache) > 500_000:
                cache.clear()
            got = cache[(entity_id, version)] = serialize_entity_key(self.entity_key_proto(entity_id),
                                                                     entity_key_serialization_version=version)
        return got

    def entity_key_proto(self, entity_id: str):
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        return EntityKey(join_keys=[self.join_key], entity_values=[Value(string_val=str(entity_id))])

    def protos(self, rows: Sequence[Row], created: datetime) -> list[tuple]:
        """Feast's own row form ``(entity key, {feature: Value}, event ts, created ts)`` (slow path)."""
        from feast.protos.feast.types.Value_pb2 import Value

        out = []
        for row in rows:
            values = {}
            for name, kind in self.features:
                v = row[name]
                values[name] = (Value(string_val=str(v)) if kind == "String" else
                                Value(int64_val=int(v)) if kind == "Int64" else Value(double_val=float(v)))
            out.append((self.entity_key_proto(row[self.join_key]), values, event_datetime(row), created))
        return out


def event_datetime(row: Row) -> datetime:
    """A row's event timestamp (its entity's newest event)."""
    return datetime.fromtimestamp(float(row["last_event_time"]), tz=timezone.utc)


USER_CODEC = RowCodec(USER_VIEW, "user_id", USER_FEATURES)
ITEM_CODEC = RowCodec(ITEM_VIEW, "item_id", ITEM_FEATURES)
