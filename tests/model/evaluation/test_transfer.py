"""The cross-domain transfer experiment (model/transfer.py) and the world's vocabulary option."""

from __future__ import annotations

import json

import pytest

from driftrec.model.evaluation.world import BOOK_NOUNS, BOOK_TAGS, BOOK_TITLE_WORDS, GENRES, NOUNS, TAGS, World
from driftrec.model.evaluation.transfer import ARMS, TransferConfig, make_worlds, transfer_main


def test_world_vocabulary_option_keeps_the_default_and_shares_the_genres():
    plain = World(n_users=10, n_items=24, seed=5)
    explicit = World(n_users=10, n_items=24, seed=5, title_words=GENRES, nouns=NOUNS, tags=TAGS)
    assert [(i.item_id, i.title, i.genres, i.tags, i.year) for i in plain.items] == \
        [(i.item_id, i.title, i.genres, i.tags, i.year) for i in explicit.items]
    assert plain.items[0].item_id == "m0"  # ids of the default domain are unchanged
    warm, new = make_worlds(TransferConfig(warm_users=10, new_users=10, items=24))
    assert {g for it in warm.items for g in it.genres} == {g for it in new.items for g in it.genres} == set(GENRES)
    book_words = {w for ws in BOOK_TITLE_WORDS.values() for w in ws} | set(BOOK_NOUNS)
    movie_words = {w for ws in GENRES.values() for w in ws} | set(NOUNS)
    assert not book_words & movie_words
    for it in new.items:
        assert it.item_id.startswith("books-") and it.domain == "books"
        assert set(it.title.split()[:2]) <= book_words | {str(n) for n in range(2, 5)}
        assert it.tags == BOOK_TAGS[it.genres[0]]
    assert not {it.item_id for it in warm.items} & {it.item_id for it in new.items}
    with pytest.raises(ValueError, match="vocabulary"):
        World(n_users=2, n_items=4, title_words={"space": ["Star"]})


def test_transfer_experiment_smoke(tmp_path):
    out = tmp_path / "transfer.json"
    rc = transfer_main([
        "transfer", "--quick", "--json", str(out), "--report", str(tmp_path / "report"),
        "--warm-events", "120", "--items", "24", "--test-events", "60", "--curve", "10,20", "--new-events", "20",
    ])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["experiment"] == "transfer"
    assert result["new_domain"]["seeded_from"] == "from-movies-v1"
    assert set(result["results"]) == set(ARMS)
    for arm in ARMS:
        r = result["results"][arm]
        assert 0.0 <= r["hr@10"] <= 1.0 and 0.0 <= r["ndcg@10"] <= r["hr@10"] + 1e-9
        assert r["n"] == result["new_domain"]["test_cases"] > 0
    assert [p["events"] for p in result["curve"]] == [10, 20]
    assert all(p["scratch"]["steps"] == p["transfer"]["steps"] >= 1 for p in result["curve"])
    for name in ("transfer_experiment.md", "transfer_experiment.png", "transfer_curve.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    md = (tmp_path / "report" / "transfer_experiment.md").read_text()
    assert "warm-domain adapter, fine-tuned" in md and "Run time" in md
