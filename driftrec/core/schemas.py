"""JSON Schemas (draft 2020-12) for every event type, generated from the contracts and the validator.

    python -m driftrec.core.schemas --out schemas/           # (re)write schemas/<type>.schema.json
    python -m driftrec.core.schemas --out schemas/ --check   # exit 1 if a committed file differs

The inbound types (click, rating, item, recommendation_request) are built from the validator's own
field table (:mod:`driftrec.core.validation`: each field's kind, whether it is required, and the
limits: id and text lengths, the rating range, the oldest event time, list sizes), so a schema accepts
what :func:`~driftrec.core.validation.validate` accepts. The outbound types (recommendation,
dead_letter, adapter) describe what driftrec publishes: they follow the ``faust.Record`` fields of
:mod:`driftrec.core.contracts` (the validator never sees them).

What JSON Schema cannot say, and so the schemas do not (``tests/core/test_schemas.py`` fuzzes the
rest, schema against validator):

* ``event_time`` in the future: the validator rejects an event timed more than
  ``stream.max_future_skew_s`` after *now*; a schema has no clock.
* the message size (``stream.max_event_bytes``, 64 KiB by default) is a limit on the bytes, not the value.
* the limits that are settings take their defaults here: ``event_time`` >= ``stream.min_event_time``
  (1990-01-01).
* an integral number written with a fraction or exponent (``3.0``, ``1e2``) is an integer to JSON
  Schema, but the validator takes an integer field (``k``, ``year``, ``schema_version``, an integer
  id) only as a JSON integer.
* printable ids: the schema forbids the characters Python's ``str.isprintable()`` calls non-printable
  among the *assigned* ones (controls, format characters, separators other than the space, private
  use); the validator also rejects code points unassigned in its Unicode version.
* an integer id must lie in [-2**63, 2**64 - 1]: beyond that the validator's JSON parser (orjson)
  reads a float, which the validator then rejects as ``wrong_type``.
* ``type`` is required here; on its own topic an event may omit it (the topic names the type).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import types
import typing
import unicodedata
from pathlib import Path
from typing import Any

import faust

from driftrec.core import validation
from driftrec.core.contracts import ALL_TYPES, INBOUND_TYPES, SCHEMA_VERSION, Event, Rating

DIALECT = "https://json-schema.org/draft/2020-12/schema"
ID_PREFIX = f"urn:driftrec:schema:v{SCHEMA_VERSION}:"
# Integer ids are taken as their decimal string. The bound that bites is the parser's, not
# MAX_ID_LEN: validate() parses with orjson, which reads an integer outside the 64-bit range
# [-2**63, 2**64 - 1] as a float, and a float id is rejected (wrong_type).
MAX_INT_ID = min(2**64 - 1, 10**validation.MAX_ID_LEN - 1)
MIN_INT_ID = max(-(2**63), -(10 ** (validation.MAX_ID_LEN - 1) - 1))


@functools.cache
def _nonprintable_ranges() -> list[tuple[int, int]]:
    """Assigned code points ``str.isprintable()`` rejects, as ranges; surrogates left out (not text)."""
    ranges: list[tuple[int, int]] = []
    for cp in range(sys.maxunicode + 1):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        ch = chr(cp)
        if ch.isprintable() or unicodedata.category(ch) == "Cn":
            continue
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1] = (ranges[-1][0], cp)
        else:
            ranges.append((cp, cp))
    return ranges


def _class_char(cp: int) -> str:
    ch = chr(cp)
    return "\\" + ch if ch in "\\]^-[" else ch


def nonprintable_class() -> str:
    """A regex character class of those characters: a string with none of them is printable.

    It holds the characters themselves (JSON-escaped in the files), so no regex dialect's escapes are
    needed, and the schema says ``"not": {"pattern": ...}``, so no anchors either (``$`` differs between
    dialects before a final newline).
    """
    return "[" + "".join(
        _class_char(a) if a == b else f"{_class_char(a)}-{_class_char(b)}" for a, b in _nonprintable_ranges()
    ) + "]"


def _id_schema() -> dict[str, Any]:
    return {
        "description": f"an id: 1-{validation.MAX_ID_LEN} printable characters; an integer is taken as its "
                       "decimal string",
        "anyOf": [
            {"type": "string", "minLength": 1, "maxLength": validation.MAX_ID_LEN,
             "not": {"pattern": nonprintable_class()}},
            {"type": "integer", "minimum": MIN_INT_ID, "maximum": MAX_INT_ID},
        ],
    }


def _text() -> dict[str, Any]:
    return {"type": "string", "maxLength": validation.MAX_TEXT_LEN}


def _kind_schema(kind: str, limits: validation.Limits) -> dict[str, Any]:
    """The schema of one validator field kind (see ``validation._check``)."""
    if kind.endswith("?"):
        return {"anyOf": [_kind_schema(kind[:-1], limits), {"type": "null"}]}
    if kind == "id":
        return {"$ref": "#/$defs/id"}
    if kind == "text":
        return _text()
    if kind == "k":
        return {"type": "integer", "minimum": 1, "maximum": validation.MAX_K}
    if kind == "year":
        return {"type": "integer", "minimum": 1800, "maximum": 2200}
    if kind == "bool":
        return {"type": "boolean"}
    if kind == "time":
        return {"type": "number", "minimum": limits.min_event_time,
                "description": "unix seconds; not before stream.min_event_time (default shown), and not more "
                               "than stream.max_future_skew_s in the future (checked by the validator only)"}
    if kind == "rating":
        return {"type": "number", "minimum": Rating.MIN, "maximum": Rating.MAX}
    if kind == "strlist":
        return {"type": "array", "maxItems": validation.MAX_LIST_LEN, "items": _text()}
    if kind == "idlist":
        return {"type": "array", "maxItems": validation.MAX_CANDIDATES, "items": {"$ref": "#/$defs/id"}}
    if kind == "vector":
        return {"type": "array", "minItems": 1, "maxItems": validation.MAX_VECTOR_LEN, "items": {"type": "number"}}
    raise ValueError(f"no JSON Schema for field kind {kind!r}")  # a new kind in validation.py: add it here


def _envelope(cls: type[Event], properties: dict[str, Any], required: list[str], description: str) -> dict[str, Any]:
    return {
        "$schema": DIALECT,
        "$id": f"{ID_PREFIX}{cls.TYPE}",
        "title": cls.__name__,
        "description": description,
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def inbound_schema(etype: str, limits: validation.Limits = validation.Limits()) -> dict[str, Any]:
    """The schema of an inbound event type, from the validator's field table."""
    cls = INBOUND_TYPES[etype]
    defaults = cls._options.defaults
    fields = {**validation._COMMON, **validation._SCHEMAS[etype]}
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, (kind, needed) in fields.items():
        if name == "type":
            prop: dict[str, Any] = {"const": etype}
        elif name == "schema_version":
            prop = {"const": SCHEMA_VERSION}
        else:
            prop = _kind_schema(kind, limits)
        if name in defaults:
            prop["default"] = defaults[name]
        properties[name] = prop
        if needed:
            required.append(name)
    doc = " ".join((cls.__doc__ or "").split())
    description = (doc + " " if doc else "") + (
        f"Inbound '{etype}' event, as driftrec's validator accepts it (driftrec.core.validation); "
        "see driftrec.core.schemas for what only the validator checks (future event times, message size).")
    schema = _envelope(cls, properties, required, description)
    schema["$defs"] = {"id": _id_schema()}
    return schema


def _type_schema(tp: Any, owner: str) -> dict[str, Any]:
    """JSON Schema of a contract field's Python type (outbound events)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_type_schema(a, owner) for a in typing.get_args(tp)]}
    if tp is type(None):
        return {"type": "null"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    if origin is list:
        [item] = typing.get_args(tp)
        return {"type": "array", "items": _type_schema(item, owner)}
    if isinstance(tp, type) and issubclass(tp, faust.Record):
        return _record_schema(tp, owner)
    raise ValueError(f"{owner}: no JSON Schema for field type {tp!r}")


def _record_schema(cls: type[faust.Record], owner: str) -> dict[str, Any]:
    defaults = cls._options.defaults
    properties = {}
    for name, tp in cls._options.fields.items():
        prop = _type_schema(tp, f"{owner}.{name}")
        if name in defaults:
            prop["default"] = defaults[name]
        properties[name] = prop
    return {"type": "object", "properties": properties,
            "required": [n for n in cls._options.fields if n not in defaults], "additionalProperties": False}


def outbound_schema(etype: str) -> dict[str, Any]:
    """The schema of an event driftrec publishes, from its ``faust.Record`` fields (``Event.to_wire``)."""
    cls = ALL_TYPES[etype]
    body = _record_schema(cls, cls.__name__)
    properties = {"type": {"const": etype}, "schema_version": {"const": SCHEMA_VERSION}, **body["properties"]}
    doc = " ".join((cls.__doc__ or "").split())
    description = (doc + " " if doc else "") + f"Outbound '{etype}' event, as driftrec publishes it."
    return _envelope(cls, properties, ["type", "schema_version", *body["required"]], description)


def schemas() -> dict[str, dict[str, Any]]:
    """Event type -> its schema, for every event type."""
    return {etype: inbound_schema(etype) if etype in INBOUND_TYPES else outbound_schema(etype) for etype in ALL_TYPES}


def filename(etype: str) -> str:
    return f"{etype}.schema.json"


def render(schema: dict[str, Any]) -> str:
    """The exact text committed: sorted keys, 2-space indent, ASCII only, trailing newline."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n"


def rendered() -> dict[str, str]:
    """File name -> file text, for every event type."""
    return {filename(etype): render(schema) for etype, schema in schemas().items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m driftrec.core.schemas", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("schemas"), help="output folder (default: ./schemas)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a file is out of date")
    args = parser.parse_args(argv)
    files = rendered()
    stale = [name for name, text in files.items()
             if not (args.out / name).is_file() or (args.out / name).read_text() != text]
    extra = sorted(p.name for p in args.out.glob("*.schema.json") if p.name not in files) if args.out.is_dir() else []
    if args.check:
        if stale or extra:
            print(f"out of date (run python -m driftrec.core.schemas --out {args.out}): "
                  + ", ".join(stale + [f"{n} (no such event type)" for n in extra]), file=sys.stderr)
            return 1
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (args.out / name).write_text(files[name])
        print(f"wrote {args.out / name}")
    for name in extra:
        print(f"note: {args.out / name} is no event type's schema", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
