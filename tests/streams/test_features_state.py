"""Pure feature-state logic (driftrec.streams.state): counts, order independence, idempotence."""

from __future__ import annotations

import json
import math
import random

import pytest

from driftrec.core.interactions import CLICK, RATING, Interaction
from driftrec.streams.state import (
    ItemDelta,
    ItemState,
    UserState,
    Verdict,
    genre_profile,
    genre_weights,
)

HALF_LIFE = 3600.0


def _events(n=300, users=5, items=40, seed=1):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = RATING if rng.random() < 0.3 else CLICK
        out.append(Interaction(
            event_id=f"e{i}", event_time=1_700_000_000 + i * 7.5 + rng.random(), user_id=f"u{rng.randrange(users)}",
            item_id=f"i{rng.randrange(items)}", rating=float(rng.randint(1, 5)) if kind == RATING else None,
            source=f"c{i % 4}", offset=i,
        ))
    return out


def _users(events, **kw):
    states: dict[str, UserState] = {}
    for ev in events:
        states.setdefault(ev.user_id, UserState()).apply(ev, **kw)
    return states


def _items(events):
    states: dict[str, ItemState] = {}
    for ev in events:
        states.setdefault(ev.item_id, ItemState()).apply(ItemDelta.of(ev), half_life_s=HALF_LIFE)
    return states


def _row(state, uid):
    return state.feature_row(uid, lambda i: genre_weights(["g" + str(int(i[1:]) % 3)]))


def test_user_counts_mean_recent():
    u = UserState()
    t = 1_700_000_000.0
    evs = [
        Interaction("u", "i1", None, t, "a", source="c0", offset=0),
        Interaction("u", "i2", 4.0, t + 1, "b", source="r0", offset=0),
        Interaction("u", "i1", 2.0, t + 2, "c", source="r0", offset=1),
        Interaction("u", "i3", None, t + 3, "d", source="c0", offset=1),
    ]
    for e in evs:
        assert u.apply(e, recent_items=2) is Verdict.NEW
    assert (u.click_count, u.rating_count, u.mean_rating, u.last_event_time) == (2, 2, 3.0, t + 3)
    assert u.recent_item_ids == ["i3", "i1"]  # distinct, newest first, bounded


def _arriving(events, source="c0"):
    """The events as records of one partition in this arrival order (offsets follow arrival)."""
    return [e._replace(source=source, offset=n) for n, e in enumerate(events)]


def test_user_features_do_not_depend_on_arrival_order():
    events = _events()
    ordered = _users(_arriving(events))
    shuffled = list(events)
    random.Random(7).shuffle(shuffled)
    other = _users(_arriving(shuffled))
    for uid, st in ordered.items():
        assert _row(other[uid], uid) == _row(st, uid)


def test_item_features_do_not_depend_on_arrival_order_and_match_closed_form():
    events = _events()
    ordered = _items(events)
    shuffled = list(events)
    random.Random(3).shuffle(shuffled)
    # the same interactions from other source offsets (one source each, so hw never hides them)
    other: dict[str, ItemState] = {}
    for n, ev in enumerate(shuffled):
        d = ItemDelta(ev.item_id, ev.kind, ev.rating, ev.event_time, f"s{n}", 0)
        other.setdefault(ev.item_id, ItemState()).apply(d, half_life_s=HALF_LIFE)
    for iid, st in ordered.items():
        mine = [e for e in events if e.item_id == iid]
        newest = max(e.event_time for e in mine)
        expected = sum(2 ** (-(newest - e.event_time) / HALF_LIFE) for e in mine)
        assert st.popularity_total == len(mine)
        assert st.popularity_time == newest
        assert math.isclose(st.popularity_decayed, expected, rel_tol=1e-9)
        a, b = st.feature_row(iid), other[iid].feature_row(iid)
        assert math.isclose(a.pop("popularity_decayed"), b.pop("popularity_decayed"), rel_tol=1e-9)
        assert math.isclose(a.pop("mean_rating"), b.pop("mean_rating"), rel_tol=1e-12)
        assert a == b


def test_redelivery_and_duplicates_are_not_counted_twice():
    events = _events(100, users=2)
    states = _users(events)
    before = {uid: _row(s, uid) for uid, s in states.items()}
    for ev in events:  # a crash replay: same records, same positions
        assert states[ev.user_id].apply(ev) is Verdict.REDELIVERED
    for ev in events:  # a producer re-sending its log: same ids, new positions
        moved = ev._replace(source="c9", offset=ev.offset + 10_000)
        assert states[ev.user_id].apply(moved) is Verdict.DUPLICATE
    assert {uid: _row(s, uid) for uid, s in states.items()} == before


def test_dedupe_memory_survives_serialization_and_is_bounded():
    events = _events(200, users=1)
    st = UserState()
    for ev in events:
        st.apply(ev, dedupe_ids=50)
    assert len(st.seen) <= 50 + 50 // 4
    restored = UserState.loads(st.dumps())  # a restart: state comes back from the changelog
    assert restored == st
    assert restored.apply(events[-1], dedupe_ids=50) is Verdict.REDELIVERED
    assert restored.apply(events[0], dedupe_ids=50) is Verdict.REDELIVERED  # by offset: nothing forgotten
    # the same event from another record after the memory forgot its id: older than the floor ->
    # skipped as late, never double counted
    e = events[0]
    again = e._replace(source="c9", offset=10_000)
    assert restored.apply(again, dedupe_ids=50) is Verdict.LATE
    assert restored.click_count + restored.rating_count == 200


def test_redelivery_is_judged_per_source_partition():
    st = UserState()
    t = 1_700_000_000.0
    assert st.apply(Interaction("u", "i1", None, t, "a", source="c2", offset=7)) is Verdict.NEW
    # another source partition's offsets are independent: offset 3 of r2 is new
    assert st.apply(Interaction("u", "i2", 4.0, t + 1, "b", source="r2", offset=3)) is Verdict.NEW
    assert st.apply(Interaction("u", "i1", None, t, "a", source="c2", offset=7)) is Verdict.REDELIVERED
    # a duplicate moves the mark too: replaying it later is a redelivery, not a second duplicate count
    assert st.apply(Interaction("u", "i2", 4.0, t + 1, "b", source="r2", offset=9)) is Verdict.DUPLICATE
    assert st.apply(Interaction("u", "i2", 4.0, t + 1, "b", source="r2", offset=9)) is Verdict.REDELIVERED
    assert (st.click_count, st.rating_count, st.hw) == (1, 1, {"c2": 7, "r2": 9})


def test_item_replay_by_source_offset():
    st = ItemState()
    d = [ItemDelta("i", CLICK, None, 100.0 + k, "c1", k) for k in range(5)]
    assert all(st.apply(x, half_life_s=HALF_LIFE) for x in d)
    assert not any(st.apply(x, half_life_s=HALF_LIFE) for x in d[2:])  # re-forwarded after a crash
    assert st.apply(ItemDelta("i", RATING, 5.0, 99.0, "r1", 0), half_life_s=HALF_LIFE)  # other source: applied
    assert (st.click_count, st.rating_count, st.popularity_total, st.last_event_time) == (5, 1, 6, 104.0)
    assert ItemState.loads(st.dumps()) == st


def test_genre_profile():
    genres = {"a": ["Drama", "Comedy"], "b": ["Drama"], "c": [], "d": None}
    prof = genre_profile(["a", "b", "c", "d", "zzz"], genres.get)
    assert prof == {"Drama": 0.75, "Comedy": 0.25}
    assert genre_profile([], genres.get) == {}
    many = {f"i{k}": [f"g{k}"] for k in range(10)}
    assert len(genre_profile(list(many), many.get)) == 5
    row = UserState().feature_row("u", lambda i: genre_weights(genres.get(i)))
    assert json.loads(row["recent_items"]) == [] and json.loads(row["genre_profile"]) == {}


@pytest.mark.parametrize("limit", [1, 3])
def test_recent_items_top_n_by_newest_time(limit):
    events = _events(150, users=1, items=10)
    st = _users(events, recent_items=limit)["u0"]
    newest: dict[str, float] = {}
    for e in events:
        newest[e.item_id] = max(newest.get(e.item_id, 0), e.event_time)
    expected = [i for i, _ in sorted(newest.items(), key=lambda kv: (-kv[1], kv[0]))][:limit]
    assert st.recent_item_ids == expected


def test_forward_wire_format_is_unchanged():
    """What goes to the item stage (and may be in flight across an upgrade) keeps its list form."""
    from driftrec.streams.state import forward_record

    click = Interaction("u", "i1", None, 100.5, "e1", "movies", "req", "c3", 17)
    rating = Interaction("u", "i2", 4.0, 101.0, "e2", None, None, "r0", 2)
    assert forward_record(click) == ["i1", "click", None, 100.5, "c3", 17]
    assert forward_record(rating) == ["i2", "rating", 4.0, 101.0, "r0", 2]
    for ev in (click, rating):
        assert ItemDelta.of(ev).to_list() == forward_record(ev)
        assert ItemDelta.from_list(json.loads(json.dumps(forward_record(ev)))) == ItemDelta.of(ev)
