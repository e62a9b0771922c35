"""``python -m driftrec.bench.knowledge``: the knowledge model's cost on ML-100K, on a CPU or a GPU.

Measures the trainer of the ranking policy's knowledge model (:mod:`driftrec.model.knowledge.seqrec`:
frozen LM text vectors + TransE graph entities + item ids, SASRec-style encoder) on the whole ML-100K log:
the LM forward over every item text, the first fit (``init_epochs``) and an incremental fit (``epochs``)
on ``--device``; then the served snapshot on the CPU (one thread): a whole-catalogue ranking per user
(p50/p99 ms) with its leave-last-out HR@10/NDCG@10 (a sanity figure, not the prequential protocol of
``driftrec evaluate``), and the cost of the served matmul + top-100 over synthetic catalogues of 2k, 20k
and 100k items.

It reads ML-100K's ``u.data``/``u.item``/``u.genre`` itself and needs only torch, numpy and an LM
folder, so it runs on a GPU machine that has nothing else installed::

    python -m driftrec.bench.knowledge --data ../shared/datasets/ml-100k --kg ../shared/datasets/ml-100k-kg \
        --device cuda --json bench/results/knowledge_cuda.json
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

from driftrec.model.knowledge.graph import load_kg
from driftrec.model.knowledge.seqrec import KnowledgeTrainer


class _Item:
    def __init__(self, iid, title, genres):
        self.item_id, self.title, self.genres = iid, title, genres

    def text(self):
        return f"{self.title}. Genres: {', '.join(self.genres)}."


def load(folder):
    genres = [l.split("|")[0] for l in open(f"{folder}/u.genre", encoding="latin-1").read().splitlines() if l.strip()]
    items = {}
    for line in open(f"{folder}/u.item", encoding="latin-1"):
        f = line.rstrip("\n").split("|")
        items[f[0]] = _Item(f[0], f[1], [g for g, x in zip(genres, f[5:]) if x == "1"])
    events = []
    for line in open(f"{folder}/u.data"):
        u, i, r, t = line.split()
        events.append((int(t), u, i, float(r)))
    events.sort()
    return items, events


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m driftrec.bench.knowledge", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="ML-100K folder (u.data, u.item, u.genre)")
    p.add_argument("--kg", default=None, help="its knowledge graph folder (*.kg + *.link); none: no graph")
    p.add_argument("--device", default="cpu", help="where the trainer runs: cpu, cuda (default cpu)")
    p.add_argument("--model-path", default=None, help="LM folder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--init-epochs", type=int, default=30)
    p.add_argument("--json", required=True, help="write the figures here")
    args = p.parse_args(argv)
    device = args.device
    items, events = load(args.data)
    hist = {}
    for t, u, i, r in events:
        hist.setdefault(u, []).append((i, r))
    train = [(u, h[:-1]) for u, h in hist.items() if len(h) > 1]
    test = [(u, [i for i, _ in h[:-1]], h[-1][0]) for u, h in hist.items() if len(h) > 1]
    item_ids = list(items)
    report = {"device": device, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "cpus": os.cpu_count(), "init_epochs": args.init_epochs, "interactions": len(events), "items": len(items), "users": len(hist)}
    kg = load_kg(args.kg, item_ids=item_ids, titles={i: it.title for i, it in items.items()}) if args.kg else None
    report["kg"] = args.kg


    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()


    t0 = time.perf_counter()
    trainer = KnowledgeTrainer(items, item_ids, text=True, kg=kg, kg_alpha=0.1, seed=0, model_path=args.model_path,
                               device=device, init_epochs=args.init_epochs)
    sync()
    report["trainer_build_s"] = time.perf_counter() - t0
    report["text_embed_s"] = trainer.text_seconds
    t0 = time.perf_counter()
    st = trainer.fit(train, initial=True)
    sync()
    report["fit_initial_s"] = time.perf_counter() - t0
    report["fit_initial"] = {k: v for k, v in st.items() if k != "seconds"}
    t0 = time.perf_counter()
    st2 = trainer.fit(train)
    sync()
    report["fit_incremental_s"] = time.perf_counter() - t0
    report["fit_incremental"] = {k: v for k, v in st2.items() if k != "seconds"}
    model = trainer.model()  # the served snapshot: on the CPU
    hits = ndcg = 0.0
    lat = []
    index = model.index
    torch.set_num_threads(1)
    for n, (u, h, target) in enumerate(test):
        t1 = time.perf_counter()
        s = model.score_items(h, [None] * len(h), item_ids)
        s[[index[i] for i in h]] = -np.inf
        lat.append((time.perf_counter() - t1) * 1000)
        rank = int(np.sum(s > s[index[target]]))
        if rank < 10:
            hits += 1
            ndcg += 1 / math.log2(rank + 2)
    report["leave_last_out_hr@10"] = hits / len(test)
    report["leave_last_out_ndcg@10"] = ndcg / len(test)
    report["served_whole_catalogue_ms_p50"] = float(np.percentile(lat, 50))
    report["served_whole_catalogue_ms_p99"] = float(np.percentile(lat, 99))
    # scale: the served matmul + top-k over synthetic catalogues (1 CPU thread)
    h = model.user_vector(test[0][1])
    for n_items in (2_000, 20_000, 100_000):
        table = torch.randn(n_items, h.shape[0])
        ts = []
        for _ in range(200):
            t1 = time.perf_counter()
            with torch.no_grad():
                sc = table @ h
                torch.topk(sc, 100)
            ts.append((time.perf_counter() - t1) * 1000)
        report[f"topk100_ms_p99_{n_items}"] = float(np.percentile(ts, 99))
    print(json.dumps(report, indent=1))
    with open(args.json, "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
