"""Knowledge-graph fusion: loading, IDF neighbours and explanations, the KG candidate source, the TransE loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tests.model.ranking.test_candidates as contract
from driftrec.model.ranking.sources import CandidateSource
from driftrec.model.knowledge.graph import KGError, KnowledgeGraph, load_kg, relation_label
from driftrec.model.knowledge.candidates import KGCandidates
from driftrec.model.knowledge.loss import KGLoss, combined_loss, kg_alpha

# A toy film graph. Films f1..f6 are catalogue items 1..6 (item 7 has no entity).
# f1, f2 share director d1; f3, f4 share director d2; everything is in English; f1, f5 share actor a1;
# f6 is the sequel of f5.
TRIPLES = [
    ("f1", "film.film.directed_by", "d1"),
    ("f2", "film.film.directed_by", "d1"),
    ("f3", "film.film.directed_by", "d2"),
    ("d2", "film.director.film", "f4"),  # the inverse direction, as ml-100k-kg also holds
    ("f1", "film.film.actor", "a1"),
    ("f5", "film.film.actor", "a1"),
    ("f2", "film.film.actor", "a2"),
    ("f5", "film.film.sequel", "f6"),
    ("g1", "film.film_genre.films_in_this_genre", "f3"),
    ("g1", "film.film_genre.films_in_this_genre", "f6"),
] + [(f"f{n}", "film.film.language", "english") for n in range(1, 7)]
LINKS = {str(n): f"f{n}" for n in range(1, 7)}
TITLES = {"1": "Alpha", "2": "Beta", "3": "Gamma", "4": "Delta", "5": "Epsilon", "6": "Epsilon II", "7": "Zeta"}


def write_recbole(folder, triples=TRIPLES, links=LINKS, extra_kg=(), extra_link=()):
    folder.mkdir(parents=True, exist_ok=True)
    kg = ["head_id:token\trelation_id:token\ttail_id:token"] + ["\t".join(t) for t in triples] + list(extra_kg)
    (folder / "toy.kg").write_text("\n".join(kg) + "\n")
    ln = ["item_id:token\tentity_id:token"] + [f"{i}\t{e}" for i, e in links.items()] + list(extra_link)
    (folder / "toy.link").write_text("\n".join(ln) + "\n")
    return folder


def toy_kg() -> KnowledgeGraph:
    return KnowledgeGraph(TRIPLES, LINKS, titles=TITLES)


# ------------------------------------------------------------------------------------ loading


def test_recbole_format(tmp_path):
    kg = load_kg(write_recbole(tmp_path / "kg"), item_ids=TITLES)
    r = kg.report
    assert r.format == "recbole"
    assert r.lines_read == r.triples_kept == len(TRIPLES)
    assert r.malformed == r.duplicates == 0
    assert (r.links_kept, r.items_linked, r.items_not_linked) == (6, 6, 1)
    assert kg.entity_of("1") == "f1" and kg.items_of("f2") == ["2"]
    assert kg.n_relations == len({t[1] for t in TRIPLES})
    assert sorted(kg.item_ids) == ["1", "2", "3", "4", "5", "6"]


def test_recbole_header_columns_found_by_name(tmp_path):
    (tmp_path / "x.kg").write_text("tail_id:token\thead_id:token\trelation_id:token\nd1\tf1\tfilm.film.directed_by\n"
                                   "d1\tf2\tfilm.film.directed_by\n")
    (tmp_path / "x.link").write_text("entity_id:token\titem_id:token\nf1\t1\nf2\t2\n")
    kg = load_kg(tmp_path)
    assert kg.explain("1", "2") == "same director as item 1"


def test_plain_tsv_with_and_without_header(tmp_path):
    body = "\n".join("\t".join(t) for t in TRIPLES) + "\n"
    (tmp_path / "a.tsv").write_text(body)
    (tmp_path / "b.tsv").write_text("head\trelation\ttail\n" + body)
    (tmp_path / "links.tsv").write_text("".join(f"{i}\t{e}\n" for i, e in LINKS.items()))
    a = load_kg(tmp_path / "a.tsv", tmp_path / "links.tsv")
    b = load_kg(tmp_path / "b.tsv", tmp_path / "links.tsv", fmt="tsv")
    assert a.report.format == b.report.format == "tsv"
    assert a.report.triples_kept == b.report.triples_kept == len(TRIPLES)
    assert a.report.lines_read == b.report.lines_read == len(TRIPLES)  # the header is not a line of data
    assert [n.item for n in a.neighbours("1")] == [n.item for n in b.neighbours("1")]


def test_plain_tsv_without_links_uses_entity_ids_as_items(tmp_path):
    (tmp_path / "t.tsv").write_text("m1\tdirected_by\tbob\nm2\tdirected_by\tbob\nm3\tdirected_by\tann\n")
    kg = load_kg(tmp_path / "t.tsv", item_ids=["m1", "m2", "m3", "m9"])
    assert kg.report.items_linked == 3 and kg.report.items_not_linked == 1
    assert [n.item for n in kg.neighbours("m1")] == ["m2"]
    assert kg.explain("m1", "m2") == "same director as item m1"


def test_malformed_lines_counted_with_line_numbers(tmp_path):
    folder = write_recbole(
        tmp_path / "kg",
        extra_kg=["f7\tfilm.film.actor", "f7\t\ta1", "", "f1\tfilm.film.directed_by\td1", "a\tb\tc\td"],
    )
    kg = load_kg(folder)
    r = kg.report
    n = len(TRIPLES)
    # data lines: n good, then 2 malformed (lines n+2, n+3), one blank, one duplicate, one malformed (n+6)
    assert r.lines_read == n + 4
    assert r.blank_lines == 1
    assert r.malformed == 3 and r.duplicates == 1
    assert r.triples_kept == n
    assert r.malformed_lines("toy.kg") == [n + 2, n + 3, n + 6]
    assert all(p.endswith("toy.kg") for p, _, _ in r.errors)
    assert "wrong" not in r.summary() and "3 malformed" in r.summary()
    assert any(e.startswith(str(folder / "toy.kg") + f":{n + 2}: expected 3") for e in r.as_dict()["errors"])


def test_strict_mode_raises_on_first_malformed_line(tmp_path):
    folder = write_recbole(tmp_path / "kg", extra_kg=["f7\tfilm.film.actor", "x\t\ty"])
    with pytest.raises(KGError, match=rf"toy\.kg:{len(TRIPLES) + 2}: expected 3"):
        load_kg(folder, strict=True)
    folder = write_recbole(tmp_path / "kg2", extra_link=["8\t"])
    with pytest.raises(KGError, match=r"toy\.link:8: empty field"):
        load_kg(folder, strict=True)


def test_link_file_unknown_items_and_conflicts_counted(tmp_path):
    folder = write_recbole(tmp_path / "kg", extra_link=["99\tf1", "1\tf1", "2\tf3", "bad line"])
    kg = load_kg(folder, item_ids=TITLES)
    r = kg.report
    assert r.link_lines_read == 6 + 4
    assert r.links_unknown_item == 1 and r.link_duplicates == 1 and r.link_conflicts == 1
    assert r.link_malformed == 1
    assert r.links_kept == 6 and r.items_linked == 6 and r.items_not_linked == 1
    assert sorted(r.malformed_lines("toy.link")) == [8, 10, 11]  # unknown item, conflict, malformed
    assert kg.entity_of("2") == "f2"  # the first link wins


def test_missing_files(tmp_path):
    with pytest.raises(KGError, match="no \\*.kg"):
        load_kg(tmp_path)
    with pytest.raises(KGError, match="missing"):
        load_kg(tmp_path / "nope.tsv")


# ------------------------------------------------------------------------- neighbours / IDF


def test_relation_labels():
    assert relation_label("film.film.directed_by") == "director"
    assert relation_label("film.director.film", inverse=True) == "director"
    assert relation_label("film.film.written_by") == "writer"
    assert relation_label("film.film_genre.films_in_this_genre", inverse=True) == "genre"
    assert relation_label("film.film.production_companies") == "production company"
    assert relation_label("film.production_company.films", inverse=True) == "production company"
    assert relation_label("film.film.actor") == "actor"
    assert relation_label("film.film.edited_by") == "editor"
    assert relation_label("music.album.mixed_by") == "mixer"


def test_neighbours_idf_weighting():
    kg = toy_kg()
    n = len(kg.item_ids)  # 6 films attached to the graph
    assert kg.entity_weight("english") == pytest.approx(math.log(n / 6)) == 0.0
    assert kg.entity_weight("d1") == pytest.approx(math.log(n / 2))
    nb = kg.neighbours("1")
    # f2 (director) and f5 (actor) are linked through specific entities; the rest only via "English"
    assert [x.item for x in nb] == ["2", "5"]
    assert nb[0].score == pytest.approx(math.log(3)) and nb[0].links[0].entity == "d1"
    assert {l.entity for l in nb[0].links} == {"d1", "english"}
    assert (nb[0].links[0].relation_a, nb[0].links[0].label_b) == ("film.film.directed_by", "director")
    assert kg.links("4", "3")[0].relation_a == "~film.director.film"
    # the inverse-direction triple (d2 film.director.film f4) links f3 and f4 the same way
    assert [x.item for x in kg.neighbours("4")] == ["3"]
    # a shared rare entity beats a shared common one
    common = KnowledgeGraph([(f"x{k}", "lang", "en") for k in range(10)] + [("x0", "dir", "d"), ("x1", "dir", "d")])
    assert common.neighbours("x0", n=1)[0].item == "x1"
    assert common.neighbours("x0", n=1)[0].links[0].entity == "d"


def test_explain():
    kg = toy_kg()
    assert kg.explain("1", "2") == "same director as Alpha"
    assert kg.explain("1", "5") == "same actor as Alpha"
    assert kg.explain("4", "3", titles={"4": "Delta (1999)"}) == "same director as Delta (1999)"
    assert kg.explain("5", "6") == "sequel of Epsilon"
    assert kg.explain("6", "5") == "prequel of Epsilon II"
    assert kg.explain("3", "6") == "same genre as Gamma"
    assert kg.explain("1", "7") is None and kg.explain("1", "1") is None


# ----------------------------------------------------------------------------- candidates


def make_kg_source(items=contract.ITEMS) -> KGCandidates:
    # contract items i0..i7: i0 and i4 share a director, i2 and i5 an actor, i3 and i6 a genre
    triples = [("i0", "film.film.directed_by", "d"), ("i4", "film.film.directed_by", "d"),
               ("i2", "film.film.actor", "a"), ("i5", "film.film.actor", "a"),
               ("i3", "film.film.genre", "g"), ("i6", "film.film.genre", "g"), ("i1", "film.film.genre", "g2")]
    return KGCandidates(KnowledgeGraph(triples), items)


@pytest.mark.parametrize("check", sorted(n for n in dir(contract.TestContract) if n.startswith("test_")))
def test_candidate_source_contract(check, monkeypatch):
    """The colleague's CandidateSource contract checks (tests/test_candidates.py), run on KGCandidates."""
    monkeypatch.setattr(contract, "make", lambda cls: make_kg_source())
    getattr(contract.TestContract(), check)(KGCandidates)


def test_kg_candidates_cold_item_and_exclusions():
    src = KGCandidates(toy_kg(), [str(n) for n in range(1, 8)])
    assert isinstance(src, CandidateSource)
    # nobody has interacted with 2, 5 or 6: they are still proposed from the graph
    src.learn_one("u", "1", 5.0, 0.0)
    src.learn_one("u", "3", 2.0, 1.0)  # disliked: not a seed, but seen
    got = src.candidates("u", n=3)
    ids = [i for i, _ in got]
    assert ids[:2] == ["2", "5"] and "1" not in ids and "3" not in ids
    assert got[0][1] >= got[1][1] > 0
    assert src.explain("u", "2", TITLES) == "same director as Alpha"
    # a click (rating None) is a like; exclude works
    src.learn_one("v", "5", None, 2.0)
    assert [i for i, _ in src.candidates("v", n=2, exclude=["1"])][0] == "6"
    assert src.explain("v", "6", TITLES) == "sequel of Epsilon"


def test_kg_candidates_recency_weighting():
    src = KGCandidates(toy_kg(), [str(n) for n in range(1, 8)], user_decay=0.5)
    src.learn_one("u", "3", 5.0, 0.0)  # old like -> 4 (director) and 6 (genre)
    src.learn_one("u", "1", 5.0, 1.0)  # recent like -> 2 (director) and 5 (actor)
    s = dict(zip(src.item_ids, src.score_all("u")))
    assert s["2"] > s["4"] > 0
    timed = KGCandidates(toy_kg(), [str(n) for n in range(1, 8)], half_life_s=10.0)
    timed.learn_one("u", "1", 5.0, 0.0)
    assert timed.score_all("u", ts=10.0)[timed.index_of("2")] == pytest.approx(
        timed.score_all("u", ts=0.0)[timed.index_of("2")])  # one seed: normalised, decay cancels
    timed.learn_one("u", "3", 5.0, 100.0)
    assert timed.score_all("u", ts=100.0)[timed.index_of("4")] > 10 * timed.score_all("u", ts=100.0)[timed.index_of("2")]


# ---------------------------------------------------------------------------------- KG loss


def test_kg_loss_decreases():
    torch.manual_seed(0)
    kg = toy_kg()
    items = kg.item_ids
    loss_fn = KGLoss(kg, dim=8, item_dim=12, seed=0)
    item_vecs = torch.nn.Parameter(torch.randn(len(items), 12))
    opt = torch.optim.Adam([item_vecs, *loss_fn.parameters()], lr=0.05)
    batch = loss_fn.sample(64, negatives=2)
    assert len(batch) == 64 and batch.neg_tails.shape == (64, 2)
    assert set(batch.items) <= set(items)
    pos = {it: k for k, it in enumerate(items)}
    losses = []
    for _ in range(30):
        vecs = item_vecs[[pos[i] for i in batch.items]]
        loss = loss_fn(vecs, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    # the dict form gives the same value as the aligned tensor
    with torch.no_grad():
        d = {i: item_vecs[pos[i]] for i in items}
        assert float(loss_fn(d, batch)) == pytest.approx(float(loss_fn(item_vecs[[pos[i] for i in batch.items]], batch)))


def test_sampler_restricts_to_items_and_corrupts_within_relation():
    loss_fn = KGLoss(toy_kg(), dim=4, seed=1)
    b = loss_fn.sample(20, items=["1"], negatives=3)
    assert b.items == ["1"]
    kg = loss_fn.kg
    for r, t, negs in zip(b.relations.tolist(), b.tails.tolist(), b.neg_tails.tolist()):
        assert all(n != t for n in negs) or len(loss_fn.sampler.tail_pool[r]) < 2
    assert {kg.entities[t] for t in b.tails.tolist()} <= {"d1", "a1", "english"}
    # items without triples fall back to the whole graph
    assert len(loss_fn.sample(5, items=["7"])) == 5


def _director_gap(alpha: float, seed: int, steps: int = 30) -> float:
    """A two-tower toy: 20 films, 4 directors (5 films each), one language, 3 genres. Free item vectors
    (the "item tower") are trained with InfoNCE against random users plus ``alpha * L_KG``. Returns the
    mean cosine of same-director pairs minus that of other pairs."""
    triples = []
    for k in range(20):
        triples += [(f"m{k}", "film.film.directed_by", f"d{k % 4}"), (f"m{k}", "film.film.language", "en"),
                    (f"m{k}", "film.film.genre", f"g{(7 * k) % 3}")]
    kg = KnowledgeGraph(triples)
    items = kg.item_ids
    pos = {it: k for k, it in enumerate(items)}
    torch.manual_seed(seed)
    V = torch.nn.Parameter(torch.randn(len(items), 16))
    users = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    targets = torch.randint(len(items), (8,))
    kl = KGLoss(kg, dim=16, item_dim=16, seed=seed)
    opt = torch.optim.Adam([V, *kl.parameters()], lr=0.05)
    for _ in range(steps):
        Vn = torch.nn.functional.normalize(V, dim=-1)
        rec = torch.nn.functional.cross_entropy(users @ Vn.T / 0.1, targets)
        batch = kl.sample(64)
        loss = combined_loss(rec, kl(Vn[[pos[i] for i in batch.items]], batch), alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
    same = np.array([[int(a[1:]) % 4 == int(b[1:]) % 4 for b in items] for a in items])
    other = ~same
    np.fill_diagonal(same, False)
    Vn = torch.nn.functional.normalize(V.detach(), dim=-1)
    S = (Vn @ Vn.T).numpy()
    return float(S[same].mean() - S[other].mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_kg_term_pulls_same_director_items_together(seed):
    """L = L_rec + alpha * L_KG: with alpha > 0, films sharing a director end up closer (relative to
    other pairs) than the same training run without the KG term."""
    assert _director_gap(1.0, seed) > _director_gap(0.0, seed) + 0.03


def test_alpha_from_settings():
    from driftrec.core.settings import Settings

    assert kg_alpha(Settings()) == Settings().trainer.kg_alpha
    assert kg_alpha(None) == 0.1
    rec = torch.tensor(1.0)
    assert combined_loss(rec, torch.tensor(2.0), 0.0) is rec
    assert float(combined_loss(rec, torch.tensor(2.0), 0.5)) == pytest.approx(2.0)


def test_attach_kg_loss_to_the_trainer():
    """The hook on the real Trainer (MiniLM + LoRA): each update step optimises L_rec + alpha * L_KG,
    gradients reach both the KG tables and the LoRA weights; Trainer.loss() stays the rec loss."""
    from driftrec.model.knowledge.loss import attach_kg_loss
    from driftrec.model.training.trainer import Trainer, TrainingExample
    from tests.scorer_support import base_model_and_tokenizer

    enc, tok = base_model_and_tokenizer()
    trainer = Trainer(encoder=enc, tokenizer=tok, device="cpu", max_steps=1, batch_size=4, replay_buffer=0,
                      negatives=0, seed=0)
    texts = {"1": "Alpha (1990) [Drama]", "2": "Beta (1991) [Drama]", "3": "Gamma (1992) [Comedy]"}
    kg = KnowledgeGraph([("1", "film.film.directed_by", "d1"), ("2", "film.film.directed_by", "d1"),
                         ("3", "film.film.directed_by", "d2")])
    examples = [TrainingExample("recently watched: Alpha (1990)", texts["2"]),
                TrainingExample("recently watched: Gamma (1992)", texts["1"])]
    rec_only = trainer.loss(examples)
    kl = attach_kg_loss(trainer, KGLoss(kg, dim=16, item_dim=384), texts, alpha=0.5, n_triples=8)
    assert trainer.loss(examples) == pytest.approx(rec_only)  # eval mode: no KG term
    ent = kl.entity.weight.detach().clone()
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    stats = trainer.update(examples, max_steps=1)
    assert stats.steps == 1 and trainer.last_kg_loss > 0
    assert not torch.equal(ent, kl.entity.weight.detach())
    assert any(not torch.equal(v, dict(trainer.model.named_parameters())[n].detach()) for n, v in lora.items())


def test_check_alignment_detects_links_keyed_by_other_ids():
    import random

    from driftrec.model.knowledge.graph import check_alignment

    names = ["Drama", "Comedy", "Horror"]
    n = 300
    cat = {str(k): [names[k % 3]] for k in range(n)}
    triples = [(f"e{k}", "film.film.genre", f"g{k % 3}") for k in range(n)]
    good = KnowledgeGraph(triples, {str(k): f"e{k}" for k in range(n)})
    assert check_alignment(good, cat, min_df=5)["aligned"] is True
    # the same graph with a link file keyed by another dataset's ids: item k is some other film
    other = list(range(n))
    random.Random(0).shuffle(other)
    wrong = KnowledgeGraph(triples, {str(other[k]): f"e{k}" for k in range(n)})
    r = check_alignment(wrong, cat, min_df=5)
    assert r["aligned"] is False and r["genre_entities"] == 3
    assert check_alignment(toy_kg(), {})["aligned"] is None


def test_relink_by_title():
    from types import SimpleNamespace as It

    from driftrec.model.knowledge.graph import normalise_title, relink_by_title

    assert normalise_title("Shawshank Redemption, The") == normalise_title("The Shawshank Redemption")
    assert normalise_title("Seven (Se7en)") == "seven"
    source = {"260": It(title="Star Wars: Episode IV - A New Hope", year=1977), "1": It(title="Toy Story", year=1995),
              "9": It(title="Crash", year=1996), "10": It(title="Nowhere", year=2001)}
    target = {"50": It(title="Star Wars", year=1977), "1": It(title="Toy Story", year=1995),
              "7": It(title="Crash", year=1996), "8": It(title="Crash", year=1996)}
    links, stats = relink_by_title({"260": "m.sw", "1": "m.ts", "9": "m.crash", "10": "m.x", "99": "m.y"}, source, target)
    assert links == {"50": "m.sw", "1": "m.ts"}
    assert stats == {"matched": 2, "ambiguous": 1, "no_match": 1, "source_id_unknown": 1}
    kg = KnowledgeGraph([("m.sw", "film.film.sequel", "m.esb")], {"260": "m.sw"}).relinked(links)
    assert kg.entity_of("50") == "m.sw" and kg.entity_of("260") is None
