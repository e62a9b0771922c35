"""Event contracts: what apps produce and what driftrec publishes.

Every event is a JSON object on the wire (no Faust metadata, so any language can produce it) with:

* ``schema_version`` - the contract version (this module is version 1);
* ``type`` - the event type (``click``, ``rating``, ``item``, ``recommendation_request``,
  ``recommendation``, ``dead_letter``, ``adapter``);
* ``event_id`` - unique per event, used for idempotence (redeliveries are counted once);
* ``event_time`` - when it happened, unix seconds (float).

Inbound events are validated by :mod:`driftrec.core.validation` before anything acts on them; these
classes are the typed form a validated event takes. They are ``faust.Record`` classes where Faust is
installed (the worker) and :class:`driftrec.core.records.Record` ones in the client-only install.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

try:
    from faust import Record
except ImportError:  # the client-only install (``pip install driftrec``): the same contracts on a small base
    from driftrec.core.records import Record

SCHEMA_VERSION = 1


def new_event_id() -> str:
    return uuid.uuid4().hex


class Event(Record, abstract=True, serializer="json", include_metadata=False):
    """Fields every event carries."""

    TYPE = ""

    event_id: str
    event_time: float

    def to_wire(self) -> dict[str, Any]:
        data = self.asdict()
        data["type"] = self.TYPE
        data["schema_version"] = SCHEMA_VERSION
        return _plain(data)

    def key(self) -> str:
        """The partitioning key (user id; item id for catalogue entries)."""
        return getattr(self, "user_id")


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return _plain(value.asdict())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class Click(Event, serializer="json", include_metadata=False):
    TYPE = "click"

    user_id: str
    item_id: str
    # Set when the click is feedback on a recommendation driftrec made.
    recommendation_id: str | None = None
    domain: str | None = None


class Rating(Event, serializer="json", include_metadata=False):
    TYPE = "rating"
    MIN = 0.0
    MAX = 5.0

    user_id: str
    item_id: str
    rating: float
    recommendation_id: str | None = None
    domain: str | None = None


class Item(Event, serializer="json", include_metadata=False):
    """A catalogue entry. The items topic is compacted: the newest entry per item id wins."""

    TYPE = "item"

    item_id: str
    title: str
    genres: list[str] = []
    year: int | None = None
    tags: list[str] = []
    description: str = ""
    domain: str = "default"
    # Optional precomputed vector (e.g. an image embedding) for multi-modal scoring.
    vector: list[float] | None = None

    def key(self) -> str:
        return self.item_id

    def text(self) -> str:
        """The item as text for the language model."""
        parts = [self.title]
        if self.year:
            parts.append(f"({self.year})")
        if self.genres:
            parts.append("genres: " + ", ".join(self.genres))
        if self.tags:
            parts.append("tags: " + ", ".join(self.tags))
        if self.description:
            parts.append(self.description)
        return " ".join(parts)


class RecommendationRequest(Event, serializer="json", include_metadata=False):
    TYPE = "recommendation_request"

    user_id: str
    k: int = 10
    domain: str | None = None
    exclude_seen: bool = True
    candidates: list[str] | None = None


class RecommendedItem(Record, serializer="json", include_metadata=False):
    item_id: str
    score: float
    reason: str = ""


class Recommendation(Event, serializer="json", include_metadata=False):
    """Published to the recommendations topic; ``request_id`` is the request's ``event_id``."""

    TYPE = "recommendation"

    request_id: str
    user_id: str
    items: list[RecommendedItem]
    model_version: str = ""
    adapter_version: str = ""
    domain: str = "default"
    fallback: bool = False
    produced_at: float = 0.0


class DeadLetter(Event, serializer="json", include_metadata=False):
    """A rejected input: the original bytes (base64) and why it was rejected."""

    TYPE = "dead_letter"

    reason: str
    source_topic: str
    original_b64: str  # the first ``stream.dead_letter_max_bytes`` of the record (all of it unless truncated)
    source_partition: int | None = None
    source_offset: int | None = None
    original_key_b64: str | None = None
    original_bytes: int = 0  # the record's full size
    truncated: bool = False  # True when original_b64 holds only the first bytes (the source offset finds the rest)

    def key(self) -> str:
        return self.source_topic


class AdapterAnnouncement(Event, serializer="json", include_metadata=False):
    """A new adapter checkpoint is ready (published by the trainer, consumed by scorers)."""

    TYPE = "adapter"

    domain: str
    version: str
    path: str
    action: str = "activate"  # activate | rollback
    signature: str = ""  # HMAC-SHA256 of the deciding fields (driftrec.core.signing)

    def key(self) -> str:
        return self.domain


INBOUND_TYPES: dict[str, type[Event]] = {
    cls.TYPE: cls for cls in (Click, Rating, Item, RecommendationRequest)
}
ALL_TYPES: dict[str, type[Event]] = {
    cls.TYPE: cls
    for cls in (Click, Rating, Item, RecommendationRequest, Recommendation, DeadLetter, AdapterAnnouncement)
}


def now() -> float:
    return time.time()
