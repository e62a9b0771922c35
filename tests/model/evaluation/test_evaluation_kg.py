"""prequential-v1 with a knowledge graph (`driftrec evaluate --kg`), and the cold-item metrics."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from driftrec.core.interactions import Interaction
from driftrec.model.evaluation.movielens import RatingLog, make_item
from driftrec.model.evaluation.prequential import EvalConfig, evaluate, evaluate_main, kg_gate, permuted_links
from driftrec.model.knowledge.graph import load_kg
from tests.model.evaluation.test_evaluation import GENRES, L3, tiny_log, write_ml100k


# ------------------------------------------------------------------------------- cold items


def test_cold_metrics_by_hand():
    # tiny_log's evaluated positives with the target's positives before the event (re-ratings count):
    #   p2 u3 i2 (0)  p4 u2 i3 (0)  p5 u3 i1 (2: p0, p1)  p6 u1 i3 (1: p4)  p8 u3 i5 (0)
    # popularity's HR@2 / NDCG@2 there (test_prequential_by_hand_popularity): 1/4, 1/3, 1, 1, 1/2.
    res = evaluate(tiny_log(), EvalConfig(every=1, k=2, use_lm=False, baselines=(), cold_threshold=2), progress=False)
    cold = res["cold"]
    assert cold["threshold"] == 2 and cold["evaluations"] == 4  # all but p5
    assert cold["popularity"]["hr@2"] == pytest.approx((1 / 4 + 1 / 3 + 1 + 1 / 2) / 4)
    assert cold["popularity"]["ndcg@2"] == pytest.approx((L3 / 4 + L3 / 3 + 1 + L3 / 2) / 4)
    assert set(cold) >= {"driftrec", "popularity", "decayed_popularity", "itemknn"}
    assert cold["evaluations_new_item"] == 3  # i2 at p2, i3 at p4, i5 at p8 had no interaction yet
    one = evaluate(tiny_log(), EvalConfig(every=1, k=2, use_lm=False, baselines=(), cold_threshold=1), progress=False)["cold"]
    assert one["evaluations"] == 3  # p6's i3 had one positive before
    assert one["popularity"]["hr@2"] == pytest.approx((1 / 4 + 1 / 3 + 1 / 2) / 3)
    # every item is cold below a threshold above any count: the cold metrics are the overall ones
    every = evaluate(tiny_log(), EvalConfig(every=1, k=2, use_lm=False, baselines=(), cold_threshold=100), progress=False)
    assert every["cold"]["evaluations"] == every["evaluations"] == 5
    for n in every["results"]:
        overall = {m: every["results"][n][m] for m in ("hr@2", "ndcg@2")}
        assert every["cold"][n] == pytest.approx(overall)
        assert every["results"][n]["cold"]["count"] == 5
        assert every["results"][n]["cold"]["hr@2"] == pytest.approx(overall["hr@2"])


def test_never_interacted_items_are_ranked():
    """An item nobody has touched is still scored from its catalogue side (genre, year...), so the
    system can put it in the top-k: cold HR is not zero by construction."""
    items = {"a": make_item("a", "Alpha", ["Horror"], 1990), "b": make_item("b", "Beta", ["Horror"], 1991),
             "c": make_item("c", "Gamma", ["Comedy"], 1960), "d": make_item("d", "Delta", ["Comedy"], 1961),
             "new": make_item("new", "Fresh", ["Horror"], 1992)}
    rows = [("u1", "a", 5), ("u1", "b", 5), ("u2", "c", 5), ("u2", "d", 5), ("u3", "a", 5), ("u3", "b", 5),
            ("u4", "c", 5), ("u4", "d", 5), ("u3", "new", 5)]
    events = [Interaction(u, i, float(r), float(t)) for t, (u, i, r) in enumerate(rows)]
    log_ = RatingLog(events, items, "test", "tiny")
    res = evaluate(log_, EvalConfig(every=1, k=2, use_lm=False, baselines=(), warmup_frac=0.5), progress=False)
    assert res["cold"]["evaluations_new_item"] == 1  # "new" at the last event, among c, d and new for u3
    assert res["cold"]["new_item"]["driftrec"]["hr@2"] > 0
    assert res["cold"]["driftrec_topk_new_items"] > 0


# ------------------------------------------------------------------------- KG fixtures

N_CLUSTERS, PER_CLUSTER = 8, 6


def clustered_world(seed: int = 0, n_users: int = 80, per_user: int = 9):
    """Films in clusters that share a director (and so are liked together); genres are random, so
    the catalogue alone does not reveal the clusters but the graph does."""
    rng = random.Random(seed)
    items = []
    for c in range(N_CLUSTERS):
        for k in range(PER_CLUSTER):
            n = c * PER_CLUSTER + k + 1
            items.append((str(n), f"Film {n}", 1970 + n, [GENRES[rng.randint(1, len(GENRES) - 1)]]))
    events, t = [], 880000000
    for u in range(1, n_users + 1):
        c = rng.randrange(N_CLUSTERS)
        mine = [str(c * PER_CLUSTER + k + 1) for k in range(PER_CLUSTER)]
        for i in rng.sample(mine, 5) + rng.sample([it[0] for it in items if it[0] not in mine], per_user - 5):
            t += 60
            events.append((str(u), i, 5 if i in mine else 2, t))
    rng.shuffle(events)  # users interleaved in time
    events = [(u, i, r, 880000000 + 60 * n) for n, (u, i, r, _) in enumerate(events)]
    return items, events


def kg_triples(items):
    triples = []
    for iid, _, year, _ in items:
        c = (int(iid) - 1) // PER_CLUSTER
        triples.append((f"m.{iid}", "film.film.directed_by", f"m.dir{c}"))
        triples.append((f"m.{iid}", "film.film.language", "m.english"))
    return triples


def write_recbole_kg(folder: Path, items) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "toy.kg").write_text("head_id:token\trelation_id:token\ttail_id:token\n"
                                   + "".join(f"{h}\t{r}\t{t}\n" for h, r, t in kg_triples(items)))
    (folder / "toy.link").write_text("item_id:token\tentity_id:token\n"
                                     + "".join(f"{iid}\tm.{iid}\n" for iid, *_ in items))
    return folder


def write_tsv_kg(folder: Path, items) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    triples, links = folder / "triples.tsv", folder / "links.tsv"
    triples.write_text("head\trelation\ttail\n" + "".join(f"{h}\t{r}\t{t}\n" for h, r, t in kg_triples(items)))
    links.write_text("".join(f"{iid}\tm.{iid}\n" for iid, *_ in items))
    return triples, links


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("kgworld")
    items, events = clustered_world()
    write_ml100k(root / "data", items, events)
    rec = write_recbole_kg(root / "kg_recbole", items)
    triples, links = write_tsv_kg(root / "kg_tsv", items)
    return {"root": root, "data": root / "data", "recbole": rec, "triples": triples, "links": links,
            "items": items}


def _run(world, tmp_path, name, *extra):
    out = tmp_path / f"{name}.json"
    rc = evaluate_main(["--data", str(world["data"]), "--format", "ml-100k", "--every", "1", "--no-lm", "--baselines", "", "--quiet",
                        "--json", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_evaluate_with_kg_both_formats(world, tmp_path, capsys):
    base = _run(world, tmp_path, "base")
    assert "kg" not in base and "kg" not in base["system"]["features"]
    rec = _run(world, tmp_path, "recbole", "--kg", str(world["recbole"]), "--kg-gate", "force")
    tsv = _run(world, tmp_path, "tsv", "--kg", str(world["triples"]), "--kg-link", str(world["links"]),
               "--kg-format", "tsv", "--kg-gate", "force")
    for res in (rec, tsv):
        info = res["kg"]
        assert info["used"] and info["gate"]["mode"] == "force"
        assert info["stats"]["items_linked"] == N_CLUSTERS * PER_CLUSTER
        assert info["alpha"] == EvalConfig.kg_alpha and info["alpha_effective"] == 0.0  # --no-lm: no model to train
        assert res["system"]["features"][-2:] == ["kg", "kg_cold"]
        assert set(res["cold"]) >= {"driftrec", "itemknn", "popularity", "decayed_popularity", "evaluations"}
    assert rec["kg"]["report"].startswith(f"{2 * N_CLUSTERS * PER_CLUSTER} triples kept")
    # the same graph in either format gives the same replay
    assert rec["results"] == tsv["results"] and rec["cold"] == tsv["cold"]
    assert rec["results"] != base["results"]  # the KG features took part in the ranking
    assert "knowledge graph: used" in capsys.readouterr().out


def test_kg_cli_errors(world, tmp_path, capsys):
    args = ["--data", str(world["data"]), "--no-lm", "--baselines", "", "--quiet"]
    assert evaluate_main(args + ["--kg", str(tmp_path / "nope")]) == 2
    assert "error:" in capsys.readouterr().err
    assert evaluate_main(args + ["--kg-link", str(world["links"])]) == 2
    assert evaluate_main(args + ["--kg", str(world["recbole"]), "--kg-alpha", "-1"]) == 2


def test_gate_opens_for_an_aligned_graph_and_closes_for_misaligned_links(world):
    from driftrec.model.evaluation.movielens import load

    log_ = load(world["data"], "ml-100k")
    cfg = EvalConfig(use_lm=False, baselines=(), kg_gate_k=5, warmup_frac=0.4)
    kg = load_kg(world["recbole"], item_ids=list(log_.items))
    warm = log_.events[: int(cfg.warmup_frac * len(log_.events))]
    good = kg_gate(warm, kg, list(log_.items), cfg)
    assert good["open"] and good["z"] >= 2 and good["hr@5"] > good["hr@5_shuffled_links"]
    # a link file keyed by another catalogue's ids: the graph says nothing about these items
    bad = kg_gate(warm, permuted_links(kg, seed=1), list(log_.items), cfg)
    assert not bad["open"]
    # evaluate: a closed gate leaves the system exactly as without the KG; an open one uses it
    base = evaluate(log_, cfg, progress=False)
    closed = evaluate(log_, cfg, progress=False, kg=permuted_links(kg, seed=1))
    assert not closed["kg"]["used"] and closed["results"] == base["results"] and closed["cold"] == base["cold"]
    opened = evaluate(log_, cfg, progress=False, kg=kg)
    assert opened["kg"]["used"] and opened["kg"]["gate"]["open"]
    assert opened["results"]["driftrec"]["hr@10"] >= base["results"]["driftrec"]["hr@10"]


def test_kg_alpha_trains_the_knowledge_model_with_the_kg_loss(world, tmp_path):
    """--kg-alpha > 0: the knowledge model's fits optimise L_rec + alpha * L_KG; every arm is reported on
    the same points (ablations without the LM and without the KG, the model alone, SASRec)."""
    res = _run_lm(world, tmp_path)
    info = res["kg"]
    assert info["used"] and info["alpha_effective"] == 0.5
    fits = res["system"]["lm"]["fits"]
    assert len(fits) >= 2 and all(f["kg_loss"] > 0 for f in fits)
    assert set(res["results"]) == {"driftrec", "lm_only", "sasrec", "popularity", "decayed_popularity", "itemknn"}
    assert set(res["ablations"]) == {"no_lm", "no_kg"}
    assert {f["arm"] for f in res["fits"]} == {"driftrec", "no_lm", "no_kg", "sasrec"}
    no_kg_fits = [f for f in res["fits"] if f["arm"] == "no_kg"]
    assert all(f["kg_loss"] is None for f in no_kg_fits)  # no graph, no graph loss
    for block in list(res["results"].values()) + list(res["ablations"].values()):
        cold = block["cold"]
        assert cold["count"] == res["cold"]["evaluations"]
        assert cold["never_interacted"]["count"] == res["cold"]["evaluations_new_item"]
    assert res["system"]["features"][-4:] == ["km", "km_rank", "kg", "kg_cold"]


def _run_lm(world, tmp_path):
    out = tmp_path / "lm.json"
    rc = evaluate_main(["--data", str(world["data"]), "--every", "5", "--quiet", "--json", str(out),
                        "--kg", str(world["recbole"]), "--kg-gate", "force", "--kg-alpha", "0.5",
                        "--model-set", "init_epochs=2", "--model-set", "epochs=1", "--model-set", "dim=16",
                        "--lm-update-every", "150", "--limit", "400", "--threads", "1"])
    assert rc == 0
    return json.loads(out.read_text())
