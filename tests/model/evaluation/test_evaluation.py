"""Offline evaluation (prequential-v1) and the MovieLens loaders, on small generated logs only."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from driftrec.core.interactions import Interaction
from driftrec.model.evaluation.movielens import DataError, RatingLog, load, make_item, split_title
from driftrec.model.evaluation.prequential import EvalConfig, evaluate, evaluate_main
from driftrec.model.ranking.metrics import rank_metrics

L3 = 1.0 / math.log2(3)  # DCG weight of 0-based rank 1


# ---------------------------------------------------------------------------------- metrics


def test_rank_metrics_by_hand():
    scores = np.array([0.9, 0.5, 0.7, 0.1])
    assert rank_metrics(scores, 0, k=10) == (1.0, 1.0)
    hr, ndcg = rank_metrics(scores, 2, k=10)  # second place
    assert hr == 1.0 and ndcg == pytest.approx(L3)
    assert rank_metrics(scores, 1, k=2) == (0.0, 0.0)  # third place, outside top-2
    # ties: the target is uniformly placed among its tie group (ranks 1..3 here)
    hr, ndcg = rank_metrics(np.array([2.0, 1.0, 1.0, 1.0]), 1, k=2)
    assert hr == pytest.approx(1 / 3) and ndcg == pytest.approx(L3 / 3)


def test_ranking_excludes_seen_items():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    allowed = np.array([False, False, True, True, True])  # items 0 and 1 were seen
    assert rank_metrics(scores, 3, allowed, k=1) == (0.0, 0.0)
    assert rank_metrics(scores, 2, allowed, k=1) == (1.0, 1.0)
    hr, ndcg = rank_metrics(scores, 3, allowed, k=2)
    assert hr == 1.0 and ndcg == pytest.approx(L3)


def tiny_log() -> RatingLog:
    items = {f"i{n}": make_item(f"i{n}", f"Film {n}", ["Drama"], 1990 + n) for n in range(1, 6)}
    rows = [
        ("u1", "i1", 5), ("u2", "i1", 4),  # warm-up (first 20%)
        ("u3", "i2", 5), ("u1", "i2", 2), ("u2", "i3", 5), ("u3", "i1", 4), ("u1", "i3", 4),
        ("u2", "i1", 5),  # re-rating: not evaluated
        ("u3", "i5", 5), ("u1", "i4", 3),
    ]
    events = [Interaction(u, i, float(r), float(t)) for t, (u, i, r) in enumerate(rows)]
    return RatingLog(events, items, "test", "tiny")


def test_prequential_by_hand_popularity():
    # popularity before each evaluated positive (u, i), the unseen items and the target's rank:
    #   p2 u3 i2: counts i1=2, rest 0; i2 ties with i3,i4,i5 behind i1 -> ranks 1..4, HR@2 1/4, NDCG L3/4
    #   p4 u2 i3: allowed i2(2) i3 i4 i5 (0)               -> ranks 1..3, HR@2 1/3, NDCG L3/3
    #   p5 u3 i1: allowed i1(2) i3(1) i4 i5                -> rank 0,     HR 1,    NDCG 1
    #   p6 u1 i3: allowed i3(1) i4 i5                      -> rank 0,     HR 1,    NDCG 1
    #   p8 u3 i5: allowed i3(2) i4 i5 (0)                  -> ranks 1..2, HR@2 1/2, NDCG L3/2
    res = evaluate(tiny_log(), EvalConfig(every=1, k=2, use_lm=False, baselines=()), progress=False)
    assert res["protocol"] == "prequential-v1"
    assert res["evaluations"] == 5
    pop = res["results"]["popularity"]
    assert pop["hr@2"] == pytest.approx((1 / 4 + 1 / 3 + 1 + 1 + 1 / 2) / 5)
    assert pop["ndcg@2"] == pytest.approx((L3 / 4 + L3 / 3 + 1 + 1 + L3 / 2) / 5)
    assert set(res["results"]) == {"driftrec", "popularity", "decayed_popularity", "itemknn"}
    every2 = evaluate(tiny_log(), EvalConfig(every=2, k=2, use_lm=False, baselines=()), progress=False)
    assert every2["evaluations"] == 3  # positives #1, #3, #5: p2, p5, p8
    assert every2["results"]["popularity"]["hr@2"] == pytest.approx((1 / 4 + 1 + 1 / 2) / 3)


# ---------------------------------------------------------------------------- data formats

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
          "War", "Western"]


def synthetic(seed=0, n_users=40, n_items=15, n_events=400):
    rng = random.Random(seed)
    items = []
    for n in range(1, n_items + 1):
        g = sorted(rng.sample(range(1, len(GENRES)), rng.randint(1, 3)))
        items.append((str(n), f"Film {n}", 1980 + n, [GENRES[j] for j in g]))
    events, seen = [], set()
    while len(events) < n_events:
        u, i = str(rng.randint(1, n_users)), str(rng.randint(1, n_items))
        if (u, i) in seen:
            continue
        seen.add((u, i))
        # coarse timestamps so that ties exist and the stable sort matters
        events.append((u, i, rng.choice([1, 2, 3, 4, 5, 4, 5]), 880000000 + rng.randint(0, 300) * 60))
    return items, events


def write_ml100k(folder: Path, items, events):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.genre").write_text("".join(f"{g}|{j}\n" for j, g in enumerate(GENRES)) + "\n")
    lines = []
    for iid, title, year, genres in items:
        flags = ["1" if g in genres else "0" for g in GENRES]
        lines.append("|".join([iid, f"{title} ({year})", f"01-Jan-{year}", "", "http://x"] + flags))
    (folder / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in events))


def write_ml_latest(folder: Path, items, events):
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["movieId,title,genres"] + [f'{iid},"{title} ({year})",{"|".join(genres)}' for iid, title, year, genres in items]
    (folder / "movies.csv").write_text("\n".join(rows) + "\n")
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{float(r)},{t}\n" for u, i, r, t in events)
    )


def test_ml_latest_matches_ml100k(tmp_path):
    items, events = synthetic()
    write_ml100k(tmp_path / "a", items, events)
    write_ml_latest(tmp_path / "b", items, events)
    a, b = load(tmp_path / "a", "auto"), load(tmp_path / "b", "auto")
    assert (a.format, b.format) == ("ml-100k", "ml-latest")
    assert a.events == b.events
    assert [e.timestamp for e in a.events] == sorted(e.timestamp for e in a.events)
    # stable: equal timestamps keep file order
    order = {(u, i): n for n, (u, i, _, _) in enumerate(events)}
    for x, y in zip(a.events, a.events[1:]):
        if x.timestamp == y.timestamp:
            assert order[(x.user, x.item)] < order[(y.user, y.item)]
    assert {k: v.text() for k, v in a.items.items()} == {k: v.text() for k, v in b.items.items()}
    assert a.items["3"].year == 1983 and a.items["3"].title == "Film 3"
    cfg = EvalConfig(every=1, use_lm=False, baselines=())
    ra, rb = evaluate(a, cfg, progress=False), evaluate(b, cfg, progress=False)
    assert ra["evaluations"] == rb["evaluations"] > 0
    assert ra["results"] == rb["results"]


def test_split_title():
    assert split_title("Toy Story (1995)") == ("Toy Story", 1995)
    assert split_title("Usual Suspects, The (1995) ") == ("Usual Suspects, The", 1995)
    assert split_title("No year") == ("No year", None)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load(tmp_path / "nope")
    with pytest.raises(DataError, match="neither"):
        load(tmp_path)
    items, events = synthetic()
    write_ml100k(tmp_path / "a", items, events)
    (tmp_path / "a" / "u.item").unlink()
    with pytest.raises(DataError, match="missing data file .*u.item"):
        load(tmp_path / "a", "ml-100k")
    write_ml100k(tmp_path / "b", items, events)
    data = (tmp_path / "b" / "u.data").read_text().splitlines()
    data[2] = "1\t2\tfive\t880000000"
    (tmp_path / "b" / "u.data").write_text("\n".join(data) + "\n")
    with pytest.raises(DataError, match=r"u\.data:3: rating 'five'"):
        load(tmp_path / "b")
    write_ml_latest(tmp_path / "c", items, events)
    rows = (tmp_path / "c" / "ratings.csv").read_text().splitlines()
    rows[4] = "1,2,3.0"
    (tmp_path / "c" / "ratings.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"ratings\.csv:5: expected 4 fields"):
        load(tmp_path / "c", "ml-latest")
    with pytest.raises(DataError, match="unknown format"):
        load(tmp_path / "c", "csv")


# ------------------------------------------------------------------------------------- CLI


def test_evaluate_main_writes_json_and_report(tmp_path, capsys):
    items, events = synthetic(seed=3)
    write_ml_latest(tmp_path / "data", items, events)
    out = tmp_path / "r.json"
    rc = evaluate_main(["--data", str(tmp_path / "data"), "--every", "2", "--no-lm", "--baselines", "", "--quiet",
                        "--json", str(out), "--report", str(tmp_path / "rep"), "--limit", "300"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["protocol"] == "prequential-v1" and res["evaluations"] > 0
    assert res["config"]["events"] == 300 and res["config"]["every"] == 2
    for name in ("driftrec", "popularity", "decayed_popularity", "itemknn"):
        assert set(res["results"][name]) == {"hr@10", "ndcg@10", "cold"}
        assert set(res["results"][name]["cold"]) == {"hr@10", "ndcg@10", "count", "never_interacted"}
    assert res["windows"] and "driftrec" in res["windows"][0]
    assert (tmp_path / "rep" / "report.md").read_text().startswith("# driftrec evaluation")
    assert (tmp_path / "rep" / "hr_over_time.png").stat().st_size > 0
    assert "driftrec" in capsys.readouterr().out
    assert evaluate_main(["--data", str(tmp_path / "missing"), "--quiet"]) == 2
