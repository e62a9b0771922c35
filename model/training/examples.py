"""Training examples for incremental adapter updates, built from the event stream.

One role: turn a time-ordered stream of interactions (clicks, ratings) and of the recommendations that
were shown into :class:`DriftExample` records for :class:`driftrec.model.training.drift_trainer.DriftTrainer`, and into
holdout cases for :mod:`driftrec.model.training.gate`.

* A **positive** is a click or a rating ``>= positive_threshold`` (4). Its user side is the user's history
  *before* the event, rendered exactly as the scorer renders it (:func:`driftrec.model.serving.scorer.render_history`,
  newest first), so the adapter is trained on the text it will be served with.
* Ratings below the threshold are kept as rating-only examples (used by the optional rating head).
* **Hard negatives** are items of the last recommendation shown to the user (matched by
  ``recommendation_id`` when the feedback carries one) that the user did not choose.
* **History augmentation** (training set only): item dropout, reordering of neighbouring items and masking
  of items, each producing an extra copy of an example.
"""

from __future__ import annotations

import json
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from driftrec.model.base import HistoryEntry, UserContext
from driftrec.model.text import render_history
from driftrec.model.training.trainer import TrainingExample
from driftrec.core.contracts import Click, Item, Rating
from driftrec.core.interactions import CLICK, RATING, Interaction

MASK_TOKEN = "[MASK]"


@dataclass(frozen=True)
class DriftExample(TrainingExample):
    """A training example with its label kind: positive (click / high rating), rating, hard negatives."""

    positive: bool = True
    rating: float | None = None
    hard_negatives: tuple[str, ...] = ()


@dataclass(frozen=True)
class HoldoutCase:
    """One positive of the newest events: the user text before it, the chosen item, the user's seen items."""

    user_text: str
    target: str
    seen: tuple[str, ...]
    user_id: str = ""
    event_index: int = 0


def interaction_from(event: Any) -> Interaction | None:
    """An :class:`Interaction` from a Click/Rating record or a wire dict; None for anything else."""
    if isinstance(event, (Click, Rating)):
        return Interaction(event.user_id, event.item_id, getattr(event, "rating", None), float(event.event_time),
                           event.event_id, event.domain, event.recommendation_id)
    if isinstance(event, Mapping):
        kind = event.get("type")
        user, item = event.get("user_id"), event.get("item_id")
        if kind not in (CLICK, RATING) or not isinstance(user, str) or not isinstance(item, str):
            return None
        rating = event.get("rating") if kind == RATING else None
        if kind == RATING and (isinstance(rating, bool) or not isinstance(rating, (int, float))):
            return None
        t = event.get("event_time")
        return Interaction(user, item, None if rating is None else float(rating),
                           float(t) if isinstance(t, (int, float)) else 0.0, str(event.get("event_id") or ""),
                           event.get("domain"), event.get("recommendation_id"))
    return None


def decode(value: bytes | str | None) -> dict | None:
    try:
        data = json.loads(value) if value is not None else None
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def augment_history(history: Sequence[HistoryEntry], rng: random.Random, kind: str | None = None,
                    rate: float = 0.25) -> tuple[tuple[HistoryEntry, ...], str]:
    """One augmented copy of a (newest first) history: ``dropout``, ``reorder`` or ``mask``."""
    hist = list(history)
    kind = kind or rng.choice(("dropout", "reorder", "mask"))
    if len(hist) < 2:
        return tuple(hist), kind
    if kind == "dropout":
        kept = [h for h in hist if rng.random() >= rate]
        hist = kept or [hist[0]]
    elif kind == "reorder":
        for i in range(len(hist) - 1):  # local swaps: recency is roughly kept
            if rng.random() < rate * 2:
                hist[i], hist[i + 1] = hist[i + 1], hist[i]
    else:
        hist = [HistoryEntry(MASK_TOKEN, h.rating, h.event_time) if rng.random() < rate else h for h in hist]
    return tuple(hist), kind


class ExampleBuilder:
    """Keeps per-user histories and shown recommendations; turns interactions into examples.

    Feed events in time order with :meth:`observe` (interactions and recommendations, wire dicts or
    records). ``lookup`` maps an item id to its :class:`Item` (the catalogue); interactions with unknown
    items are skipped (no text to learn from).
    """

    def __init__(
        self,
        lookup: Callable[[str], Item | None],
        *,
        history_items: int = 10,
        hard_negatives: int = 4,
        positive_threshold: float = 4.0,
        augment: bool = False,
        augment_prob: float = 0.3,
        seed: int = 0,
        keep_history: int = 50,
    ) -> None:
        self.lookup = lookup
        self.history_items = int(history_items)
        self.hard_negatives = int(hard_negatives)
        self.positive_threshold = float(positive_threshold)
        self.augment = bool(augment)
        self.augment_prob = float(augment_prob)
        self._rng = random.Random(seed)
        self.keep_history = keep_history
        self.histories: dict[str, deque[HistoryEntry]] = {}
        self.shown_by_user: dict[str, tuple[str, ...]] = {}
        self.shown_by_request: dict[str, tuple[str, ...]] = {}
        self.augmented = 0
        self.skipped_unknown = 0

    # ---------------------------------------------------------------------------- state

    def history(self, user_id: str) -> tuple[HistoryEntry, ...]:
        """The user's history, newest first."""
        return tuple(reversed(self.histories.get(user_id, ())))

    def context(self, user_id: str, domain: str | None = None, history: Sequence[HistoryEntry] | None = None) -> UserContext:
        hist = self.history(user_id) if history is None else tuple(history)
        return UserContext(user_id, hist[: self.history_items], domain=domain)

    def user_text(self, user_id: str, history: Sequence[HistoryEntry] | None = None) -> str:
        return render_history(self.context(user_id, history=history), self.lookup, self.history_items)

    def observe_recommendation(self, rec: Any) -> None:
        data = rec.asdict() if hasattr(rec, "asdict") else rec
        if not isinstance(data, Mapping):
            return
        user = data.get("user_id")
        items = data.get("items") or []
        ids = tuple(i.get("item_id") if isinstance(i, Mapping) else getattr(i, "item_id", None) for i in items)
        ids = tuple(i for i in ids if isinstance(i, str))
        if not isinstance(user, str) or not ids:
            return
        self.shown_by_user[user] = ids
        rid = data.get("request_id")
        if isinstance(rid, str):
            self.shown_by_request[rid] = ids
            if len(self.shown_by_request) > 100_000:
                self.shown_by_request.pop(next(iter(self.shown_by_request)))

    def _remember(self, it: Interaction) -> None:
        h = self.histories.setdefault(it.user_id, deque(maxlen=self.keep_history))
        h.append(HistoryEntry(it.item_id, it.rating, it.event_time))

    # ----------------------------------------------------------------------------- building

    def is_positive(self, it: Interaction) -> bool:
        return it.rating is None or it.rating >= self.positive_threshold

    def _hard_negatives(self, it: Interaction, seen: set[str]) -> tuple[str, ...]:
        if self.hard_negatives <= 0:
            return ()
        shown = None
        if it.recommendation_id:
            shown = self.shown_by_request.get(it.recommendation_id)
        if shown is None:
            shown = self.shown_by_user.get(it.user_id, ())
        out = []
        for iid in shown:
            if iid == it.item_id or iid in seen:
                continue
            item = self.lookup(iid)
            if item is not None:
                out.append(item.text())
            if len(out) >= self.hard_negatives:
                break
        return tuple(out)

    def add(self, event: Any, *, train: bool = True) -> list[DriftExample]:
        """Examples for one interaction (built from the history before it), then record it.

        Returns [] for non-interactions and unknown items. With ``train`` and augmentation on, an
        augmented copy may follow the example.
        """
        it = event if isinstance(event, Interaction) else interaction_from(event)
        if it is None:
            if isinstance(event, Mapping) and event.get("type") == "recommendation":
                self.observe_recommendation(event)
            return []
        item = self.lookup(it.item_id)
        if item is None:
            self.skipped_unknown += 1
            return []
        hist = self.history(it.user_id)
        positive = self.is_positive(it)
        out: list[DriftExample] = []
        seen = {h.item_id for h in hist}
        hard = self._hard_negatives(it, seen) if positive else ()
        base = DriftExample(self.user_text(it.user_id, hist), item.text(), positive, it.rating, hard)
        out.append(base)
        if train and self.augment and hist and self._rng.random() < self.augment_prob:
            aug, _kind = augment_history(hist[: self.history_items], self._rng)
            out.append(DriftExample(self.user_text(it.user_id, aug), item.text(), positive, it.rating, hard))
            self.augmented += 1
        self._remember(it)
        return out

    def holdout_case(self, event: Any, index: int = 0) -> HoldoutCase | None:
        """A gate/evaluation case for a positive interaction (history before it), then record it."""
        it = event if isinstance(event, Interaction) else interaction_from(event)
        if it is None:
            if isinstance(event, Mapping) and event.get("type") == "recommendation":
                self.observe_recommendation(event)
            return None
        if self.lookup(it.item_id) is None:
            return None
        hist = self.history(it.user_id)
        case = None
        seen = tuple(h.item_id for h in hist if h.item_id != it.item_id)
        if self.is_positive(it) and it.item_id not in {h.item_id for h in hist}:
            case = HoldoutCase(self.user_text(it.user_id, hist), it.item_id, seen, it.user_id, index)
        self._remember(it)
        return case


@dataclass
class TrainingSet:
    examples: list[DriftExample] = field(default_factory=list)
    holdout: list[HoldoutCase] = field(default_factory=list)
    interactions: int = 0
    positives: int = 0
    window: dict[str, Any] = field(default_factory=dict)


def build_training_set(
    events: Iterable[Any],
    builder: ExampleBuilder,
    *,
    holdout_frac: float = 0.2,
) -> TrainingSet:
    """Examples from the older events and gate cases from the newest ``holdout_frac`` of interactions.

    Events must be in time order (recommendations interleaved). The holdout is later in time than every
    training example, so the gate measures what the candidate would do next.
    """
    evs = list(events)
    inter_idx = [n for n, e in enumerate(evs) if (interaction_from(e) is not None)]
    ts = TrainingSet(interactions=len(inter_idx))
    if not inter_idx:
        return ts
    n_hold = max(1, int(round(len(inter_idx) * holdout_frac))) if len(inter_idx) > 1 else 0
    cut = inter_idx[len(inter_idx) - n_hold] if n_hold else len(evs)
    times = []
    for n, e in enumerate(evs):
        it = interaction_from(e)
        if it is not None:
            times.append(it.event_time)
        if n < cut:
            exs = builder.add(e, train=True)
            ts.examples.extend(exs)
            ts.positives += sum(1 for x in exs[:1] if x.positive)
        else:
            case = builder.holdout_case(e, n)
            if case is not None:
                ts.holdout.append(case)
    ts.window = {"start": min(times) if times else None, "end": max(times) if times else None,
                 "events": len(inter_idx), "train_examples": len(ts.examples), "holdout": len(ts.holdout)}
    return ts
