"""The knowledge model's trainer (``driftrec train`` with ``ranking.engine: policy``): split, fit, gate,
publish, warm starts. Real model forwards (the packaged MiniLM embeds the item texts), real checkpoints."""

from __future__ import annotations

import random

import pytest
import torch

from driftrec.core.contracts import Item
from driftrec.core.settings import Settings
from driftrec.model.knowledge.checkpoint import active_version, knowledge_root, load_knowledge
from driftrec.model.training.gate import Gate
from driftrec.model.training.knowledge_worker import KnowledgeTrainingWorker, rank_metrics
from driftrec.model.training.worker import TrainingWorker, training_worker

GENRES = ["space", "western", "romance", "horror"]
SMALL = {"dim": 16, "init_epochs": 4, "epochs": 2, "maxlen": 12, "dropout": 0.0}


def _items(n=24):
    return [Item(event_id=f"item-{k}", event_time=1.0, item_id=f"m{k}", title=f"{GENRES[k % 4].title()} film {k}",
                 genres=[GENRES[k % 4]], year=1980 + k) for k in range(n)]


def _events(items, n=600, seed=0, users=20):
    """Wire dicts: each user mostly picks items of one genre, in a fixed cycle (learnable order)."""
    rng = random.Random(seed)
    items = list(items)
    by_genre = {g: [it.item_id for it in items if it.genres[0] == g] for g in GENRES}
    pos = {u: 0 for u in range(users)}
    out = []
    for e in range(n):
        u = rng.randrange(users)
        pool = by_genre[GENRES[u % 4]]
        item = pool[pos[u] % len(pool)] if rng.random() < 0.9 else rng.choice(items).item_id
        pos[u] += 1
        kind = "click" if rng.random() < 0.5 else "rating"
        ev = {"type": kind, "event_id": f"e{seed}-{e}", "event_time": 1_700_000_000.0 + 60 * e, "user_id": f"u{u}",
              "item_id": item}
        if kind == "rating":
            ev["rating"] = float(rng.choice([4, 5, 5, 2]))
        out.append(ev)
    return out


def _settings(tmp_path, **trainer):
    return Settings(model={"adapter_dir": str(tmp_path / "adapters")}, ranking={"engine": "policy"},
                    trainer={"min_examples": 20, "gate_tolerance": 1.0, **trainer})


def _worker(tmp_path, items=None, **trainer):
    torch.manual_seed(0)
    return KnowledgeTrainingWorker(_settings(tmp_path, **trainer), items=items or _items(), options=SMALL)


def test_the_engine_picks_the_trainer(tmp_path):
    assert isinstance(training_worker(_settings(tmp_path), items=_items()), KnowledgeTrainingWorker)
    loop = Settings(model={"adapter_dir": str(tmp_path / "a")}, ranking={"engine": "loop"})
    assert isinstance(training_worker(loop, items=_items()), TrainingWorker)


def test_split_holds_out_the_newest_positives_with_their_history(tmp_path):
    w = _worker(tmp_path, holdout_frac=0.25)
    events = _events(w.items.values(), 200)
    hist, cases = w.split(events)
    assert sum(len(h) for _, h in hist) == 150  # the oldest 75 % train
    expected = []
    for n in range(150, 200):
        e = events[n]
        before = [x["item_id"] for x in events[:n] if x["user_id"] == e["user_id"]]
        if before and (e["type"] == "click" or e["rating"] >= 4):
            expected.append((before, e["item_id"]))
    assert cases == expected and len(cases) > 20


def test_a_run_trains_gates_and_publishes_a_verified_checkpoint(tmp_path):
    w = _worker(tmp_path)
    events = _events(w.items.values(), 600)
    r = w.run_once(events, trigger="events")
    assert r.outcome == "promoted", r
    assert r.version == "k0001" and r.decision["reason"] == "no serving baseline"
    root = knowledge_root(tmp_path / "adapters")
    assert active_version(root) == "k0001"
    model = load_knowledge(root / "default" / "k0001", w.items)  # verified (checksums, shapes, texts)
    hist, cases = w.split(events)
    m = rank_metrics(model, cases, list(w.items))
    assert m["n"] == r.holdout and m["hr@10"] == pytest.approx(r.decision["candidate"]["hr@10"])
    # the users' genre cycles are learnable: far better than a random top-10 of 24 items (10/24 minus seen)
    assert m["hr@10"] > 0.6, m

    r2 = w.run_once(_events(w.items.values(), 600, seed=1), trigger="events")
    assert r2.outcome == "promoted" and r2.version == "k0002"
    assert r2.decision["serving"]["hr@10"] >= 0  # the gate compared against k0001
    assert r2.stats["epochs"] == SMALL["epochs"]  # warm-started: incremental epochs, not init_epochs
    assert active_version(root) == "k0002"


def test_a_rejected_candidate_is_undone_and_nothing_is_published(tmp_path):
    w = _worker(tmp_path)
    assert w.run_once(_events(w.items.values(), 600)).outcome == "promoted"
    before = {k: v.clone() for k, v in w.trainer.net.state_dict().items()}
    w.gate = Gate(1.0, min_cases=10**6)  # no run can have that many cases: every candidate is refused
    r = w.run_once(_events(w.items.values(), 600, seed=2))
    assert r.outcome == "rejected" and "too few holdout cases" in r.decision["reason"]
    assert active_version(knowledge_root(tmp_path / "adapters")) == "k0001"
    after = w.trainer.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert w.trainer.fits == 1


def test_a_new_process_resumes_from_the_active_checkpoint(tmp_path):
    w = _worker(tmp_path)
    assert w.run_once(_events(w.items.values(), 600)).outcome == "promoted"
    served = w.trainer.net.state_dict()
    w2 = _worker(tmp_path)
    assert w2.serving_version == "k0001"
    trainer = w2._ensure_trainer()
    now = trainer.net.state_dict()
    for key in ("encoder.blocks.0.qkv.weight", "items.text_proj.weight", "items.id_emb.weight"):
        assert torch.equal(now[key], served[key]), key
    assert trainer.fits == 1  # the next fit is incremental


def test_a_grown_catalogue_gets_a_trainer_warm_started_by_item_id(tmp_path):
    items = _items(24)
    w = _worker(tmp_path, items=items)
    assert w.run_once(_events(items, 600)).outcome == "promoted"
    old = w.trainer
    new_item = Item(event_id="item-new", event_time=2.0, item_id="m-new", title="Space film new", genres=["space"],
                    year=2001)
    w.set_items([new_item])
    trainer = w._ensure_trainer()
    assert trainer is not old and trainer.item_ids[-1] == "m-new"
    old_rows = old.net.state_dict()["items.id_emb.weight"]
    rows = trainer.net.state_dict()["items.id_emb.weight"]
    for n, i in enumerate(old.item_ids):
        assert torch.equal(rows[trainer.index[i]], old_rows[n])
    assert torch.equal(trainer.net.state_dict()["encoder.ln.weight"], old.net.state_dict()["encoder.ln.weight"])
    r = w.run_once(_events(items, 400, seed=3))
    assert r.outcome == "promoted"
    model = load_knowledge(knowledge_root(tmp_path / "adapters") / "default" / r.version, w.items)
    assert model.knows("m-new")


def test_too_little_data_skips_the_run(tmp_path):
    w = _worker(tmp_path)
    r = w.run_once(_events(w.items.values(), 10))
    assert r.outcome == "skipped"
    assert active_version(knowledge_root(tmp_path / "adapters")) is None


def test_a_checkpoint_serves_its_own_text_vectors_and_re_embeds_only_changed_texts(tmp_path):
    import numpy as np

    from driftrec.model.knowledge.seqrec import text_vectors

    w = _worker(tmp_path)
    assert w.run_once(_events(w.items.values(), 600)).outcome == "promoted"
    folder = knowledge_root(tmp_path / "adapters") / "default" / "k0001"
    trained = w.trainer.texts
    same = load_knowledge(folder, w.items)
    assert np.array_equal(same.text_vectors(), trained)  # stored, not recomputed
    renamed = dict(w.items)
    renamed["m0"] = Item(**{**renamed["m0"].asdict(), "title": "A completely different western"})
    changed = load_knowledge(folder, renamed)
    vecs = changed.text_vectors()
    assert np.allclose(vecs[changed.index["m0"]], text_vectors([renamed["m0"].text()])[0])
    assert not np.allclose(vecs[changed.index["m0"]], trained[same.index["m0"]])
    others = [n for n, i in enumerate(changed.item_ids) if i != "m0"]
    assert np.array_equal(vecs[others], trained[others])


def test_publishing_prunes_old_versions_but_never_the_active_one(tmp_path):
    from driftrec.model.knowledge.checkpoint import prune

    w = KnowledgeTrainingWorker(_settings(tmp_path).model_copy(update={"model": _settings(tmp_path).model.model_copy(
        update={"keep_versions": 2})}), items=_items(), options=SMALL)
    for seed in range(3):
        assert w.run_once(_events(w.items.values(), 600, seed=seed)).outcome == "promoted"
    root = knowledge_root(tmp_path / "adapters")
    assert sorted(p.name for p in (root / "default").iterdir() if p.is_dir()) == ["k0002", "k0003"]
    assert active_version(root) == "k0003"
    (root / "default" / "ACTIVE").write_text("k0002")  # an operator went back one version
    assert prune(root, "default", 1) == []  # older than the newest, but active: it stays
    load_knowledge(root / "default" / "k0002", w.items)
    (root / "default" / "ACTIVE").write_text("k0003")
    assert prune(root, "default", 1) == ["k0002"]
    assert not any(p.name.startswith(".pruned") for p in (root / "default").iterdir())
