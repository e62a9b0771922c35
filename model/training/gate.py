"""The promotion gate, publishing, online monitoring and rollback of incrementally trained adapters.

* :func:`evaluate_model` - HR@10 / NDCG@10 of a text tower on holdout cases, scored like the scorer scores
  (user text and item text through the same model, dot product of L2-normalised vectors, the user's seen
  items excluded, ties broken in expectation by :func:`driftrec.model.ranking.metrics.rank_metrics`).
* :class:`Gate` - promote a candidate only if it is not worse than the serving adapter beyond
  ``trainer.gate_tolerance`` on both HR@10 and NDCG@10. Every decision is logged and counted
  (``driftrec_gate_decisions_total{decision}``).
* :class:`Publisher` - a promoted candidate becomes a new checkpoint version (:func:`save_checkpoint`),
  is marked active in the :class:`AdapterRegistry` and announced (``AdapterAnnouncement``, action
  ``activate``); a rollback is announced with action ``rollback``.
* :class:`OnlineMonitor` - joins published recommendations with feedback: windowed online HR@10/NDCG@10
  per serving adapter version (``driftrec_online_hr_at_10{model}``), and a River drift detector (ADWIN)
  on the online error (1 - hit) that fires the "train now" trigger.
* :class:`RollbackPolicy` - after a promotion, when the new version's windowed online HR@10 (at least
  ``rollback_min_count`` feedback events) falls below the previous version's beyond
  ``rollback_tolerance``, roll back (``driftrec_rollbacks_total{domain}``).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from driftrec.core import metrics
from driftrec.model.adapters import AdapterRegistry
from driftrec.model.ranking.metrics import rank_metrics
from driftrec.model.lm import embed_texts
from driftrec.model.training.examples import HoldoutCase
from driftrec.core.contracts import AdapterAnnouncement, Item, new_event_id

log = logging.getLogger(__name__)

K = 10


# ----------------------------------------------------------------------------------- offline


class ItemMatrixCache:
    """Item vectors per (model key, catalogue); a model key is e.g. the adapter version."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._data: dict[Any, tuple[tuple[str, ...], torch.Tensor]] = {}

    def get(self, key: Any, model, tokenizer, items: Sequence[Item], max_length: int) -> tuple[dict[str, int], torch.Tensor]:
        ids = tuple(it.item_id for it in items)
        hit = self._data.get(key) if key is not None else None
        if hit is None or hit[0] != ids:
            mat = embed_model_texts(model, tokenizer, [it.text() for it in items], max_length)
            hit = (ids, mat)
            if key is not None:
                self._data[key] = hit
                while len(self._data) > self.size:
                    self._data.pop(next(iter(self._data)))
        return {i: n for n, i in enumerate(ids)}, hit[1]


def embed_model_texts(model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 64) -> torch.Tensor:
    """Embeddings as the scorer computes them: bf16 autocast where the device supports it (as serving does)."""
    from driftrec.model.lm import cpu_supports_bf16

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    use_bf16 = device.type == "cuda" or cpu_supports_bf16()
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            vec = embed_texts(model, tokenizer, list(texts), batch_size=batch_size, max_length=max_length)
    finally:
        if was_training:
            model.train()
    return vec.to("cpu", torch.float32)


def evaluate_model(
    model,
    tokenizer,
    items: Sequence[Item],
    cases: Sequence[HoldoutCase],
    *,
    max_length: int = 64,
    user_max_length: int | None = None,
    k: int = K,
    item_cache: ItemMatrixCache | None = None,
    cache_key: Any = None,
) -> dict[str, float]:
    """Mean HR@k and NDCG@k over ``cases`` (each ranks every catalogue item but the user's seen ones)."""
    if not cases:
        return {"hr@10": float("nan"), "ndcg@10": float("nan"), "n": 0}
    if item_cache is not None:
        index, mat = item_cache.get(cache_key, model, tokenizer, items, max_length)
    else:
        index = {it.item_id: n for n, it in enumerate(items)}
        mat = embed_model_texts(model, tokenizer, [it.text() for it in items], max_length)
    texts = list(dict.fromkeys(c.user_text for c in cases))
    uvec = embed_model_texts(model, tokenizer, texts, user_max_length or max_length)
    upos = {t: n for n, t in enumerate(texts)}
    scores_all = (uvec @ mat.T).numpy()
    hrs, ndcgs = [], []
    for c in cases:
        t = index.get(c.target)
        if t is None:
            continue
        allowed = np.ones(len(index), dtype=bool)
        for s in c.seen:
            j = index.get(s)
            if j is not None:
                allowed[j] = False
        hr, nd = rank_metrics(scores_all[upos[c.user_text]], t, allowed, k)
        hrs.append(hr)
        ndcgs.append(nd)
    if not hrs:
        return {"hr@10": float("nan"), "ndcg@10": float("nan"), "n": 0}
    return {"hr@10": float(np.mean(hrs)), "ndcg@10": float(np.mean(ndcgs)), "n": len(hrs)}


@dataclass
class GateDecision:
    promote: bool
    reason: str
    candidate: dict[str, float]
    serving: dict[str, float]
    serving_version: str | None = None
    version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Gate:
    """Candidate vs serving adapter on the same holdout: promote unless worse beyond ``tolerance``."""

    def __init__(self, tolerance: float = 0.02, *, min_cases: int = 1) -> None:
        self.tolerance = float(tolerance)
        self.min_cases = int(min_cases)
        self.decisions: list[GateDecision] = []

    def decide(self, candidate: Mapping[str, float], serving: Mapping[str, float], *,
               serving_version: str | None = None) -> GateDecision:
        c_hr, c_nd = candidate.get("hr@10", float("nan")), candidate.get("ndcg@10", float("nan"))
        s_hr, s_nd = serving.get("hr@10", float("nan")), serving.get("ndcg@10", float("nan"))
        n = int(candidate.get("n", 0) or 0)
        if n < self.min_cases or math.isnan(c_hr) or math.isnan(c_nd):
            promote, reason = False, f"too few holdout cases ({n})"
        elif math.isnan(s_hr):
            promote, reason = True, "no serving baseline"
        elif c_hr < s_hr - self.tolerance:
            promote, reason = False, f"HR@10 {c_hr:.4f} < serving {s_hr:.4f} - {self.tolerance}"
        elif c_nd < s_nd - self.tolerance:
            promote, reason = False, f"NDCG@10 {c_nd:.4f} < serving {s_nd:.4f} - {self.tolerance}"
        else:
            promote, reason = True, f"HR@10 {c_hr:.4f} vs serving {s_hr:.4f}, NDCG@10 {c_nd:.4f} vs {s_nd:.4f}"
        d = GateDecision(promote, reason, dict(candidate), dict(serving), serving_version)
        self.decisions.append(d)
        metrics.GATE_DECISIONS.labels(decision="promote" if promote else "reject").inc()
        log.info("gate %s (serving %s): %s", "PROMOTE" if promote else "REJECT", serving_version, reason)
        return d


# ------------------------------------------------------------------------------- publishing

Announce = Callable[[AdapterAnnouncement], Any]
_VERSION_RE = re.compile(r"^v(\d+)$")


class Publisher:
    """Versions, saves and announces adapters of one domain."""

    def __init__(self, adapter_dir: str | Path, domain: str, announce: Announce | None = None, *,
                 keep_versions: int = 0) -> None:
        self.adapter_dir = Path(adapter_dir)
        self.keep_versions = keep_versions
        self.domain = domain
        self.registry = AdapterRegistry(self.adapter_dir)
        self.announce_fn = announce
        self.announced: list[AdapterAnnouncement] = []

    def next_version(self) -> str:
        nums = [int(m.group(1)) for e in self.registry.versions(self.domain) if (m := _VERSION_RE.match(e.version))]
        return f"v{(max(nums) + 1 if nums else 1):05d}"

    def active(self) -> str | None:
        return self.registry.active(self.domain)

    def _announce(self, ann: AdapterAnnouncement) -> Any:
        self.announced.append(ann)
        if self.announce_fn is None:
            return None
        return self.announce_fn(ann)

    def publish(self, trainer, manifest_extra: Mapping[str, Any] | None = None) -> tuple[str, Path, Any]:
        """Save ``trainer``'s adapter as the next version, mark it active, announce it."""
        version = self.next_version()
        path = trainer.save(self.adapter_dir, self.domain, version, manifest_extra)
        self.registry.mark_active(self.domain, version)
        self.registry.prune(self.domain, self.keep_versions)
        ann = AdapterAnnouncement(event_id=new_event_id(), event_time=time.time(), domain=self.domain,
                                  version=version, path=str(path), action="activate")
        log.info("published adapter %s/%s at %s", self.domain, version, path)
        return version, path, self._announce(ann)

    def rollback(self) -> tuple[str | None, Any]:
        """Mark the previous version active and announce ``rollback``; (None, None) without one."""
        current = self.registry.active(self.domain)
        target = self.registry.mark_rolled_back(self.domain)
        if target is None:
            return None, None
        metrics.ROLLBACKS.labels(domain=self.domain).inc()
        metrics.GATE_DECISIONS.labels(decision="rollback").inc()
        ann = AdapterAnnouncement(event_id=new_event_id(), event_time=time.time(), domain=self.domain,
                                  version=target, path=str(self.registry.path_for(self.domain, target)),
                                  action="rollback")
        log.warning("rollback of %s: %s -> %s", self.domain, current, target)
        return target, self._announce(ann)


# ----------------------------------------------------------------------------------- online


@dataclass
class _Window:
    hits: deque = field(default_factory=deque)
    ndcg: deque = field(default_factory=deque)
    total: int = 0


class OnlineMonitor:
    """Online HR@10/NDCG@10 of published recommendations, per serving adapter version.

    :meth:`on_recommendation` remembers what was shown to a user (and by which adapter version);
    :meth:`on_feedback` scores the next positive interaction of that user against it. A River drift
    detector watches the error stream (1 - hit); ``on_drift`` callbacks are the "train now" trigger.
    """

    def __init__(self, window: int = 200, *, k: int = K, detector=None, min_updates: int = 50,
                 max_age_s: float = 3600.0) -> None:
        from driftrec.model.drift import DriftMonitor

        self.window = int(window)
        self.k = int(k)
        self.max_age_s = max_age_s
        self.pending: dict[str, tuple[tuple[str, ...], str, float]] = {}
        self.by_request: dict[str, tuple[tuple[str, ...], str, float]] = {}
        self.windows: dict[str, _Window] = {}
        self.drift = DriftMonitor(detector, min_updates=min_updates, name="online_hr")
        self.feedback = 0

    def on_drift(self, callback) -> None:
        self.drift.on_drift(callback)

    def on_recommendation(self, rec: Any) -> None:
        data = rec.asdict() if hasattr(rec, "asdict") else rec
        if not isinstance(data, Mapping) or not isinstance(data.get("user_id"), str):
            return
        ids = tuple(i.get("item_id") if isinstance(i, Mapping) else getattr(i, "item_id", "") for i in data.get("items") or [])
        version = str(data.get("adapter_version") or "base")
        entry = (ids[: self.k], version, float(data.get("event_time") or 0.0))
        self.pending[data["user_id"]] = entry
        if isinstance(data.get("request_id"), str):
            self.by_request[data["request_id"]] = entry
            if len(self.by_request) > 100_000:
                self.by_request.pop(next(iter(self.by_request)))

    def on_feedback(self, user_id: str, item_id: str, *, positive: bool = True, event_time: float | None = None,
                    recommendation_id: str | None = None) -> tuple[float, str] | None:
        """Record a positive interaction against the last recommendation shown; (hit, version) or None."""
        if not positive:
            return None
        entry = self.by_request.get(recommendation_id) if recommendation_id else None
        if entry is None:
            entry = self.pending.get(user_id)
        if entry is None:
            return None
        ids, version, t = entry
        if event_time is not None and t and event_time - t > self.max_age_s:
            return None
        hit = 1.0 if item_id in ids else 0.0
        nd = 1.0 / math.log2(ids.index(item_id) + 2) if hit else 0.0
        self.record(version, hit, nd)
        return hit, version

    def record(self, version: str, hit: float, ndcg: float | None = None) -> None:
        w = self.windows.setdefault(version, _Window())
        w.hits.append(float(hit))
        w.ndcg.append(float(hit if ndcg is None else ndcg))
        w.total += 1
        while len(w.hits) > self.window:
            w.hits.popleft()
            w.ndcg.popleft()
        self.feedback += 1
        hr, nd, _ = self.metrics(version)
        metrics.ONLINE_HR_AT_10.labels(model="served").set(hr)
        metrics.ONLINE_NDCG_AT_10.labels(model="served").set(nd)
        self.drift.update(1.0 - float(hit))

    def metrics(self, version: str) -> tuple[float, float, int]:
        w = self.windows.get(version)
        if w is None or not w.hits:
            return float("nan"), float("nan"), 0
        return float(np.mean(w.hits)), float(np.mean(w.ndcg)), len(w.hits)


class RollbackPolicy:
    """Roll back a promotion whose online HR@10 falls below the previous version's (windowed)."""

    def __init__(self, min_count: int = 50, tolerance: float = 0.02) -> None:
        self.min_count = int(min_count)
        self.tolerance = float(tolerance)

    def should_rollback(self, monitor: OnlineMonitor, active: str | None, previous: str | None) -> tuple[bool, str]:
        if not active or not previous:
            return False, "no previous version"
        a_hr, _, a_n = monitor.metrics(active)
        p_hr, _, p_n = monitor.metrics(previous)
        if a_n < self.min_count or p_n < self.min_count:
            return False, f"too few online events ({active}: {a_n}, {previous}: {p_n})"
        if a_hr < p_hr - self.tolerance:
            return True, f"online HR@10 of {active} {a_hr:.4f} < {previous} {p_hr:.4f} - {self.tolerance}"
        return False, f"online HR@10 of {active} {a_hr:.4f} vs {previous} {p_hr:.4f}"
