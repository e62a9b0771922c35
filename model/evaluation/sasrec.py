"""SASRec, the sequential baseline a user would otherwise pick (Kang & McAuley, 2018).

Item-id embeddings only (no LM text, no graph), two causal self-attention blocks, hidden size 64, all
interactions as the sequence, next-item prediction with a full softmax over the catalogue, retrained
periodically over the replay and warm-started each time - the same protocol as driftrec's knowledge
model, which with ``text=False, kg=None`` *is* this architecture (:mod:`driftrec.model.knowledge.seqrec`).
"""

from __future__ import annotations

from typing import Any, Sequence

from driftrec.model.knowledge.seqrec import KnowledgeTrainer

#: SASRec's settings under prequential-v1 on ML-100K (tuned in this protocol; see docs/knowledge_model.md)
SASREC_DEFAULTS: dict[str, Any] = {"dim": 64, "blocks": 2, "heads": 1, "maxlen": 50, "dropout": 0.2, "lr": 2e-3,
                                   "init_epochs": 30, "epochs": 5}


class SASRecTrainer(KnowledgeTrainer):
    def __init__(self, item_ids: Sequence[str], *, seed: int = 0, **options: Any) -> None:
        super().__init__({}, item_ids, text=False, kg=None, seed=seed, name="sasrec", **{**SASREC_DEFAULTS, **options})
