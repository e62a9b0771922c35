"""``python -m driftrec.bench.scale``: how the ranking policy's cost grows with the catalogue and with the users.

The engine measured is the product's default one, :class:`driftrec.model.ranking.policy.RankingPolicy`
(``ranking.engine: policy``), built as the worker builds it (``PolicyConfig.from_settings``, a knowledge
model, no knowledge graph), on one torch thread (``torch.set_num_threads(1)``, as the worker sets it) and
one BLAS thread for numpy (``OPENBLAS_NUM_THREADS=1`` etc. in the subprocess's environment, as ``driftrec``
sets it for its own processes unless the user set it; on a busy 2-core machine two BLAS threads made
``recommend`` over 2,000 items 4x slower at p50, 8.0 vs 1.7 ms; ``--blas-threads 0`` keeps numpy's default
for that comparison). Every size runs in a fresh
subprocess (``python -m driftrec.bench.scale --one catalogue:N`` / ``--one users:U``, one JSON line on
stdout), so that its RSS is its own.

**Catalogue scale** (N = 2,000, 20,000, 100,000 items). A synthetic catalogue (titles, 1-3 of 18 genres,
years); the knowledge model's trainer (:class:`~driftrec.model.knowledge.seqrec.KnowledgeTrainer`,
``text=True``, no graph) with its LM text embedding replaced by deterministic random unit-norm float32
rows of the LM's width (384; ``"text_vectors": "synthetic"``): the LM forward over 100k texts takes minutes
on a CPU and the serving cost does not depend on the values. The served snapshot is built the way
``KnowledgeTrainer.fit`` ends, without training (a :class:`~driftrec.model.knowledge.seqrec.KnowledgeModel`
over a copy of the network, ``id_known`` = the items with interactions; the trainer is then dropped, as a
worker holds only the snapshot). The policy state is then warmed with 50,000 interactions of 5,000 users
(every user at least one; Zipf-like item popularity, exponent 1; MovieLens-like ratings; timestamps 5 s
apart) through ``policy.state.update`` and ``policy.lm_nb.learn_one`` -- what ``RankingPolicy.observe``
does apart from the fusion's learning, which ranks the whole catalogue at every positive (too slow at
100k for 50,000 events) -- except the last 200, which go through ``policy.observe`` itself, so that the
fusion has learnt from about a hundred positives: its cost is the same arithmetic whatever it learnt, but
an untrained fusion scores every item 0.5 and the final top-k sort of equal scores is ten times cheaper
than of distinct ones (0.8 vs 7.8 ms at 100k). The fusion is thus barely trained (``"fusion":
"observed_tail"``); the ranking quality is not what is measured. Measured: ``build_s`` (catalogue + model
snapshot + policy), ``warm_s``, ``rss_mb`` (VmRSS after warming) and ``rss_peak_mb`` (VmHWM), and
``policy.recommend(user, 10, ts)`` for 300 warm users drawn without replacement (after 20 warm-up
requests): ``rank_p50_ms`` / ``rank_p99_ms``.

The policy's two item-kNN sources (:class:`~driftrec.model.ranking.sources.ItemKNNSource`) keep their
co-visitation counts in a dense float32 matrix up to ``dense_max_items`` (8,192) items and in a sparse
store (CSR + append buffer) beyond, so every size builds the engine as the worker does
(``"knn": "dense"`` or ``"sparse"``; ``knn_store_mb``: what the two stores hold after warming).
``rank_p50_ms_no_knn`` / ``rank_p99_ms_no_knn`` are measured too, on the same warmed state with the kNN
scores zeroed: what the rest of ``recommend`` costs. ``--knn zero`` runs with kNN sources that hold no
counts at all (the ``rank_*`` keys are then absent).

**User scale** (U = 10,000, 100,000, 1,000,000 users). The same policy over a 2,000-item catalogue; 2·U
interactions (every user at least one, random users for the rest, Zipf items, timestamps increasing)
through ``policy.state.update`` + ``policy.lm_nb.learn_one`` (the per-user state: histories, seen sets and
genre profiles in :class:`~driftrec.model.ranking.policy.PolicyState` and every source's per-user history).
Measured: ``state_events_per_s`` (those updates alone, in one Python thread), ``rss_mb`` after,
``bytes_per_user`` (RSS growth over the ingest / U; the event arrays are allocated before) and
``rank_p50_ms`` / ``rank_p99_ms`` of ``recommend`` over 200 users drawn without replacement at the end
(after 20 warm-up requests; the fusion untrained here: over 2,000 items its sort costs little either way).

``python -m driftrec.bench.scale --json bench/results/scale.json`` writes the JSON and a PNG beside it
(``scale.png``: ranking p99 vs catalogue size, RSS vs users). ``driftrec bench --only scale`` runs it
through :mod:`driftrec.bench.run`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from driftrec.bench.e2e import pct

CATALOGUE_SIZES = (2_000, 20_000, 100_000)
USER_SIZES = (10_000, 100_000, 1_000_000)
TEXT_DIM = 384  # all-MiniLM-L6-v2's width
WARM_USERS, WARM_EVENTS = 5_000, 50_000
OBSERVED_TAIL = 200  # the last warm events go through policy.observe (the fusion learns)
USER_SCALE_ITEMS = 2_000
REQUESTS, WARMUP_REQUESTS, USER_REQUESTS = 300, 20, 200
CHILD_TIMEOUT_S = 1200
GENRES = ("Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
          "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
WORDS = ("night", "river", "city", "ghost", "summer", "iron", "last", "secret", "blue", "road", "king", "winter",
         "stone", "dream", "fire", "glass", "silent", "golden", "wild", "shadow")
RATINGS, RATING_P = (1.0, 2.0, 3.0, 4.0, 5.0), (0.06, 0.11, 0.27, 0.34, 0.22)  # about MovieLens' mix


# ------------------------------------------------------------------------------------------ helpers


def proc_status_mb(field: str = "VmRSS") -> float:
    """``field`` of /proc/self/status (VmRSS, VmHWM) in MB (2^20 bytes)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def synthetic_text_vectors(texts, model_path=None, device=None) -> np.ndarray:
    """Stands in for :func:`driftrec.model.knowledge.seqrec.text_vectors`: deterministic (per text) random
    unit-norm float32 rows of the LM's width, no LM forward."""
    out = np.empty((len(texts), TEXT_DIM), dtype=np.float32)
    for n, s in enumerate(texts):
        seed = int.from_bytes(hashlib.sha1(s.encode()).digest()[:8], "little")
        out[n] = np.random.default_rng(seed).standard_normal(TEXT_DIM, dtype=np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def synthetic_catalogue(n: int, seed: int = 0) -> dict:
    """``n`` :class:`~driftrec.core.contracts.Item` s with titles, genres and years, ids ``i0``..."""
    from driftrec.core.contracts import Item

    rng = np.random.default_rng(seed)
    n_genres = rng.choice((1, 2, 3), size=n, p=(0.45, 0.35, 0.2))
    years = rng.integers(1930, 2026, size=n)
    items = {}
    for k in range(n):
        words = rng.choice(len(WORDS), size=2, replace=False)
        genres = [GENRES[g] for g in rng.choice(len(GENRES), size=int(n_genres[k]), replace=False)]
        items[f"i{k}"] = Item(event_id=f"scale-{k}", event_time=1.7e9, item_id=f"i{k}",
                              title=f"The {WORDS[words[0]]} {WORDS[words[1]]} {k}".title(), genres=genres,
                              year=int(years[k]), tags=[WORDS[words[0]]])
    return items


def synthetic_events(rng: np.random.Generator, n_users: int, n_events: int, n_items: int,
                     zipf_a: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user index, item index, rating) per event: every user at least once, random users for the rest,
    item popularity ~ 1/rank^zipf_a over a random permutation of the catalogue."""
    users = np.concatenate([np.arange(n_users), rng.integers(n_users, size=max(n_events - n_users, 0))])
    rng.shuffle(users)
    p = 1.0 / np.arange(1, n_items + 1) ** zipf_a
    items = rng.permutation(n_items)[rng.choice(n_items, size=len(users), p=p / p.sum())]
    ratings = rng.choice(RATINGS, size=len(users), p=RATING_P)
    return users, items, ratings


def _zero_knn_class():
    """An :class:`ItemKNNSource` without its matrix: keeps the user histories, scores zeros."""
    from driftrec.model.ranking.sources import ItemKNNSource

    class ZeroKNNSource(ItemKNNSource):
        def _grow(self, n: int) -> None:
            pass

        def _learn(self, user, idx, rating, ts) -> None:
            pass

        def score_items(self, user, cols=None):
            return np.zeros(self.n_items if cols is None else len(cols))

        def similarity_rows(self, rows, cols=None):
            return np.zeros((len(rows), self.n_items if cols is None else len(cols)))

    return ZeroKNNSource


def _zero_knn_scores(src) -> None:
    """Make a built kNN source score zeros from now on (its state stays; used for the ``_no_knn`` keys)."""
    src.score_items = lambda user, cols=None: np.zeros(src.n_items if cols is None else len(cols))
    src.similarity_rows = lambda rows, cols=None: np.zeros((len(rows), src.n_items if cols is None else len(cols)))


def build_policy(n_items: int, policy_cfg: dict, *, known: np.ndarray, dense_knn: bool = True):
    """The policy over a synthetic catalogue of ``n_items`` with an untrained knowledge-model snapshot
    (``known``: the items whose id embedding is used, as ``fit`` sets them). Returns (policy, item ids)."""
    import torch

    import driftrec.model.knowledge.seqrec as seqrec
    import driftrec.model.ranking.policy as policy_mod

    seqrec.text_vectors = synthetic_text_vectors  # the LM forward is the one thing not run (see the docstring)
    items = synthetic_catalogue(n_items)
    item_ids = list(items)
    trainer = seqrec.KnowledgeTrainer(items, item_ids, text=True, kg=None, seed=0)
    net = trainer.net
    net.items.id_known.copy_(torch.as_tensor(known, dtype=torch.bool))
    net.eval()
    model = seqrec.KnowledgeModel(copy.deepcopy(net).cpu(), trainer.item_ids, trainer.texts, "scale-untrained",
                                  item_entity=trainer.item_entity, model_path=trainer.model_path)
    del trainer, net
    gc.collect()
    saved = policy_mod.ItemKNNSource
    if not dense_knn:
        policy_mod.ItemKNNSource = _zero_knn_class()
    try:
        policy = policy_mod.RankingPolicy(policy_mod.PolicyConfig(**policy_cfg), items, item_ids, model=model)
    finally:
        policy_mod.ItemKNNSource = saved
    return policy, item_ids


def _feed(policy, user_ids, item_ids, users, items, ratings, ts, chunk: int = 100_000) -> None:
    """The state part of ``RankingPolicy.observe`` for every event (the fusion's ``learn`` left out)."""
    state, lm_nb = policy.state, policy.lm_nb
    for a in range(0, len(users), chunk):
        for u, i, r, t in zip(users[a:a + chunk].tolist(), items[a:a + chunk].tolist(),
                              ratings[a:a + chunk].tolist(), ts[a:a + chunk].tolist()):
            user = user_ids(u)
            item = item_ids[i]
            state.update(user, item, r, t)
            lm_nb.learn_one(user, item, r, t)


def _time_requests(policy, users: list[str], ts: float, warmup: int) -> list[float]:
    lat = []
    for n, user in enumerate(users):
        t0 = time.perf_counter()
        recs = policy.recommend(user, 10, ts + n)
        dt = (time.perf_counter() - t0) * 1000
        if len(recs) != 10:
            raise RuntimeError(f"recommend gave {len(recs)} items for {user}")
        if n >= warmup:
            lat.append(dt)
    return lat


def _profile(policy, users: list[str], ts: float, top: int = 15) -> str:
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for n, user in enumerate(users):
        policy.recommend(user, 10, ts + n)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


# ------------------------------------------------------------------------------------- one size


def one_catalogue(n_items: int, policy_cfg: dict, *, knn: str = "auto", profile: int = 0) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    dense = knn != "zero"  # "dense" here: a real store (dense or sparse, as the source picks by size)
    rng = np.random.default_rng(n_items)
    users, items, ratings = synthetic_events(rng, WARM_USERS, WARM_EVENTS, n_items)
    ts = 1.7e9 + 5.0 * np.arange(len(users))
    known = np.zeros(n_items, dtype=bool)
    known[items] = True
    t0 = time.perf_counter()
    policy, item_ids = build_policy(n_items, policy_cfg, known=known, dense_knn=dense)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    head = len(users) - OBSERVED_TAIL
    _feed(policy, lambda u: f"u{u}", item_ids, users[:head], items[:head], ratings[:head], ts[:head])
    for u, i, r, t in zip(users[head:].tolist(), items[head:].tolist(), ratings[head:].tolist(), ts[head:].tolist()):
        policy.observe(f"u{u}", item_ids[i], r, t)
    warm_s = time.perf_counter() - t0
    gc.collect()
    out: dict[str, Any] = {
        "items": n_items, "users": WARM_USERS, "events": int(len(users)), "build_s": build_s, "warm_s": warm_s,
        "rss_mb": proc_status_mb("VmRSS"), "rss_peak_mb": proc_status_mb("VmHWM"),
        "knn": ("sparse" if policy.state.knn.sparse else "dense") if dense else "zero",
        "knn_store_mb": (policy.state.knn.nbytes() + policy.state.knn_seq.nbytes()) / 1e6 if dense else 0.0,
        "text_vectors": "synthetic",
        "fusion": "observed_tail", "fusion_examples": policy.corrector.n_learned,
        "features": len(policy.feature_names), "requests": REQUESTS,
    }
    pick = [f"u{u}" for u in rng.choice(WARM_USERS, size=REQUESTS + WARMUP_REQUESTS, replace=False)]
    t_req = float(ts[-1]) + 60.0
    lat = _time_requests(policy, pick, t_req, WARMUP_REQUESTS)
    if dense:
        out["rank_p50_ms"], out["rank_p99_ms"] = pct(lat, 50), pct(lat, 99)
        if profile:
            print(_profile(policy, pick[:profile], t_req + 10_000), file=sys.stderr, flush=True)
        for src in (policy.state.knn, policy.state.knn_seq):
            _zero_knn_scores(src)
        # fresh users' turn again: the knowledge-model memo holds the last user only
        lat = _time_requests(policy, pick, t_req + 20_000, WARMUP_REQUESTS)
    elif profile:
        print(_profile(policy, pick[:profile], t_req + 10_000), file=sys.stderr, flush=True)
    out["rank_p50_ms_no_knn"], out["rank_p99_ms_no_knn"] = pct(lat, 50), pct(lat, 99)
    return out


def one_users(n_users: int, policy_cfg: dict, *, profile: int = 0) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(n_users)
    users, items, ratings = synthetic_events(rng, n_users, 2 * n_users, USER_SCALE_ITEMS)
    ts = 1.7e9 + np.sort(rng.uniform(0, 30 * 86400.0, size=len(users)))
    known = np.zeros(USER_SCALE_ITEMS, dtype=bool)
    known[items] = True
    t0 = time.perf_counter()
    policy, item_ids = build_policy(USER_SCALE_ITEMS, policy_cfg, known=known)
    build_s = time.perf_counter() - t0
    gc.collect()
    rss0 = proc_status_mb("VmRSS")
    t0 = time.perf_counter()
    _feed(policy, lambda u: f"u{u}", item_ids, users, items, ratings, ts)
    ingest_s = time.perf_counter() - t0
    gc.collect()
    rss1 = proc_status_mb("VmRSS")
    pick = [f"u{u}" for u in rng.choice(n_users, size=USER_REQUESTS + WARMUP_REQUESTS, replace=False)]
    lat = _time_requests(policy, pick, float(ts[-1]) + 60.0, WARMUP_REQUESTS)
    if profile:
        print(_profile(policy, pick[:profile], float(ts[-1]) + 10_000), file=sys.stderr, flush=True)
    return {
        "users": n_users, "items": USER_SCALE_ITEMS, "events": int(len(users)), "build_s": build_s,
        "ingest_s": ingest_s, "state_events_per_s": len(users) / ingest_s, "rss_before_mb": rss0,
        "rss_mb": rss1, "rss_peak_mb": proc_status_mb("VmHWM"),
        "bytes_per_user": (rss1 - rss0) * 2**20 / n_users, "rank_p50_ms": pct(lat, 50), "rank_p99_ms": pct(lat, 99),
        "requests": USER_REQUESTS, "text_vectors": "synthetic",
    }


# ----------------------------------------------------------------------------------------- driver


BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _child(spec: str, policy_cfg: dict, knn: str, blas_threads: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "driftrec.bench.scale", "--one", spec, "--policy", json.dumps(policy_cfg),
           "--knn", knn]
    env = {k: v for k, v in os.environ.items() if not (blas_threads and k in BLAS_ENV)}
    env["HF_HUB_OFFLINE"] = "1"
    if blas_threads:  # read when numpy loads its BLAS: it has to be in the child's environment
        env.update({k: str(blas_threads) for k in BLAS_ENV})
    print(f"   scale {spec} ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
    wall = time.monotonic() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail), "wall_s": wall}
    out = json.loads(lines[-1])
    out["wall_s"] = wall
    print(f"   scale {spec}: {json.dumps(out)}", file=sys.stderr, flush=True)
    return out


def run(settings, repeats: int = 1, *, catalogue=CATALOGUE_SIZES, users=USER_SIZES,
        knn: str = "auto", blas_threads: int = 1) -> list[dict[str, Any]]:
    """``repeats`` runs of every size (each in its own subprocess); one dict per run:
    ``{"catalogue": {"2000": {...}, ...}, "users": {"10000": {...}, ...}, ...}``. ``blas_threads``: numpy's
    BLAS threads in the subprocesses (0: the library's default)."""
    from driftrec.model.ranking.policy import PolicyConfig

    policy_cfg = PolicyConfig.from_settings(settings.ranking).as_dict()
    runs = []
    for _ in range(repeats):
        runs.append({
            "catalogue": {str(n): _child(f"catalogue:{n}", policy_cfg, knn, blas_threads) for n in catalogue},
            "users": {str(u): _child(f"users:{u}", policy_cfg, knn, blas_threads) for u in users},
            "text_vectors": "synthetic", "engine": "policy", "torch_threads": 1,
            "blas_threads": blas_threads or "default",
        })
    return runs


def plot(result: dict[str, Any], png: str | Path) -> Path:
    """Two panels: ranking p99 vs catalogue size, RSS vs users (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(block: dict, key: str):
        pts = sorted((int(n), v[key]) for n, v in block.items() if isinstance(v, dict) and v.get(key) is not None)
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    cat = result.get("catalogue", {})
    x, y = series(cat, "rank_p99_ms")
    a.plot(x, y, "o-", label="recommend p99 (policy as built)")
    x2, y2 = series(cat, "rank_p99_ms_no_knn")
    a.plot(x2, y2, "s--", label="p99 with item-kNN scores zeroed")
    for n, v in cat.items():
        if isinstance(v, dict) and v.get("knn"):
            a.annotate(f"kNN {v['knn']}", (int(n), v.get("rank_p99_ms") or 0), xytext=(4, 4),
                       textcoords="offset points", fontsize=8)
    a.axhline(100, color="grey", lw=0.8, ls=":", label="target 100 ms")
    a.set_xscale("log")
    a.set_xlabel("catalogue items")
    a.set_ylabel("ms")
    a.set_title("recommend p99 vs catalogue (5k warm users, 1 thread)")
    a.legend(fontsize=8)
    x, y = series(result.get("users", {}), "rss_mb")
    b.plot(x, y, "o-")
    for xi, yi in zip(x, y):
        b.annotate(f"{yi:,.0f} MB", (xi, yi), xytext=(4, -12), textcoords="offset points", fontsize=8)
    b.set_xscale("log")
    b.set_xlabel("users (2 events each, 2,000 items)")
    b.set_ylabel("RSS MB")
    b.set_title("worker process RSS vs users")
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m driftrec.bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--one", help="measure one size in this process: catalogue:N or users:U (prints one JSON line)")
    p.add_argument("--policy", help="PolicyConfig as JSON (default: from the settings)")
    p.add_argument("--config", help="YAML settings file")
    p.add_argument("--knn", choices=("auto", "zero"), default="auto",
                   help="item-kNN sources: auto (as built: dense up to 8,192 items, sparse beyond), zero (no counts)")
    p.add_argument("--catalogue", default=",".join(map(str, CATALOGUE_SIZES)), help="catalogue sizes")
    p.add_argument("--users", default=",".join(map(str, USER_SIZES)), help="user counts")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--blas-threads", type=int, default=1,
                   help="numpy BLAS threads in the per-size subprocesses (default 1; 0 = the library default)")
    p.add_argument("--profile", type=int, default=0, help="with --one: cProfile this many requests (to stderr)")
    p.add_argument("--json", help="write the result here (and the plot beside it, .png)")
    args = p.parse_args(argv)

    if args.one:
        kind, _, n = args.one.partition(":")
        if args.policy:
            policy_cfg = json.loads(args.policy)
        else:
            from driftrec.core.settings import Settings
            from driftrec.model.ranking.policy import PolicyConfig

            policy_cfg = PolicyConfig.from_settings(Settings.load(config=args.config).ranking).as_dict()
        if kind == "catalogue":
            out = one_catalogue(int(n), policy_cfg, knn=args.knn, profile=args.profile)
        elif kind == "users":
            out = one_users(int(n), policy_cfg, profile=args.profile)
        else:
            p.error("--one takes catalogue:N or users:U")
        out["loadavg_1m"] = os.getloadavg()[0]  # the machine may be shared: how busy it was at the end
        out["blas_threads_env"] = os.environ.get("OPENBLAS_NUM_THREADS")
        print(json.dumps(out), flush=True)
        return 0

    from driftrec.bench.run import machine, median_of
    from driftrec.core.settings import Settings

    started = time.monotonic()
    sizes = lambda s: tuple(int(x) for x in s.split(",") if x.strip())  # noqa: E731
    runs = run(Settings.load(config=args.config), repeats=args.repeats, catalogue=sizes(args.catalogue),
               users=sizes(args.users), knn=args.knn, blas_threads=args.blas_threads)
    doc: dict[str, Any] = {**median_of(runs), "machine": machine(), "repeats": args.repeats,
                           "command": "python -m driftrec.bench.scale " + " ".join(argv or sys.argv[1:]),
                           "elapsed_s": time.monotonic() - started,
                           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.repeats > 1:
        doc["runs"] = runs
    print(json.dumps(doc, indent=2, default=str))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
        print(f"wrote {out} and {plot(doc, out.with_suffix('.png'))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
