"""The one Interaction (driftrec.core.interactions): derived kind, aliases, tuple semantics."""

from __future__ import annotations

import pytest

from driftrec.core.contracts import Click, Rating
from driftrec.core.interactions import CLICK, RATING, Interaction


def test_kinds_are_the_contract_types():
    assert (CLICK, RATING) == (Click.TYPE, Rating.TYPE)


def test_kind_comes_from_the_rating():
    click = Interaction("u", "i", None, 1.0)
    rating = Interaction("u", "i", 4.0, 1.0)
    assert (click.kind, rating.kind) == (CLICK, RATING)
    assert Interaction("u", "i", 0.0, 1.0).kind == RATING  # a zero rating is still a rating


def test_defaults_and_positional_order():
    it = Interaction("u", "i", 3.5, 12.0)
    assert it == ("u", "i", 3.5, 12.0, "", None, None, "", -1)
    assert Interaction._fields == ("user_id", "item_id", "rating", "event_time", "event_id", "domain",
                                   "recommendation_id", "source", "offset")


def test_replay_aliases_are_read_only():
    it = Interaction("u", "i", 5.0, 42.0, "e1", "movies", "req-1", "r3", 7)
    assert (it.user, it.item, it.timestamp) == (it.user_id, it.item_id, it.event_time) == ("u", "i", 42.0)
    for name in ("user", "item", "timestamp", "kind", "user_id"):
        with pytest.raises(AttributeError):
            setattr(it, name, "x")
    assert it._replace(source="c9", offset=1) == ("u", "i", 5.0, 42.0, "e1", "movies", "req-1", "c9", 1)
