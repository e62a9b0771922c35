"""The synthetic world's shift kinds (driftrec/world.py): determinism, backward compatibility, the rules."""

from __future__ import annotations

from collections import defaultdict

import pytest

from driftrec.model.evaluation.world import World

KW = dict(n_users=30, n_items=64, seed=5, shift_at=300)


def _wire(events):
    return [e.asdict() for e in events]


def _genre_share(world: World, events, rule, start: int) -> float:
    """Share of interactions from ``start`` on whose item has a genre in ``rule(user, previous item)``."""
    items = {it.item_id: it for it in world.items}
    last: dict[str, object] = {}
    hit = total = 0
    for n, e in enumerate(events):
        prev = last.get(e.user_id)
        if n >= start and prev is not None:
            total += 1
            hit += bool(set(items[e.item_id].genres) & rule(int(e.user_id[1:]), prev))
        last[e.user_id] = items[e.item_id]
    return hit / total


def test_shift_map_is_one_cycle_derangement():
    w = World(**KW)
    assert sorted(w.shift_map) == sorted(w.shift_map.values())
    assert all(g != h for g, h in w.shift_map.items())
    g, seen = next(iter(w.shift_map)), []
    while g not in seen:
        seen.append(g)
        g = w.shift_map[g]
    assert len(seen) == len(w.shift_map)  # one cycle: the next genre is never one of the last few


def test_deterministic_and_shift_kinds_share_the_pre_shift_stream():
    a = _wire(World(**KW, shift_kind="relation").events(600))
    assert a == _wire(World(**KW, shift_kind="relation").events(600))
    assert a != _wire(World(**KW, shift_kind="relation").events(600, seed=99))
    taste = _wire(World(**KW).events(600))  # the default kind stays "taste" (backward compatible)
    assert taste[:300] == a[:300] and taste[300:] != a[300:]
    assert _wire(World(**{**KW, "shift_at": None}).events(600))[:300] == a[:300]


def test_relation_shift_follows_the_newest_item_not_the_taste():
    w = World(n_users=40, n_items=96, seed=3, shift_at=1000, shift_kind="relation")
    events = list(w.events(4000))
    taste = lambda u, prev: {g for g, v in w.tastes[u].items() if v > 0}  # noqa: E731
    like_last = lambda u, prev: set(prev.genres)  # noqa: E731
    mapped_last = lambda u, prev: {w.shift_map[g] for g in prev.genres}  # noqa: E731
    before = World(n_users=40, n_items=96, seed=3, shift_at=None)
    pre = list(before.events(4000))
    # Before the shift (and without one) users pick items of their taste, like their history.
    assert _genre_share(before, pre, taste, 1000) > 0.8 and _genre_share(before, pre, like_last, 1000) > 0.5
    # After it the next item comes from the mapped genres of the newest item; the old rules stop working.
    assert _genre_share(w, events, mapped_last, 1000) > 0.8
    assert _genre_share(w, events, like_last, 1000) < 0.35
    assert _genre_share(w, events, taste, 1000) < 0.5


def test_taste_shift_moves_tastes_so_history_similarity_comes_back():
    w = World(n_users=40, n_items=96, seed=3, shift_at=1000)
    events = list(w.events(4000))
    shifted = lambda u, prev: {g for g, v in w.shifted_tastes[u].items() if v > 0}  # noqa: E731
    like_last = lambda u, prev: set(prev.genres)  # noqa: E731
    assert _genre_share(w, events, shifted, 1000) > 0.8
    assert _genre_share(w, events, like_last, 3000) > 0.5  # covariate shift only: "like my history" is back


def test_relevant_and_taste_after_a_relation_shift():
    w = World(**KW, shift_kind="relation")
    item = next(it for it in w.items if len(it.genres) == 2)
    main, extra = item.genres
    assert w.taste(0, 10, item) == w.tastes[0]  # before the shift the newest item does not matter
    assert w.taste(0, 400, item) == {w.shift_map[main]: 3.0, w.shift_map[extra]: 2.0}
    assert w.taste(0, 400) == w.shifted_tastes[0]  # no newest item: the mapped stable taste
    rel = w.relevant(0, 400, item)
    assert rel and all(set(it.genres) & {w.shift_map[main], w.shift_map[extra]}
                       for it in w.items if it.item_id in rel)


def test_unknown_shift_kind_is_refused():
    with pytest.raises(ValueError, match="shift_kind"):
        World(n_users=2, n_items=8, shift_kind="sideways")


def test_ratings_follow_the_relation_after_the_shift():
    w = World(n_users=40, n_items=96, seed=4, shift_at=500, shift_kind="relation")
    items = {it.item_id: it for it in w.items}
    last: dict[str, object] = {}
    by_match: dict[bool, list[float]] = defaultdict(list)
    for n, e in enumerate(w.events(3000)):
        prev = last.get(e.user_id)
        if n >= 500 and prev is not None and hasattr(e, "rating"):
            by_match[bool(set(items[e.item_id].genres) & {w.shift_map[g] for g in prev.genres})].append(e.rating)
        last[e.user_id] = items[e.item_id]
    mean = {k: sum(v) / len(v) for k, v in by_match.items()}
    assert mean[True] > mean[False] + 1.5


def test_drift_experiment_cli_uses_the_relation_shift_by_default(tmp_path):
    import json

    from driftrec.model.evaluation.drift_experiment import experiment_main

    out = tmp_path / "drift.json"
    assert experiment_main(["drift", "--quick", "--post-events", "200", "--json", str(out),
                            "--report", str(tmp_path / "report")]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["shift_kind"] == "relation"
    assert {"recovery_events_with_updates", "recovery_events_frozen", "pre_shift_hr_frozen"} <= set(result)
    assert (tmp_path / "report" / "drift_experiment.md").exists()
    assert "relation" in (tmp_path / "report" / "drift_experiment.md").read_text()
