"""Validation of inbound events: raw bytes in, a typed event or a rejection reason out.

Never raises on bad input: :func:`validate` returns :class:`Rejected` with a short machine-readable
reason class (``not_json``, ``missing_field`` …, used as a metric label) and a human-readable detail.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import orjson

from driftrec.core.contracts import (
    INBOUND_TYPES,
    SCHEMA_VERSION,
    Click,
    Event,
    Item,
    Rating,
    RecommendationRequest,
)

# The limits of inbound values; the one source for every layer (the scorer's catalogue and HTTP API import them).
MAX_ID_LEN = 128  # ids: event, user, item, recommendation, domain
MAX_TEXT_LEN = 4096
MAX_LIST_LEN = 64
MAX_VECTOR_LEN = 4096
MAX_K = 1000
MAX_CANDIDATES = 10_000

REASONS = (
    "oversized",
    "not_json",
    "not_object",
    "unknown_type",
    "wrong_topic",
    "unsupported_version",
    "missing_field",
    "wrong_type",
    "bad_value",
    "unknown_field",
    "too_old",
    "future_time",
    "unknown_item",
    "processing",
)


@dataclass(frozen=True)
class Rejected:
    reason: str  # one of REASONS
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class _Invalid(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


InvalidEvent = _Invalid  # the public name of what parse_event raises (``reason``, ``detail``)


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 64 * 1024
    max_future_skew_s: float = 300.0
    min_event_time: float = 631152000.0  # 1990-01-01

    @classmethod
    def from_settings(cls, settings) -> "Limits":
        s = settings.stream
        return cls(s.max_event_bytes, s.max_future_skew_s, s.min_event_time)


# field -> (kind, required)
_COMMON = {"event_id": ("id", True), "event_time": ("time", True), "type": ("str", True), "schema_version": ("int", False)}
_SCHEMAS: dict[str, dict[str, tuple[str, bool]]] = {
    Click.TYPE: {"user_id": ("id", True), "item_id": ("id", True), "recommendation_id": ("id?", False), "domain": ("id?", False)},
    Rating.TYPE: {
        "user_id": ("id", True), "item_id": ("id", True), "rating": ("rating", True),
        "recommendation_id": ("id?", False), "domain": ("id?", False),
    },
    Item.TYPE: {
        "item_id": ("id", True), "title": ("text", True), "genres": ("strlist", False), "year": ("year?", False),
        "tags": ("strlist", False), "description": ("text", False), "domain": ("id", False), "vector": ("vector?", False),
    },
    RecommendationRequest.TYPE: {
        "user_id": ("id", True), "k": ("k", False), "domain": ("id?", False), "exclude_seen": ("bool", False),
        "candidates": ("idlist?", False),
    },
}


def _check(kind: str, name: str, value: Any) -> Any:
    if kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    if kind == "id":
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise _Invalid("wrong_type", f"{name} must be a string id, got {type(value).__name__}")
        value = str(value)
        if not value or len(value) > MAX_ID_LEN or not value.isprintable():
            raise _Invalid("bad_value", f"{name} must be 1-{MAX_ID_LEN} printable characters")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise _Invalid("wrong_type", f"{name} must be a string")
        return value
    if kind == "text":
        if not isinstance(value, str):
            raise _Invalid("wrong_type", f"{name} must be a string, got {type(value).__name__}")
        if len(value) > MAX_TEXT_LEN:
            raise _Invalid("bad_value", f"{name} is longer than {MAX_TEXT_LEN} characters")
        return value
    if kind in ("int", "k", "year"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid("wrong_type", f"{name} must be an integer, got {type(value).__name__}")
        if kind == "k" and not 1 <= value <= MAX_K:
            raise _Invalid("bad_value", f"{name} must be between 1 and {MAX_K}")
        if kind == "year" and not 1800 <= value <= 2200:
            raise _Invalid("bad_value", f"{name} {value} is not a plausible year")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise _Invalid("wrong_type", f"{name} must be true or false")
        return value
    if kind in ("time", "rating"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid("wrong_type", f"{name} must be a number, got {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value):
            raise _Invalid("bad_value", f"{name} must be finite")
        if kind == "rating" and not Rating.MIN <= value <= Rating.MAX:
            raise _Invalid("bad_value", f"{name} {value} outside [{Rating.MIN}, {Rating.MAX}]")
        return value
    if kind in ("strlist", "idlist"):
        limit = MAX_CANDIDATES if kind == "idlist" else MAX_LIST_LEN
        if not isinstance(value, list):
            raise _Invalid("wrong_type", f"{name} must be a list")
        if len(value) > limit:
            raise _Invalid("bad_value", f"{name} has more than {limit} entries")
        return [_check("id" if kind == "idlist" else "text", f"{name}[]", v) for v in value]
    if kind == "vector":
        if not isinstance(value, list) or not value:
            raise _Invalid("wrong_type", f"{name} must be a non-empty list of numbers")
        if len(value) > MAX_VECTOR_LEN:
            raise _Invalid("bad_value", f"{name} has more than {MAX_VECTOR_LEN} entries")
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _Invalid("bad_value", f"{name} must hold finite numbers")
            out.append(float(v))
        return out
    raise AssertionError(kind)  # pragma: no cover


def _id(name: str, value: Any) -> str:
    # the common case first: a short printable string
    if type(value) is str and 0 < len(value) <= MAX_ID_LEN and value.isprintable():
        return value
    return _check("id", name, value)


def _number(kind: str) -> Callable[[str, Any], float]:
    def check(name: str, value: Any) -> float:
        t = type(value)
        if t is float or t is int:
            v = float(value)
            if math.isfinite(v) and (kind != "rating" or Rating.MIN <= v <= Rating.MAX):
                return v
        return _check(kind, name, value)
    return check


def _checker(kind: str) -> Callable[[str, Any], Any]:
    if kind == "id":
        return _id
    if kind in ("time", "rating"):
        return _number(kind)
    return lambda name, value: _check(kind, name, value)


_MISSING = object()
# type -> ((field, checker, required), ...), every allowed key
_COMPILED: dict[str, tuple[tuple[tuple[str, Callable, bool], ...], frozenset[str]]] = {
    etype: (tuple((name, _checker(kind), required) for name, (kind, required) in {**_COMMON, **schema}.items()
                  if name not in ("type", "schema_version")),
            frozenset({**_COMMON, **schema}))
    for etype, schema in _SCHEMAS.items()
}


def parse_event(data: Any, *, limits: Limits = Limits(), now: float | None = None, expected_type: str | None = None) -> Event:
    """Validate a decoded JSON value into a typed event; raises :class:`_Invalid`."""
    if not isinstance(data, dict):
        raise _Invalid("not_object", f"event must be a JSON object, got {type(data).__name__}")
    etype = data.get("type")
    if etype is None and expected_type is not None:
        etype = expected_type
    elif type(etype) is not str:
        _check("str", "type", etype)
    if etype not in INBOUND_TYPES:
        raise _Invalid("unknown_type", f"unknown event type {etype!r}; expected one of {sorted(INBOUND_TYPES)}")
    if expected_type is not None and etype != expected_type:
        raise _Invalid("wrong_topic", f"a {etype!r} event on the topic for {expected_type!r} events")
    version = data.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version != SCHEMA_VERSION:
        raise _Invalid("unsupported_version", f"schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
    fields, allowed = _COMPILED[etype]
    unknown = data.keys() - allowed
    if unknown:
        raise _Invalid("unknown_field", f"unknown field(s) {sorted(unknown)[:5]} for {etype}")
    values: dict[str, Any] = {}
    for name, check, required in fields:
        value = data.get(name, _MISSING)
        if value is _MISSING:
            if required:
                raise _Invalid("missing_field", f"{etype} event lacks required field {name!r}")
            continue
        values[name] = check(name, value)
    ts = values["event_time"]
    now = time.time() if now is None else now
    if ts < limits.min_event_time:
        raise _Invalid("too_old", f"event_time {ts} is before {limits.min_event_time}")
    if ts > now + limits.max_future_skew_s:
        raise _Invalid("future_time", f"event_time {ts} is {ts - now:.0f}s in the future")
    return _construct(etype, values)


def _fast_constructors() -> dict[str, tuple[type, tuple[tuple[str, Any], ...]]]:
    """Clicks and ratings - nearly every inbound event - are built without ``faust.Record.__init__``.

    Its per-field descriptors (coercion, validation) cost ~2.5 µs an event and would redo what
    :func:`parse_event` has just checked; the instance dict it leaves behind is simply every field
    in declaration order (defaults for the absent ones) plus an empty ``__evaluated_fields__``, and
    that is what :func:`_construct` writes (``tests/test_validation.py`` holds the two equal). Types
    whose defaults are mutable (lists) keep the constructor.
    """
    out = {}
    for cls in (Click, Rating):
        defaults = cls._options.defaults
        if any(isinstance(v, (list, dict, set)) for v in defaults.values()):  # pragma: no cover - guard
            continue
        out[cls.TYPE] = (cls, tuple((name, defaults.get(name, _MISSING)) for name in cls._options.fields))
    return out


def _construct(etype: str, values: dict[str, Any]) -> Event:
    fast = _FAST.get(etype)
    if fast is None:
        return INBOUND_TYPES[etype](**values)
    cls, fields = fast
    obj = cls.__new__(cls)
    d = obj.__dict__
    d["__evaluated_fields__"] = set()
    get = values.get
    for name, default in fields:
        d[name] = get(name, default)
    return obj


_FAST = _fast_constructors()


def validate(raw: bytes | None, *, limits: Limits = Limits(), now: float | None = None, expected_type: str | None = None) -> Event | Rejected:
    """Raw bytes from a topic -> typed event, or the reason it is rejected. Never raises."""
    if raw is None:
        return Rejected("not_json", "empty message (null value)")
    if len(raw) > limits.max_bytes:
        return Rejected("oversized", f"{len(raw)} bytes exceeds the {limits.max_bytes}-byte limit")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:  # what orjson refuses, Python's parser may still read (NaN, Infinity): say what is wrong with it
            data = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            return Rejected("not_json", f"not valid UTF-8 JSON: {str(exc)[:200] or type(exc).__name__}")
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return Rejected("not_json", f"not valid UTF-8 JSON: {str(exc)[:200] or type(exc).__name__}")
    try:
        return parse_event(data, limits=limits, now=now, expected_type=expected_type)
    except _Invalid as exc:
        return Rejected(exc.reason, exc.detail)
