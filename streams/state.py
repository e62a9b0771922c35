"""Feature state: pure, deterministic, idempotent (no Faust, no Feast, no I/O).

The features stage keeps one :class:`UserState` per user (in the user-partitioned table) and one
:class:`ItemState` per item (in the item-partitioned table) and turns them into feature rows.

Idempotence (at-least-once delivery everywhere; no exactly-once on this broker), per entity:

* **Redelivery, by source offset.** Every state keeps, per source partition (``c3`` = clicks
  partition 3, ``r3`` …), the highest offset it has handled. A record at or below it was handled
  before: a crash or a rebalance between the state write and the offset commit replays it
  (*redelivered*). This is exact and costs O(partitions) per entity. An offset means something
  only on the broker that assigned it: a broker that lost its log (the embedded Tansu keeps topics
  in memory) numbers a partition from 0 again. So a mark's source carries the broker's *epoch* (a
  short hash of its cluster id; the embedded broker gets a new cluster id at every start):
  ``c3@1f2e3d4c``. A mark of another epoch (or an old one without any, ``c3``) does not vouch for
  offsets of this broker; it is retired when the first mark of the same partition in the new epoch
  is set. (Records of the same broker redelivered right after an upgrade from marks without an
  epoch are still caught by the event-id memory below.) The stage re-writes the state
  and the row of a redelivered entity (the crash may have come before they were durable); it need
  not forward the interaction again, because a user state is persisted only after its forwards to
  the item stage are acknowledged (:mod:`driftrec.streams.agents.features`).
* **Duplicates, by event id** (users). The same event under a new offset - a producer retry, an app
  re-sending its log - is recognised by its id: a user state remembers 64-bit hashes of its newest
  ``dedupe_ids`` event ids. An unknown id whose event is older than everything the memory has
  forgotten (``seen_floor``) cannot be told apart from a duplicate and is skipped as *late*.
  Interactions reach the item states only through the user stage, which drops duplicates first.

Order independence: features are the same whatever order an entity's events arrive in (counts, sums,
max times, "top-N distinct recent items by their newest time", popularity decayed to the newest
event time), so a late event yields the same result as in-order delivery.

States serialize compactly (orjson; a user's id memory as packed binary): the stage re-writes every
touched state once per batch, so encoding is on the hot path, and the memory (``stream.dedupe_ids``)
is most of a user state's changelog record.
"""

from __future__ import annotations

import enum
import hashlib
import math
import struct
from array import array
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple, Sequence

import orjson

from driftrec.core.interactions import CLICK, RATING, Interaction

GENRE_PROFILE_TOP = 5


class Verdict(enum.Enum):
    NEW = "new"                  # applied
    REDELIVERED = "redelivered"  # this record was applied before (offset at or below the entity's mark)
    DUPLICATE = "duplicate"      # same event id from another record: never applied twice
    LATE = "late"                # older than the dedupe memory reaches: skipped


def source_code(topic_code: str, partition: int, epoch: str | None = None) -> str:
    """``c3``, or ``c3@<epoch>`` with the broker's epoch (see the module docstring)."""
    return f"{topic_code}{partition}@{epoch}" if epoch else f"{topic_code}{partition}"


def _set_mark(hw: dict[str, int], source: str, offset: int) -> None:
    """``hw[source] = offset``; a new source retires the marks of the same partition in other epochs."""
    if source not in hw:
        base = source.partition("@")[0]
        for old in [k for k in hw if k.partition("@")[0] == base]:
            del hw[old]
    hw[source] = offset


def id_hash(event_id: str) -> int:
    """A stable 64-bit hash of an event id (the same in every process, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little")


_LEN = struct.Struct("<I")


@dataclass
class UserState:
    click_count: int = 0
    rating_count: int = 0
    rating_sum: float = 0.0
    last_event_time: float = 0.0
    # [item_id, newest interaction time], newest first, distinct items, at most recent_items
    recent: list[list] = field(default_factory=list)
    # source partition -> highest offset handled
    hw: dict[str, int] = field(default_factory=dict)
    # event-id hash -> event time, for the newest dedupe_ids events
    seen: dict[int, float] = field(default_factory=dict)
    seen_floor: float = float("-inf")
    # ``seen`` packed in the same order, kept up to date so that ``dumps`` only copies bytes
    _hashes: array = field(default=None, compare=False, repr=False)
    _times: array = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self._hashes is None:
            self._pack_seen()

    def _pack_seen(self) -> None:
        self._hashes, self._times = array("Q", self.seen.keys()), array("d", self.seen.values())

    def check(self, ev: Interaction) -> Verdict:
        if ev.offset <= self.hw.get(ev.source, -1):
            return Verdict.REDELIVERED
        if id_hash(ev.event_id) in self.seen:
            return Verdict.DUPLICATE
        if ev.event_time <= self.seen_floor:
            return Verdict.LATE
        return Verdict.NEW

    def apply(self, ev: Interaction, *, recent_items: int = 20, dedupe_ids: int = 128) -> Verdict:
        if ev.offset <= self.hw.get(ev.source, -1):
            return Verdict.REDELIVERED
        h = id_hash(ev.event_id)
        if h in self.seen:
            verdict = Verdict.DUPLICATE
        elif ev.event_time <= self.seen_floor:
            verdict = Verdict.LATE
        else:
            verdict = Verdict.NEW
        if ev.offset >= 0:
            _set_mark(self.hw, ev.source, ev.offset)  # this record is handled, whatever the verdict
        if verdict is not Verdict.NEW:
            return verdict
        if ev.rating is not None:  # ev.kind == RATING, without the property call
            self.rating_count += 1
            self.rating_sum += float(ev.rating)
        else:
            self.click_count += 1
        if ev.event_time > self.last_event_time:
            self.last_event_time = ev.event_time
        self._add_recent(ev.item_id, ev.event_time, recent_items)
        self.seen[h] = ev.event_time
        self._hashes.append(h)
        self._times.append(ev.event_time)
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
        by_time = sorted(self.seen.items(), key=lambda kv: (kv[1], kv[0]))
        cut = len(by_time) - keep
        for _h, t in by_time[:cut]:
            if t > self.seen_floor:
                self.seen_floor = t
        self.seen = dict(by_time[cut:])
        self._pack_seen()

    @property
    def mean_rating(self) -> float:
        return self.rating_sum / self.rating_count if self.rating_count else 0.0

    @property
    def recent_item_ids(self) -> list[str]:
        return [e[0] for e in self.recent]

    def feature_row(self, user_id: str, weights_of: Callable[[str], Weights]) -> dict:
        """The user's feature row; ``weights_of(item)`` gives an item's :func:`genre_weights` (cached by the caller)."""
        ids = self.recent_item_ids
        return {
            "user_id": user_id,
            "recent_items": orjson.dumps(ids).decode(),
            "click_count": self.click_count,
            "rating_count": self.rating_count,
            "mean_rating": self.mean_rating,
            "last_event_time": self.last_event_time,
            "genre_profile": orjson.dumps(profile(map(weights_of, ids))).decode(),
        }

    # -- serialization (the table stores bytes; every touched state is written once per batch)
    def dumps(self) -> bytes:
        """A length-prefixed JSON header, then the id memory as packed uint64 hashes and float64 times."""
        header = orjson.dumps([self.click_count, self.rating_count, self.rating_sum, self.last_event_time,
                               self.recent, self.hw,
                               None if self.seen_floor == float("-inf") else self.seen_floor])
        return b"".join((_LEN.pack(len(header)), header, _LEN.pack(len(self._hashes)),
                         self._hashes.tobytes(), self._times.tobytes()))

    @classmethod
    def loads(cls, raw: bytes | None) -> "UserState":
        if not raw:
            return cls()
        (n,) = _LEN.unpack_from(raw, 0)
        c, r, rs, t, recent, hw, floor = orjson.loads(raw[4:4 + n])
        pos = 4 + n
        (k,) = _LEN.unpack_from(raw, pos)
        pos += 4
        hashes, times = array("Q"), array("d")
        hashes.frombytes(raw[pos:pos + 8 * k])
        times.frombytes(raw[pos + 8 * k:pos + 16 * k])
        return cls(c, r, rs, t, recent, hw, dict(zip(hashes, times)), float("-inf") if floor is None else floor,
                   hashes, times)


def _recent_order(e: list) -> tuple:
    return (-e[1], e[0])


Weights = tuple  # ((genre, weight), ...) of one item: its distinct genres, weights summing to 1


def genre_weights(genres: Sequence[str] | None) -> Weights:
    """An item's genres as ``((genre, 1/n), ...)`` - distinct, non-empty, in catalogue order."""
    if not genres:
        return ()
    distinct = [g for g in dict.fromkeys(genres) if g]
    w = 1.0 / len(distinct) if distinct else 0.0
    return tuple((g, w) for g in distinct)


def profile(item_weights: Iterable[Weights], top: int = GENRE_PROFILE_TOP) -> dict[str, float]:
    """Top genres over the items' weights, renormalised to sum to 1 (6 decimals)."""
    mass: dict[str, float] = {}
    for weights in item_weights:
        for g, w in weights:
            if g in mass:
                mass[g] += w
            else:
                mass[g] = w
    if not mass:
        return {}
    best = sorted(mass.items(), key=_profile_order)[:top]
    total = sum(w for _, w in best)
    return {g: round(w / total, 6) for g, w in best}


def _profile_order(kv: tuple) -> tuple:
    return (-kv[1], kv[0])


def genre_profile(item_ids: Iterable[str], genres_of: Callable[[str], Sequence[str] | None],
                  top: int = GENRE_PROFILE_TOP) -> dict[str, float]:
    """Top genres over the items, each item's weight split evenly over its genres; weights sum to 1."""
    return profile((genre_weights(genres_of(i)) for i in item_ids), top)


class ItemDelta(NamedTuple):
    """One interaction forwarded to the item-partitioned stage."""

    item_id: str
    kind: str
    rating: float | None
    event_time: float
    source: str
    offset: int

    def to_list(self) -> list:
        return list(self)

    @classmethod
    def from_list(cls, v: Sequence) -> "ItemDelta":
        return cls(str(v[0]), str(v[1]), None if v[2] is None else float(v[2]), float(v[3]), str(v[4]), int(v[5]))

    @classmethod
    def of(cls, ev: Interaction) -> "ItemDelta":
        r = ev.rating
        return cls(ev.item_id, CLICK if r is None else RATING, r, ev.event_time, ev.source, ev.offset)


def forward_record(ev: Interaction) -> list:
    """``ItemDelta.of(ev).to_list()`` without the intermediate tuple (the user stage's hot path).

    The wire form is ``[item_id, kind, rating, event_time, source, offset]`` (:meth:`ItemDelta.from_list`);
    ``kind`` is ``ev.kind``, spelled out here to spare the property call.
    """
    r = ev.rating
    return [ev.item_id, CLICK if r is None else RATING, r, ev.event_time, ev.source, ev.offset]


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
        _set_mark(self.hw, d.source, d.offset)
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
        return orjson.dumps([self.click_count, self.rating_count, self.rating_sum, self.popularity_total,
                             self.popularity_decayed, self.popularity_time, self.last_event_time, self.hw])

    @classmethod
    def loads(cls, raw: bytes | None) -> "ItemState":
        if not raw:
            return cls()
        return cls(*orjson.loads(raw))


def _decay(dt: float, half_life_s: float) -> float:
    return math.pow(2.0, -dt / half_life_s)
