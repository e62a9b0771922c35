"""One fit of the knowledge model's variants on a prefix of a MovieLens log, then next-item HR@10 on the
events after it: a quick look at the sequence models alone, outside the prequential protocol.

    python docs/experiments/knowledge_model_probe.py --data ../shared/datasets/ml-100k \
        --kg ../shared/datasets/ml-100k-kg --train 50000 --test 10000 --variants sasrec,text,kg,full [--serve-mask-only]

Each variant is trained once (``init_epochs``, one torch thread, seed 0) on the first ``--train`` events;
then, for every later positive (rating >= 4) on an item new to the user within the next ``--test`` events,
all items the user has not had are ranked from the user's history so far. Printed per variant: HR@10, and how
many of the ten places went to items without an id row (no interaction in the training prefix).
``--serve-mask-only`` trains the way the model did before 2026-12-08 (those items' id rows present in
training, masked in serving), to show the train/serve skew (docs/knowledge_model.md).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from driftrec.model.evaluation.movielens import load
from driftrec.model.evaluation.prequential import EvalConfig, load_eval_kg
from driftrec.model.knowledge import seqrec
from driftrec.model.knowledge.seqrec import KnowledgeTrainer


def _serve_mask_only(self):  # the pre-2026-12-08 ItemRepresentation.forward
    w = self.id_emb.weight
    if not self.training:
        w = w * self.id_known.float().unsqueeze(-1)
    return self.ln(w + self.content(getattr(self, "text", None), getattr(self, "item_entity", None),
                                    getattr(self, "linked", None)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--format", default="ml-100k")
    ap.add_argument("--kg")
    ap.add_argument("--train", type=int, default=50000)
    ap.add_argument("--test", type=int, default=10000)
    ap.add_argument("--variants", default="sasrec,text,kg,full")
    ap.add_argument("--serve-mask-only", action="store_true")
    args = ap.parse_args()
    if args.serve_mask_only:
        seqrec.ItemRepresentation.forward = _serve_mask_only
    torch.set_num_threads(1)
    log_ = load(args.data, args.format)
    items, ids = log_.items, list(log_.items)
    kg = load_eval_kg(EvalConfig(kg=args.kg), log_) if args.kg else None
    hist: dict[str, list] = {}
    for e in log_.events[:args.train]:
        hist.setdefault(e.user, []).append((e.item, e.rating))
    kinds = {"sasrec": (False, None), "text": (True, None), "kg": (False, kg), "full": (True, kg)}
    for v in args.variants.split(","):
        text, graph = kinds[v]
        if graph is None and v in ("kg", "full") and kg is None:
            raise SystemExit(f"variant {v} needs --kg")
        t0 = time.time()
        trainer = KnowledgeTrainer(items if text else {}, ids, text=text, kg=graph, seed=0)
        trainer.fit(list(hist.items()), initial=True)
        model = trainer.model()
        known = model.net.items.id_known.numpy()
        cur = {u: [i for i, _ in h] for u, h in hist.items()}
        hits = unknown = n = 0
        for e in log_.events[args.train:args.train + args.test]:
            h = cur.setdefault(e.user, [])
            if e.rating >= 4 and e.item not in h and h:
                s = np.asarray(model.score_items(h, [None] * len(h), ids), dtype=float)
                s[[model.index[i] for i in h]] = -np.inf
                top = np.argsort(-s)[:10]
                n += 1
                hits += int(model.index[e.item] in top)
                unknown += int((~known[top]).sum())
            h.append(e.item)
        print(f"{v}: HR@10 {hits / n:.4f} ({n} tests), items without an id row per top 10 {unknown / n:.2f}, "
              f"{time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
