"""The contracts without Faust (the client-only install) are the same contracts: same fields in the same
order, same defaults, same wire JSON, same errors for a missing field - checked against the
``faust.Record`` classes the worker uses, by loading the contracts module a second time with Faust hidden."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from driftrec.core import contracts as faust_contracts
from driftrec.core.records import Record


@pytest.fixture
def lite(monkeypatch):
    monkeypatch.setitem(sys.modules, "faust", None)  # `import faust` raises ImportError
    spec = importlib.util.spec_from_file_location("lite_contracts", faust_contracts.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.Record is Record and faust_contracts.Record is not Record
    return mod


SAMPLES = {
    "click": dict(event_id="e1", event_time=1.5, user_id="u", item_id="i"),
    "rating": dict(event_id="e2", event_time=1.5, user_id="u", item_id="i", rating=4.0, domain="books"),
    "item": dict(event_id="e3", event_time=1.5, item_id="i", title="T", genres=["a"], year=1999),
    "recommendation_request": dict(event_id="e4", event_time=1.5, user_id="u", k=3, candidates=["a", "b"]),
    "dead_letter": dict(event_id="e5", event_time=1.5, reason="bad", source_topic="t", original_b64="eA=="),
    "adapter": dict(event_id="e6", event_time=1.5, domain="d", version="v1", path="/p"),
}


@pytest.mark.parametrize("etype", sorted(faust_contracts.ALL_TYPES))
def test_every_contract_has_the_same_fields_and_defaults_without_faust(lite, etype):
    f, c = faust_contracts.ALL_TYPES[etype], lite.ALL_TYPES[etype]
    assert list(c._options.fields) == list(f._options.fields)
    assert c._options.defaults == f._options.defaults
    if etype in SAMPLES:
        assert c(**SAMPLES[etype]).to_wire() == f(**SAMPLES[etype]).to_wire()


def test_nested_records_and_mutable_defaults(lite):
    rec = lite.Recommendation(event_id="r", event_time=1.0, request_id="q", user_id="u",
                              items=[lite.RecommendedItem(item_id="m", score=0.5, reason="why")])
    ref = faust_contracts.Recommendation(event_id="r", event_time=1.0, request_id="q", user_id="u",
                                         items=[faust_contracts.RecommendedItem(item_id="m", score=0.5, reason="why")])
    assert rec.to_wire() == ref.to_wire()
    a, b = lite.Item(event_id="a", event_time=1.0, item_id="a", title="A"), lite.Item(event_id="b", event_time=1.0,
                                                                                      item_id="b", title="B")
    a.genres.append("x")
    assert b.genres == [] and lite.Item.genres == []  # defaults are copied, not shared
    assert a.text() == "A genres: x" and a.key() == "a"
    assert lite.Click(event_id="c", event_time=1.0, user_id="u", item_id="i") == \
        lite.Click("c", 1.0, "u", "i")  # positional in declaration order, like faust.Record


def test_a_missing_or_unknown_field_is_an_error(lite):
    with pytest.raises(TypeError, match="user_id"):
        lite.Click(event_id="c", event_time=1.0, item_id="i")
    with pytest.raises(TypeError, match="colour"):
        lite.Click(event_id="c", event_time=1.0, user_id="u", item_id="i", colour="red")
