"""Parity: the worker serves exactly what ``driftrec evaluate`` measures.

A real embedded Tansu broker, a real ``driftrec worker`` subprocess with ``ranking.engine=policy``
(``DRIFTREC_RANKING__ENGINE=policy``), real Feast (the worker's features stage) and a real knowledge
model forward on both sides. The log is the synthetic world written as ml-100k files and loaded by the
MovieLens loader; the knowledge model is trained in process on the warm-up prefix (dim 16, 2 epochs),
published into the worker's adapter folder and loaded back verified, and the replay runs with that same
fixed model (no refit in the window). The driver (:mod:`driftrec.through_stream`) produces the catalogue,
then the events on single-partition topics; at every evaluation point (the replay's own, recorded by
its ``on_evaluation`` hook) it waits until the worker has observed every event produced so far
(``driftrec_ranking_observed_total``), asks for a recommendation timed at the event, and only then
produces the event.

Remaining non-determinism: none by design - both sides run the same policy code on the same events
in the same order with the same model weights and the same seed. What could still differ is floating
point below the last bits: the worker computes the LM text vectors and the model's scores in another
process, whose BLAS/torch kernels may split sums differently (thread count); a flip then needs two items
whose fused scores agree to ~1e-15. The test allows 1% of lists for that.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from driftrec.core.contracts import Click
from driftrec.model.evaluation.movielens import load
from driftrec.model.evaluation.prequential import EvalConfig
from driftrec.model.evaluation.world import GENRES, World

pytestmark = pytest.mark.slow


def write_world_ml100k(folder: Path, world: World, n_events: int) -> None:
    """The world's catalogue and ``n_events`` interactions as ml-100k files (a click is a rating of 4)."""
    genres = list(GENRES)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.genre").write_text("".join(f"{g}|{j}\n" for j, g in enumerate(genres)) + "\n")
    lines = []
    for it in world.items:
        flags = ["1" if g in it.genres else "0" for g in genres]
        lines.append("|".join([it.item_id, f"{it.title} ({it.year})", f"01-Jan-{it.year}", "", "http://x"] + flags))
    (folder / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
    rows = []
    for ev in world.events(n_events):
        rating = 4 if isinstance(ev, Click) else int(ev.rating)
        rows.append(f"{ev.user_id}\t{ev.item_id}\t{rating}\t{int(ev.event_time)}\n")
    (folder / "u.data").write_text("".join(rows))


def write_world_kg(folder: Path, world: World) -> Path:
    """A RecBole-style graph of the world's items (genre and decade entities), linked by item id."""
    folder.mkdir(parents=True, exist_ok=True)
    triples = []
    for it in world.items:
        triples += [(f"m.{it.item_id}", "film.film.genre", f"g.{g}") for g in it.genres]
        triples.append((f"m.{it.item_id}", "film.film.decade", f"d.{it.year // 10}"))
    (folder / "world.kg").write_text("head_id:token\trelation_id:token\ttail_id:token\n"
                                     + "".join(f"{h}\t{r}\t{t}\n" for h, r, t in triples))
    (folder / "world.link").write_text("item_id:token\tentity_id:token\n"
                                       + "".join(f"{it.item_id}\tm.{it.item_id}\n" for it in world.items))
    return folder


@pytest.mark.parametrize("with_kg", [False, True], ids=["no-graph", "graph"])
def test_worker_serves_what_the_replay_measures(tmp_path, with_kg):
    """With a graph the worker is given ``ranking.kg_path`` and the replay the same graph: the policy's
    graph features and the knowledge model's entity embeddings (trained with the TransE term) on both."""
    from driftrec.through_stream import run_through_stream

    world = World(n_users=80, n_items=120, seed=11)
    write_world_ml100k(tmp_path / "data", world, 2000)
    log_ = load(tmp_path / "data", "ml-100k")
    kg = str(write_world_kg(tmp_path / "kg", world)) if with_kg else None
    cfg = EvalConfig(every=3, use_lm=True, model={"dim": 16, "init_epochs": 2, "blocks": 1}, ablate=(),
                     baselines=(), corrector_lr=0.005, kg=kg)
    report = run_through_stream(log_, cfg, tmp_path / "run", timeout_s=60.0)
    print(json.dumps({k: v for k, v in report.items() if k != "mismatches"}, default=str))

    assert ("kg" in report["policy_features"]) == with_kg  # the graph's features rank on both sides
    n = report["evaluations"]
    assert 150 <= n <= 400, n
    assert report["fallbacks"] == 0
    assert report["model_version"] and report["served_model_versions"] == [report["model_version"]]
    share = report["identical_share"]
    assert share >= 0.99, (f"{report['identical']}/{n} identical lists; first mismatches: "
                           f"{report['mismatches'][:3]}")
    assert report["served"] == report["replay_lists"] or share < 1.0
    print(f"parity: {report['identical']}/{n} identical top-10 lists ({100 * share:.1f}%), "
          f"served HR@10 {report['served']['hr@10']:.4f} vs replay {report['replay']['hr@10']:.4f}, "
          f"seconds {report['seconds']}")
