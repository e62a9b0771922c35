"""Quick offline check of the KG candidate source on a MovieLens log (not a test, not prequential-v1).

    python -m driftrec.model.evaluation.kg_check --data /work/shared/datasets/ml-100k --kg /work/shared/datasets/ml-100k-kg

Time split: the first ``--train`` fraction of events (time order) trains; for each later positive
(rating >= 4) whose item the user has not interacted with before, is the item in the top-``--k``
candidates of each source? Sources keep learning from the test events as they pass (test-then-learn),
so it is a streaming hit rate. Reported overall and for items with fewer than ``--cold`` prior positives.
It also checks that the link file matches the catalogue: sequel/prequel pairs should share title words.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import numpy as np

from driftrec.model.ranking.sources import PopularitySource
from driftrec.model.evaluation.movielens import load
from driftrec.model.knowledge.graph import load_kg_for_log
from driftrec.model.knowledge.candidates import KGCandidates


def link_sanity(kg) -> dict:
    """Share of direct item-item links (sequels) whose titles share a word: ~0 means misaligned ids."""
    stop = {"the", "and", "part", "movie", "film", "of", "a"}

    def words(t):
        return {w for w in re.findall(r"[a-z]+", t.lower()) if len(w) > 2 and w not in stop}

    pairs = [(a, b) for (a, b) in kg._direct]
    if not pairs:
        return {"direct_pairs": 0}
    share = sum(1 for a, b in pairs if words(kg.title(a)) & words(kg.title(b)))
    return {"direct_pairs": len(pairs), "share_title_word": share, "examples": [
        f"{kg.title(a)} -> {kg.title(b)}" for a, b in pairs[:5]]}


def pair_agreement(kg, item_genres, labels=("genre", "director", "writer", "actor"), permutations: int = 200,
                   seed: int = 0) -> dict:
    """Permutation test of the link file against the catalogue.

    For each relation ``label``: among pairs of linked items that share an entity through it (same KG
    genre, same director...), the share whose catalogue genre sets overlap, against the same share
    with the item ids shuffled among the linked items ``permutations`` times (the null of a link file
    unrelated to the catalogue). ``p`` is the one-sided permutation p-value ((1 + #null >= observed) /
    (1 + permutations)); correct links make same-director or same-genre films share genres far more
    often than chance."""
    items = kg.item_ids
    n = len(items)
    names = sorted({g for i in items for g in item_genres.get(i, ())})
    gi = {g: j for j, g in enumerate(names)}
    G = np.zeros((n, max(len(names), 1)), dtype=np.float32)
    for r, i in enumerate(items):
        for g in item_genres.get(i, ()):
            G[r, gi[g]] = 1.0
    C = (G @ G.T) > 0  # catalogue: the two items share a genre
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(n) for _ in range(permutations)]
    out = {}
    for label in labels:
        keys = [(i, a) for (i, a), labs in kg._labels.items() if label in labs]
        if not keys:
            continue
        from scipy import sparse

        rows = np.fromiter((k[0] for k in keys), dtype=np.int64)
        cols = np.fromiter((k[1] for k in keys), dtype=np.int64)
        A = sparse.csr_matrix((np.ones(len(keys), dtype=np.float32), (rows, cols)), shape=(n, len(kg.attributes)))
        S = (A @ A.T).tocoo()
        mask = S.row != S.col
        r_, c_ = S.row[mask], S.col[mask]
        if not len(r_):
            continue
        obs = float(C[r_, c_].mean())
        null = np.asarray([C[pm[r_], pm[c_]].mean() for pm in perms])
        out[label] = {"pairs": int(len(r_) // 2), "share_genre": round(obs, 4),
                      "share_genre_shuffled_mean": round(float(null.mean()), 4),
                      "share_genre_shuffled_sd": round(float(null.std()), 4),
                      "z": round(float((obs - null.mean()) / null.std()), 2) if null.std() > 0 else None,
                      "p": round(float((1 + (null >= obs).sum()) / (1 + len(null))), 4)}
    return {"permutations": permutations, **out}


def catalogue_kg(rating_log):
    """A reference graph built from the catalogue itself (item -> genre, item -> decade): aligned by
    construction, so it shows what the KG source does with correct links."""
    from driftrec.model.knowledge.graph import KnowledgeGraph

    triples = []
    for i, it in rating_log.items.items():
        triples += [(i, "film.film.genre", f"genre:{g}") for g in it.genres]
        if it.year:
            triples.append((i, "film.film.decade", f"decade:{it.year // 10 * 10}"))
    return KnowledgeGraph(triples, titles={i: it.title for i, it in rating_log.items.items()})


def run(data: str, kg_dir: str, train: float = 0.8, k: int = 100, cold: int = 5, every: int = 1,
        sources: dict | None = None, relink_from: str | None = None, permutations: int = 200) -> dict:
    t0 = time.perf_counter()
    log = load(data)
    t_log = time.perf_counter() - t0
    t0 = time.perf_counter()
    kg = load_kg_for_log(kg_dir, log)
    relink = None
    if relink_from:  # the link file is keyed by another catalogue's ids (e.g. ml-latest movieIds)
        from driftrec.model.knowledge.graph import check_alignment, load_kg, relink_by_title

        raw = load_kg(kg_dir)
        links, relink = relink_by_title(raw.item_entity, load(relink_from).items, log.items)
        kg = raw.relinked(links, {i: it.title for i, it in log.items.items()})
        kg.alignment = check_alignment(kg, {i: it.genres for i, it in log.items.items()})
    t_kg = time.perf_counter() - t0
    items = list(log.items)
    srcs = sources or {
        "kg": KGCandidates(kg, items),
        "kg_norm": KGCandidates(kg, items, normalise=True),
        "popularity": PopularitySource(items),
        "catalogue_kg": KGCandidates(catalogue_kg(log), items),
    }
    n_train = int(train * len(log.events))
    prior_pos: dict[str, int] = {}
    hits: dict[str, list[bool]] = {n: [] for n in srcs}
    cold_hits: dict[str, list[bool]] = {n: [] for n in srcs}
    seen: dict[str, set] = {}
    t0 = time.perf_counter()
    npos = 0
    rand: list[float] = []  # expected hit rate of a random top-k
    rand_cold: list[float] = []
    for p, e in enumerate(log.events):
        positive = e.rating >= 4
        if p >= n_train and positive and e.item not in seen.get(e.user, ()):
            npos += 1
            if (npos - 1) % every == 0:
                is_cold = prior_pos.get(e.item, 0) < cold
                allowed = len(items) - len(seen.get(e.user, ()))
                rand.append(min(k, allowed) / allowed)
                if is_cold:
                    rand_cold.append(min(k, allowed) / allowed)
                for name, s in srcs.items():
                    top = {i for i, _ in s.candidates(e.user, n=k, ts=e.timestamp)}
                    hits[name].append(e.item in top)
                    if is_cold:
                        cold_hits[name].append(e.item in top)
        for s in srcs.values():
            s.learn_one(e.user, e.item, e.rating, e.timestamp)
        seen.setdefault(e.user, set()).add(e.item)
        if positive:
            prior_pos[e.item] = prior_pos.get(e.item, 0) + 1
    return {
        "load_s": {"log": round(t_log, 2), "kg": round(t_kg, 2)},
        "kg_report": kg.report.summary(),
        "relink": relink,
        "kg_stats": kg.stats(),
        "link_sanity": link_sanity(kg),
        "alignment": kg.alignment,
        "pair_agreement": pair_agreement(kg, {i: it.genres for i, it in log.items.items()}, permutations=permutations),
        "pair_agreement_catalogue_kg": pair_agreement(catalogue_kg(log), {i: it.genres for i, it in log.items.items()},
                                                      labels=("genre",), permutations=permutations),
        "split": {"train_events": n_train, "test_positives": len(next(iter(hits.values())))},
        f"hr@{k}": {**{n: round(float(np.mean(h)), 4) for n, h in hits.items()},
                    "random": round(float(np.mean(rand)), 4) if rand else None},
        f"hr@{k}_cold<{cold}": {**{n: round(float(np.mean(h)), 4) if h else None for n, h in cold_hits.items()},
                                "random": round(float(np.mean(rand_cold)), 4) if rand_cold else None},
        "cold_positives": len(next(iter(cold_hits.values()))),
        "eval_s": round(time.perf_counter() - t0, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m driftrec.model.evaluation.kg_check")
    p.add_argument("--data", required=True)
    p.add_argument("--kg", required=True)
    p.add_argument("--train", type=float, default=0.8)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--cold", type=int, default=5)
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--relink-from", help="MovieLens folder whose ids key the link file (e.g. ml-latest-small)")
    p.add_argument("--permutations", type=int, default=200, help="shuffled-link draws for the pair agreement test")
    a = p.parse_args(argv)
    print(json.dumps(run(a.data, a.kg, a.train, a.k, a.cold, a.every, relink_from=a.relink_from,
                         permutations=a.permutations), indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
