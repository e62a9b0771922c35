"""schemas/*.schema.json: committed = generated, and schema and validator agree on a fuzzed set.

The fuzz is a seeded generator (no hypothesis): valid events of every inbound type, and mutations of
them - fields dropped, added, retyped, pushed out of range or past a length limit. For each one,
"some schema accepts it" must equal "validate() accepts it" (and then as the same type).

Left out of the fuzz, on purpose (driftrec/core/schemas.py documents each difference):
* future event times: the validator runs with ``now=inf``, so its clock-relative check never fires;
* the byte size limit: the validator runs with a huge ``max_bytes``;
* integral floats (``3.0``) where an integer goes: an integer to JSON Schema, not to the validator;
  the fuzz's floats always have a fraction;
* NaN / Infinity: not JSON (the events are encoded with ``allow_nan=False``);
* lone surrogates and unassigned code points: not in the fuzz's character pool (the first are no
  text, the second depend on the Unicode version; test_printable_pattern_matches_isprintable covers
  every assigned character one by one).
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

jsonschema = pytest.importorskip("jsonschema", reason="pip install -e '.[test]' (jsonschema)")

from driftrec.core import schemas as gen  # noqa: E402
from driftrec.core import validation  # noqa: E402
from driftrec.core.contracts import (  # noqa: E402
    ALL_TYPES,
    INBOUND_TYPES,
    AdapterAnnouncement,
    DeadLetter,
    Event,
    Recommendation,
    RecommendedItem,
)

REPO = Path(__file__).resolve().parents[2]
SCHEMA_DIR = REPO / "schemas"
LIMITS = validation.Limits(max_bytes=1 << 30)  # the byte limit is no schema matter (see the module docstring)
MIN_TIME = validation.Limits().min_event_time


def _committed() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(SCHEMA_DIR.glob("*.schema.json"))}


def _validators() -> dict[str, jsonschema.protocols.Validator]:
    out = {}
    for name, schema in _committed().items():
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        out[schema["properties"]["type"]["const"]] = cls(schema)
    return out


# ------------------------------------------------------------------------------- the files


def test_committed_schemas_equal_the_generator(tmp_path):
    files = gen.rendered()
    assert set(files) == {f"{t}.schema.json" for t in ALL_TYPES}
    assert {p.name for p in SCHEMA_DIR.glob("*.schema.json")} == set(files), "run python -m driftrec.core.schemas"
    for name, text in files.items():
        assert (SCHEMA_DIR / name).read_text() == text, f"{name} is stale: run python -m driftrec.core.schemas --out schemas/"
    assert gen.main(["--out", str(SCHEMA_DIR), "--check"]) == 0
    # the entry point writes what --check then accepts, and --check sees a changed file
    out = tmp_path / "s"
    assert gen.main(["--out", str(out)]) == 0
    assert {p.name: p.read_text() for p in out.iterdir()} == files
    (out / "click.schema.json").write_text("{}\n")
    assert gen.main(["--out", str(out), "--check"]) == 1


def test_every_schema_is_valid_and_names_its_type():
    validators = _validators()
    assert set(validators) == set(ALL_TYPES)
    for etype, v in validators.items():
        schema = v.schema
        assert schema["$schema"] == gen.DIALECT and schema["$id"].endswith(etype)
        assert schema["additionalProperties"] is False
        assert {"type", "event_id", "event_time"} <= set(schema["required"])
        assert schema["title"] == ALL_TYPES[etype].__name__


def test_inbound_schemas_carry_the_validator_limits():
    by_type = {s["properties"]["type"]["const"]: s for s in _committed().values()}
    ident = by_type["click"]["$defs"]["id"]["anyOf"][0]
    assert ident["maxLength"] == validation.MAX_ID_LEN and ident["minLength"] == 1
    assert by_type["rating"]["properties"]["rating"] == {"type": "number", "minimum": 0.0, "maximum": 5.0}
    assert by_type["click"]["properties"]["event_time"]["minimum"] == MIN_TIME
    req = by_type["recommendation_request"]["properties"]
    assert req["k"]["maximum"] == validation.MAX_K and req["k"]["default"] == 10
    assert req["candidates"]["anyOf"][0]["maxItems"] == validation.MAX_CANDIDATES
    item = by_type["item"]["properties"]
    assert item["genres"]["maxItems"] == validation.MAX_LIST_LEN
    assert item["title"]["maxLength"] == item["description"]["maxLength"] == validation.MAX_TEXT_LEN
    assert item["vector"]["anyOf"][0]["maxItems"] == validation.MAX_VECTOR_LEN
    for etype, fields in validation._SCHEMAS.items():
        schema = by_type[etype]
        assert set(schema["properties"]) == set(fields) | set(validation._COMMON), etype
        assert set(schema["required"]) == {n for n, (_, req) in {**validation._COMMON, **fields}.items() if req}


def test_printable_pattern_matches_isprintable():
    """Every assigned, non-surrogate character: the schema's id pattern agrees with str.isprintable()."""
    pattern = re.compile(gen.nonprintable_class())
    wrong = []
    for cp in range(sys.maxunicode + 1):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        ch = chr(cp)
        if unicodedata.category(ch) == "Cn":
            continue
        if (pattern.search(ch) is None) != ch.isprintable():
            wrong.append(hex(cp))
    assert not wrong, wrong[:20]


# ------------------------------------------------------------------------------- the fuzz

PRINTABLE = list("abcXYZ019 _-:./@#!?'\"\\{}[]") + ["é", "ß", "中", "文", "ж", "😀", "\U0001d400"]
NONPRINTABLE = ["\n", "\t", "\r", "\x00", "\x1f", "\x7f", "\x85", "\u00a0", "\u00ad", "\u200b", "\u200e",
                "\u2028", "\u2029", "\u3000", "\ufeff", "\ue000", "\U000e0001", "\U000f0000"]


class Fuzz:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    # -- values
    def chars(self, n: int, printable: bool = True) -> str:
        pool = PRINTABLE if printable else PRINTABLE + NONPRINTABLE
        return "".join(self.rng.choice(pool) for _ in range(n))

    def float_(self, lo: float, hi: float) -> float:
        x = self.rng.uniform(lo, hi)
        return x + 0.5 if x.is_integer() else x  # never integral (see the module docstring)

    def ident(self) -> str | int:
        r = self.rng.random()
        if r < 0.15:
            return self.rng.randint(-10**6, 10**12)
        if r < 0.2:
            return validation.MAX_ID_LEN * "x"  # exactly at the limit
        return self.chars(self.rng.randint(1, 24))

    def time(self) -> float | int:
        if self.rng.random() < 0.2:
            return self.rng.randint(int(MIN_TIME), 2_000_000_000)
        return self.float_(MIN_TIME, 2e9) if self.rng.random() < 0.9 else float(MIN_TIME)

    def text(self) -> str:
        return self.chars(self.rng.randint(0, 40), printable=self.rng.random() < 0.8)

    def any_value(self, depth: int = 0) -> Any:
        """Any JSON value (a 'wrong type' candidate)."""
        choice = self.rng.randrange(8 if depth < 2 else 6)
        if choice == 0:
            return self.chars(self.rng.randint(0, 8), printable=False)
        if choice == 1:
            return self.rng.randint(-10**20, 10**20)
        if choice == 2:
            return self.float_(-1e6, 1e6)
        if choice == 3:
            return self.rng.random() < 0.5
        if choice == 4:
            return None
        if choice == 5:
            return self.rng.choice(["", "1", "true", "null", "click"])
        if choice == 6:
            return [self.any_value(depth + 1) for _ in range(self.rng.randint(0, 3))]
        return {self.chars(3): self.any_value(depth + 1) for _ in range(self.rng.randint(0, 3))}

    def maybe(self, p: float = 0.5) -> bool:
        return self.rng.random() < p

    # -- events
    def valid(self, etype: str) -> dict[str, Any]:
        rng = self.rng
        ev: dict[str, Any] = {"type": etype, "event_id": self.ident(), "event_time": self.time()}
        if self.maybe(0.3):
            ev["schema_version"] = 1
        if etype in ("click", "rating"):
            ev.update(user_id=self.ident(), item_id=self.ident())
            if etype == "rating":
                ev["rating"] = rng.choice([0, 5, 0.0, 5.0, 3, self.float_(0, 5)])
            if self.maybe():
                ev["recommendation_id"] = None if self.maybe(0.3) else self.ident()
            if self.maybe():
                ev["domain"] = None if self.maybe(0.3) else self.ident()
        elif etype == "item":
            ev.update(item_id=self.ident(), title=self.text())
            if self.maybe():
                ev["genres"] = [self.text() for _ in range(rng.choice([0, 1, 3, validation.MAX_LIST_LEN]))]
            if self.maybe():
                ev["tags"] = [self.text() for _ in range(rng.randint(0, 5))]
            if self.maybe():
                ev["year"] = None if self.maybe(0.2) else rng.choice([1800, 2200, rng.randint(1800, 2200)])
            if self.maybe():
                ev["description"] = self.text() if self.maybe(0.9) else "d" * validation.MAX_TEXT_LEN
            if self.maybe(0.3):
                ev["domain"] = self.ident()
            if self.maybe(0.3):
                ev["vector"] = None if self.maybe(0.2) else [
                    rng.choice([rng.randint(-5, 5), self.float_(-1, 1)]) for _ in range(rng.randint(1, 8))]
        elif etype == "recommendation_request":
            ev["user_id"] = self.ident()
            if self.maybe():
                ev["k"] = rng.choice([1, validation.MAX_K, rng.randint(1, 50)])
            if self.maybe():
                ev["domain"] = None if self.maybe(0.3) else self.ident()
            if self.maybe():
                ev["exclude_seen"] = self.maybe()
            if self.maybe():
                ev["candidates"] = None if self.maybe(0.2) else [self.ident() for _ in range(rng.randint(0, 6))]
        return ev

    def mutate(self, ev: dict[str, Any]) -> dict[str, Any] | Any:
        if not isinstance(ev, dict) or not ev:
            return ev
        ev = copy.deepcopy(ev)
        rng = self.rng
        field = rng.choice(sorted(ev))
        how = rng.randrange(12)
        if how == 0:  # drop a field (required or not)
            del ev[field]
        elif how == 1:  # an unknown field
            ev[rng.choice(["extra", "userId", "Type", "items", "rating", "k", "title"])] = self.any_value()
        elif how == 2:  # a wrong type (or, by chance, a right one)
            ev[field] = self.any_value()
        elif how == 3:  # over-long string
            ev[field] = "a" * rng.choice([validation.MAX_ID_LEN + 1, validation.MAX_TEXT_LEN + 1])
        elif how == 4:  # empty / non-printable string
            ev[field] = rng.choice(["", self.chars(5) + rng.choice(NONPRINTABLE) + self.chars(2)])
        elif how == 5:  # numbers around the edges
            ev[field] = rng.choice([-1, 0, 1, 5, 6, 1000, 1001, 1799, 1800, 2200, 2201, -0.5, 5.25, 1000.5,
                                    MIN_TIME - 0.5, int(MIN_TIME), 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**129])
        elif how == 6:  # type: another, unknown, or not a string
            ev["type"] = rng.choice(sorted(ALL_TYPES) + ["", "clicks", 1, None])
        elif how == 7:  # schema_version
            ev["schema_version"] = rng.choice([1, 2, 0, "1", True, None, 1.5])
        elif how == 8:  # a list field: too long, empty, holding wrong things
            name = rng.choice([f for f in ("genres", "tags", "candidates", "vector") if f in ev] or [field])
            size = rng.choice([0, 2, 2, validation.MAX_LIST_LEN + 1, validation.MAX_VECTOR_LEN + 1]
                              + [validation.MAX_CANDIDATES + 1] * (rng.random() < 0.1))  # big lists are slow
            fill = rng.choice([lambda: "x", lambda: 1, lambda: 0.25, lambda: None, lambda: True, lambda: "a" * 129])
            ev[name] = [fill() for _ in range(size)]
        elif how == 9:  # an id as an integer, a bool, a float
            ev[field] = rng.choice([7, -3, True, False, 2.5, 10**127, -(10**127)])
        elif how == 10:  # two mutations
            return self.mutate(self.mutate(ev))
        else:  # not an object at all
            return rng.choice([[ev], "click", 3, None, True, []])
        return ev


def _encode(value: Any) -> bytes:
    return json.dumps(value, allow_nan=False, ensure_ascii=bool(random.getrandbits(1))).encode()


def _schema_accepts(validators, value) -> str | None:
    """The type whose schema accepts the value, or None."""
    accepted = [etype for etype, v in validators.items() if etype in INBOUND_TYPES and v.is_valid(value)]
    assert len(accepted) <= 1, accepted  # each schema fixes its type
    return accepted[0] if accepted else None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_schema_and_validator_agree_on_fuzzed_events(seed):
    validators = _validators()
    fuzz = Fuzz(seed)
    random.seed(seed)  # _encode's ensure_ascii choice
    outcomes: Counter[str] = Counter()
    disagreements = []
    for i in range(1500):
        etype = fuzz.rng.choice(sorted(INBOUND_TYPES))
        event = fuzz.valid(etype)
        value = event if i % 4 == 0 else fuzz.mutate(event)
        raw = _encode(value)
        value = json.loads(raw)  # what both sides see
        result = validation.validate(raw, limits=LIMITS, now=math.inf)  # now=inf: no future-time check
        by_schema = _schema_accepts(validators, value)
        by_validator = result.TYPE if isinstance(result, Event) else None
        outcomes[result.reason if isinstance(result, validation.Rejected) else "accepted"] += 1
        if by_schema != by_validator:
            disagreements.append((raw[:300], by_schema, result))
    assert not disagreements, disagreements[:5]
    # the fuzz reaches both sides and most rejection reasons
    assert outcomes["accepted"] > 300, outcomes
    assert {"not_object", "unknown_type", "unsupported_version", "missing_field", "wrong_type", "bad_value",
            "unknown_field", "too_old"} <= set(outcomes), outcomes


def test_valid_events_are_all_accepted():
    validators = _validators()
    fuzz = Fuzz(7)
    for _ in range(400):
        etype = fuzz.rng.choice(sorted(INBOUND_TYPES))
        event = fuzz.valid(etype)
        raw = json.dumps(event).encode()
        assert isinstance(validation.validate(raw, limits=LIMITS, now=math.inf), Event), raw
        validators[etype].validate(event)


@pytest.mark.parametrize("event, why", [
    ({"type": "click", "event_id": "e", "event_time": MIN_TIME, "user_id": "u", "item_id": "i"}, None),
    ({"type": "click", "event_id": "e", "event_time": MIN_TIME - 1, "user_id": "u", "item_id": "i"}, "too_old"),
    ({"type": "click", "event_id": "e", "event_time": 1e9, "user_id": "u\n", "item_id": "i"}, "bad_value"),
    ({"type": "click", "event_id": "e", "event_time": 1e9, "user_id": "u" * 129, "item_id": "i"}, "bad_value"),
    ({"type": "click", "event_id": "e", "event_time": 1e9, "user_id": True, "item_id": "i"}, "wrong_type"),
    ({"type": "click", "event_id": 2**64 - 1, "event_time": 1e9, "user_id": "u", "item_id": "i"}, None),
    ({"type": "click", "event_id": -(2**63), "event_time": 1e9, "user_id": "u", "item_id": "i"}, None),
    # orjson reads an integer beyond 64 bits as a float
    ({"type": "click", "event_id": 2**64, "event_time": 1e9, "user_id": "u", "item_id": "i"}, "wrong_type"),
    ({"type": "click", "event_id": -(2**63) - 1, "event_time": 1e9, "user_id": "u", "item_id": "i"}, "wrong_type"),
    ({"type": "rating", "event_id": "e", "event_time": 1e9, "user_id": "u", "item_id": "i", "rating": 5.0001},
     "bad_value"),
    ({"type": "rating", "event_id": "e", "event_time": 1e9, "user_id": "u", "item_id": "i"}, "missing_field"),
    ({"type": "item", "event_id": "e", "event_time": 1e9, "item_id": "i", "title": "t", "vector": []}, "wrong_type"),
    ({"type": "item", "event_id": "e", "event_time": 1e9, "item_id": "i", "title": "t", "year": 2201}, "bad_value"),
    ({"type": "recommendation_request", "event_id": "e", "event_time": 1e9, "user_id": "u", "k": 0}, "bad_value"),
    ({"type": "recommendation_request", "event_id": "e", "event_time": 1e9, "user_id": "u", "x": 1},
     "unknown_field"),
    ({"type": "click", "schema_version": 2, "event_id": "e", "event_time": 1e9, "user_id": "u", "item_id": "i"},
     "unsupported_version"),
])
def test_known_cases(event, why):
    validators = _validators()
    result = validation.validate(json.dumps(event).encode(), limits=LIMITS, now=math.inf)
    assert (result.reason if isinstance(result, validation.Rejected) else None) == why
    assert validators[event["type"]].is_valid(event) == (why is None)


def test_the_documented_differences_are_real():
    """What the schemas cannot say (driftrec/core/schemas.py): these stay differences."""
    validators = _validators()
    click = {"type": "click", "event_id": "e", "event_time": 4e9, "user_id": "u", "item_id": "i"}
    assert validators["click"].is_valid(click)
    assert validation.validate(json.dumps(click).encode(), now=1e9).reason == "future_time"
    req = {"type": "recommendation_request", "event_id": "e", "event_time": 1e9, "user_id": "u", "k": 3.0}
    assert validators["recommendation_request"].is_valid(req)
    assert validation.validate(json.dumps(req).encode(), now=1e9).reason == "wrong_type"


# ---------------------------------------------------------------------------- outbound types


def _outbound_events() -> list[Event]:
    return [
        Recommendation(event_id="r1", event_time=1e9, request_id="q1", user_id="u1",
                       items=[RecommendedItem(item_id="i1", score=0.5, reason="because"),
                              RecommendedItem(item_id="i2", score=0.25)], model_version="m", fallback=True),
        Recommendation(event_id="r2", event_time=1e9, request_id="q2", user_id="u2", items=[]),
        DeadLetter(event_id="d1", event_time=1e9, reason="not_json", source_topic="driftrec.clicks",
                   original_b64="eyJ9", source_partition=3, source_offset=17, original_bytes=3),
        DeadLetter(event_id="d2", event_time=1e9, reason="oversized", source_topic="t", original_b64="",
                   truncated=True),
        AdapterAnnouncement(event_id="a1", event_time=1e9, domain="default", version="v3", path="/x/v3",
                            signature="ab" * 32),
    ]


def test_outbound_events_match_their_schemas():
    validators = _validators()
    for event in _outbound_events():
        wire = json.loads(json.dumps(event.to_wire()))
        validators[event.TYPE].validate(wire)
        schema = validators[event.TYPE].schema
        for name in schema["required"]:  # every required field is needed
            broken = {k: v for k, v in wire.items() if k != name}
            assert not validators[event.TYPE].is_valid(broken), (event.TYPE, name)
        for name, value in wire.items():  # and typed
            wrong = {**wire, name: {"not": "this"}}
            assert not validators[event.TYPE].is_valid(wrong), (event.TYPE, name)
        assert not validators[event.TYPE].is_valid({**wire, "surprise": 1})
        assert not validators[event.TYPE].is_valid({**wire, "schema_version": 2})
    rec = json.loads(json.dumps(_outbound_events()[0].to_wire()))
    rec["items"][0]["score"] = "high"
    assert not validators["recommendation"].is_valid(rec)
