"""Feature state: pure, deterministic, idempotent (no Faust, no Feast, no I/O).

The features stage keeps one :class:`UserState` per user (in the user-partitioned table) and one
:class:`ItemState` per item (in the item-partitioned table) and turns them into feature rows.

Idempotence, in two layers (at-least-once delivery everywhere; no exactly-once on this broker):

* **Users, by event id.** A user state remembers the ids of its newest ``dedupe_ids`` events and
  where each was first read (``position``: source topic code, partition, offset). An event whose id
  is remembered is not applied again: *redelivered* when read at the same position (a crash between
  the state write and the offset commit replays the same records), *duplicate* when read elsewhere
  (a producer retry, an app replaying its log). An unknown id older than everything the memory has
  forgotten (``seen_floor``) cannot be told apart from a duplicate and is skipped as *late*.
  The memory lives in the state, so it survives restarts with it (changelogged table).
* **Items, by source offset.** Interactions reach the item state re-keyed by item id (forwarded
  by the user stage, which drops duplicates and late events first). Each item state keeps, per
  source partition, the highest source offset applied; a forwarded interaction at or below it is a
  replay (the user stage forwarded it again after a crash) and is skipped. This needs O(partitions)
  memory per item instead of a per-item id set.

Order independence: the features are the same whatever order events of an entity arrive in (counts,
sums, max times, "top-N distinct recent items by their newest time", popularity decayed to the
newest event time), so a late or replayed event yields the same result as in-order delivery.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

CLICK = "click"
RATING = "rating"
GENRE_PROFILE_TOP = 5


class Verdict(enum.Enum):
    NEW = "new"                  # applied
    REDELIVERED = "redelivered"  # same event, same source position: already applied
    DUPLICATE = "duplicate"      # same event id from another position: never applied twice
    LATE = "late"                # older than the dedupe memory reaches: skipped


@dataclass(frozen=True)
class Interaction:
    """A click or rating in the form the state needs."""

    event_id: str
    event_time: float
    user_id: str
    item_id: str
    kind: str  # CLICK | RATING
    rating: float | None = None
    source: str = ""  # source partition id, e.g. "c3" (clicks partition 3), "r3"
    offset: int = -1

    @property
    def position(self) -> str:
        return f"{self.source}:{self.offset}"


def source_code(topic_code: str, partition: int) -> str:
    return f"{topic_code}{partition}"


@dataclass
class UserState:
    click_count: int = 0
    rating_count: int = 0
    rating_sum: float = 0.0
    last_event_time: float = 0.0
    # [item_id, newest interaction time], newest first, distinct items, at most recent_items
    recent: list[list] = field(default_factory=list)
    # event_id -> "position event_time" (one string: cheap to serialize, which happens per batch)
    seen: dict[str, str] = field(default_factory=dict)
    seen_floor: float = float("-inf")

    def check(self, ev: Interaction) -> Verdict:
        hit = self.seen.get(ev.event_id)
        if hit is not None:
            return Verdict.REDELIVERED if hit.partition(" ")[0] == ev.position else Verdict.DUPLICATE
        if ev.event_time <= self.seen_floor:
            return Verdict.LATE
        return Verdict.NEW

    def apply(self, ev: Interaction, *, recent_items: int = 20, dedupe_ids: int = 512) -> Verdict:
        verdict = self.check(ev)
        if verdict is not Verdict.NEW:
            return verdict
        if ev.kind == RATING:
            self.rating_count += 1
            self.rating_sum += float(ev.rating)
        else:
            self.click_count += 1
        if ev.event_time > self.last_event_time:
            self.last_event_time = ev.event_time
        self._add_recent(ev.item_id, ev.event_time, recent_items)
        self.seen[ev.event_id] = f"{ev.position} {ev.event_time!r}"
        if len(self.seen) > dedupe_ids + max(dedupe_ids // 4, 1):
            self._trim_seen(dedupe_ids)
        return verdict

    def _add_recent(self, item_id: str, t: float, limit: int) -> None:
        recent = self.recent
        if not recent or t > recent[0][1]:  # the common case, in-order events: newest goes first
            for n, entry in enumerate(recent):
                if entry[0] == item_id:
                    del recent[n]
                    break
            recent.insert(0, [item_id, t])
            del recent[limit:]
            return
        for entry in recent:
            if entry[0] == item_id:
                if t <= entry[1]:
                    return
                entry[1] = t
                break
        else:
            recent.append([item_id, t])
        # newest first; ties broken by item id so the order never depends on arrival
        recent.sort(key=_recent_order)
        del recent[limit:]

    def _trim_seen(self, keep: int) -> None:
        by_time = sorted(((float(v.rpartition(" ")[2]), eid) for eid, v in self.seen.items()))
        for t, eid in by_time[: len(by_time) - keep]:
            del self.seen[eid]
            if t > self.seen_floor:
                self.seen_floor = t

    @property
    def mean_rating(self) -> float:
        return self.rating_sum / self.rating_count if self.rating_count else 0.0

    @property
    def recent_item_ids(self) -> list[str]:
        return [e[0] for e in self.recent]

    def feature_row(self, user_id: str, genres_of: Callable[[str], Sequence[str] | None]) -> dict:
        return {
            "user_id": user_id,
            "recent_items": json.dumps(self.recent_item_ids, separators=(",", ":")),
            "click_count": self.click_count,
            "rating_count": self.rating_count,
            "mean_rating": self.mean_rating,
            "last_event_time": self.last_event_time,
            "genre_profile": json.dumps(genre_profile(self.recent_item_ids, genres_of), separators=(",", ":")),
        }

    # -- serialization (compact JSON; the table stores bytes)
    def dumps(self) -> bytes:
        return json.dumps({
            "c": self.click_count, "r": self.rating_count, "rs": self.rating_sum, "t": self.last_event_time,
            "rec": self.recent, "seen": self.seen,
            "fl": None if self.seen_floor == float("-inf") else self.seen_floor,
        }, separators=(",", ":")).encode()

    @classmethod
    def loads(cls, raw: bytes | None) -> "UserState":
        if not raw:
            return cls()
        d = json.loads(raw)
        return cls(d["c"], d["r"], d["rs"], d["t"], d["rec"], d["seen"],
                   float("-inf") if d.get("fl") is None else d["fl"])


def _recent_order(e: list) -> tuple:
    return (-e[1], e[0])


def genre_profile(item_ids: Iterable[str], genres_of: Callable[[str], Sequence[str] | None],
                  top: int = GENRE_PROFILE_TOP) -> dict[str, float]:
    """Top genres over the items, each item's weight split evenly over its genres; weights sum to 1."""
    mass: dict[str, float] = {}
    for iid in item_ids:
        genres = genres_of(iid)
        if not genres:
            continue
        if len(genres) == 1:
            g = genres[0]
            if g:
                mass[g] = mass.get(g, 0.0) + 1.0
            continue
        genres = [g for g in dict.fromkeys(genres) if g]
        if not genres:
            continue
        w = 1.0 / len(genres)
        for g in genres:
            mass[g] = mass.get(g, 0.0) + w
    if not mass:
        return {}
    best = sorted(mass.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    total = sum(w for _, w in best)
    return {g: round(w / total, 6) for g, w in best}


@dataclass(frozen=True)
class ItemDelta:
    """One interaction forwarded to the item-partitioned stage."""

    item_id: str
    kind: str
    rating: float | None
    event_time: float
    source: str
    offset: int

    def to_list(self) -> list:
        return [self.item_id, self.kind, self.rating, self.event_time, self.source, self.offset]

    @classmethod
    def from_list(cls, v: Sequence) -> "ItemDelta":
        return cls(str(v[0]), str(v[1]), None if v[2] is None else float(v[2]), float(v[3]), str(v[4]), int(v[5]))

    @classmethod
    def of(cls, ev: Interaction) -> "ItemDelta":
        return cls(ev.item_id, ev.kind, ev.rating, ev.event_time, ev.source, ev.offset)


@dataclass
class ItemState:
    click_count: int = 0
    rating_count: int = 0
    rating_sum: float = 0.0
    popularity_total: int = 0
    popularity_decayed: float = 0.0
    popularity_time: float = 0.0
    last_event_time: float = 0.0
    # source partition -> highest source offset applied
    hw: dict[str, int] = field(default_factory=dict)

    def apply(self, d: ItemDelta, *, half_life_s: float) -> bool:
        """Apply one interaction; False when it was applied before (source offset at or below hw)."""
        if d.offset <= self.hw.get(d.source, -1):
            return False
        self.hw[d.source] = d.offset
        if d.kind == RATING:
            self.rating_count += 1
            self.rating_sum += float(d.rating)
        else:
            self.click_count += 1
        self.popularity_total += 1
        t = d.event_time
        if self.popularity_total == 1:
            self.popularity_decayed, self.popularity_time = 1.0, t
        elif t >= self.popularity_time:
            self.popularity_decayed = self.popularity_decayed * _decay(t - self.popularity_time, half_life_s) + 1.0
            self.popularity_time = t
        else:  # late event: add its contribution as seen from the newest time
            self.popularity_decayed += _decay(self.popularity_time - t, half_life_s)
        if t > self.last_event_time:
            self.last_event_time = t
        return True

    @property
    def mean_rating(self) -> float:
        return self.rating_sum / self.rating_count if self.rating_count else 0.0

    def feature_row(self, item_id: str) -> dict:
        return {
            "item_id": item_id,
            "click_count": self.click_count,
            "rating_count": self.rating_count,
            "popularity_total": self.popularity_total,
            "popularity_decayed": self.popularity_decayed,
            "popularity_time": self.popularity_time,
            "mean_rating": self.mean_rating,
            "last_event_time": self.last_event_time,
        }

    def dumps(self) -> bytes:
        return json.dumps([self.click_count, self.rating_count, self.rating_sum, self.popularity_total,
                           self.popularity_decayed, self.popularity_time, self.last_event_time, self.hw],
                          separators=(",", ":")).encode()

    @classmethod
    def loads(cls, raw: bytes | None) -> "ItemState":
        if not raw:
            return cls()
        v = json.loads(raw)
        return cls(*v)


def _decay(dt: float, half_life_s: float) -> float:
    return math.pow(2.0, -dt / half_life_s)
