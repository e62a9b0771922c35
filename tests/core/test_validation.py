import json
import pytest

from driftrec.core.contracts import Click, Item, Rating, Recommendation, RecommendationRequest, RecommendedItem
from driftrec.core.validation import Limits, Rejected, validate

NOW = 1_800_000_000.0


def raw(**fields):
    return json.dumps(fields).encode()


def click(**kw):
    base = {"type": "click", "event_id": "e1", "event_time": NOW - 10, "user_id": "u1", "item_id": "i1"}
    base.update(kw)
    return base


@pytest.mark.parametrize(
    "data, cls",
    [
        (click(), Click),
        ({"type": "rating", "event_id": "e", "event_time": NOW, "user_id": 7, "item_id": "i", "rating": 4}, Rating),
        ({"type": "item", "event_id": "e", "event_time": NOW, "item_id": "i", "title": "Toy Story",
          "genres": ["Animation"], "year": 1995, "vector": [0.1, 0.2]}, Item),
        ({"type": "recommendation_request", "event_id": "e", "event_time": NOW, "user_id": "u", "k": 5}, RecommendationRequest),
    ],
)
def test_valid_events_parse_to_their_contract(data, cls):
    ev = validate(raw(**data), now=NOW)
    assert isinstance(ev, cls)
    assert ev.event_id == "e" or ev.event_id == "e1"
    # the wire form of a parsed event validates again to an equal event
    again = validate(json.dumps(ev.to_wire()).encode(), now=NOW)
    assert again == ev


def test_integer_ids_are_normalised_to_strings():
    ev = validate(raw(**click(user_id=42, item_id=7)), now=NOW)
    assert ev.user_id == "42" and ev.item_id == "7"


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"\xff\xfe\x00garbage", "not_json"),
        (b"{not json", "not_json"),
        (b"", "not_json"),
        (b"[1, 2]", "not_object"),
        (raw(**click(type="purchase")), "unknown_type"),
        (raw(**{k: v for k, v in click().items() if k != "user_id"}), "missing_field"),
        (raw(**{k: v for k, v in click().items() if k != "event_id"}), "missing_field"),
        (raw(**click(user_id=["a"])), "wrong_type"),
        (raw(**click(user_id=True)), "wrong_type"),
        (raw(**click(event_time="yesterday")), "wrong_type"),
        (raw(**click(user_id="")), "bad_value"),
        (raw(**click(user_id="x" * 500)), "bad_value"),
        (raw(**click(extra_field=1)), "unknown_field"),
        (raw(**click(schema_version=99)), "unsupported_version"),
        (raw(**click(event_time=NOW + 10 * 86400)), "future_time"),
        (raw(**click(event_time=5.0)), "too_old"),
        (b'{"type":"click","event_id":"e","event_time":NaN,"user_id":"u","item_id":"i"}', "bad_value"),
        (raw(type="rating", event_id="e", event_time=NOW, user_id="u", item_id="i", rating=11), "bad_value"),
        (raw(type="rating", event_id="e", event_time=NOW, user_id="u", item_id="i", rating="5"), "wrong_type"),
        (raw(type="recommendation_request", event_id="e", event_time=NOW, user_id="u", k=0), "bad_value"),
        (raw(type="item", event_id="e", event_time=NOW, item_id="i", title="t", year=99999), "bad_value"),
        (raw(type="item", event_id="e", event_time=NOW, item_id="i", title="t", vector=[1, "x"]), "bad_value"),
        (raw(**click(user_id="x", item_id="y", recommendation_id="r" * 10)) + b" " * 70000, "oversized"),
        (b"[" * 5000 + b"]" * 5000, "not_json"),
    ],
)
def test_malformed_events_are_rejected_with_a_reason(payload, reason):
    result = validate(payload, now=NOW)
    assert isinstance(result, Rejected), result
    assert result.reason == reason, result
    assert result.detail


def test_event_on_the_wrong_topic_is_rejected():
    result = validate(raw(**click()), now=NOW, expected_type="rating")
    assert isinstance(result, Rejected) and result.reason == "wrong_topic"


def test_type_may_be_implied_by_the_topic():
    data = click()
    del data["type"]
    assert isinstance(validate(raw(**data), now=NOW, expected_type="click"), Click)


def test_limits_are_configurable():
    small = Limits(max_bytes=300)
    assert validate(raw(**click(item_id="i" * 100)), now=NOW, limits=small) .__class__ is Click
    assert validate(raw(**click(item_id="i" * 100, user_id="u" * 100, recommendation_id="r" * 100)),
                    now=NOW, limits=small).reason == "oversized"


def test_recommendation_wire_format_is_plain_json():
    rec = Recommendation(event_id="x", event_time=1.0, request_id="r", user_id="u",
                         items=[RecommendedItem(item_id="a", score=0.5, reason="because")], adapter_version="v1")
    wire = json.loads(rec.dumps())
    assert "__faust" not in wire
    assert wire["items"][0] == {"item_id": "a", "score": 0.5, "reason": "because"}
    assert rec.to_wire()["type"] == "recommendation" and rec.to_wire()["schema_version"] == 1


def test_validate_never_raises_on_random_bytes():
    import random

    rng = random.Random(0)
    for _ in range(2000):
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
        assert isinstance(validate(blob, now=NOW), (Rejected, Click, Rating, Item, RecommendationRequest))


@pytest.mark.parametrize("payload", [
    {"type": "click", "event_id": "e1", "event_time": NOW - 5, "user_id": "u", "item_id": "i"},
    {"type": "click", "event_id": "e2", "event_time": NOW - 5, "user_id": "u", "item_id": "i",
     "recommendation_id": "r9", "domain": "books"},
    {"type": "rating", "event_id": "e3", "event_time": NOW - 5, "user_id": "u", "item_id": "i", "rating": 4},
    {"type": "rating", "event_id": "e4", "event_time": int(NOW), "user_id": 7, "item_id": "i", "rating": 2.5,
     "domain": "films", "schema_version": 1},
])
def test_fast_built_events_equal_the_record_constructor(payload):
    """Clicks and ratings skip faust.Record.__init__; the result must be the very same record."""
    from driftrec.core.contracts import INBOUND_TYPES

    got = validate(json.dumps(payload).encode(), now=NOW)
    fields = {k: v for k, v in payload.items() if k not in ("type", "schema_version")}
    fields["event_time"] = float(fields["event_time"])
    fields["user_id"] = str(fields["user_id"])
    if "rating" in fields:
        fields["rating"] = float(fields["rating"])
    want = INBOUND_TYPES[payload["type"]](**fields)
    assert type(got) is type(want)
    assert list(got.__dict__.items()) == list(want.__dict__.items())
    assert got == want and repr(got) == repr(want) and got.dumps() == want.dumps()
