"""One user-item interaction (a click or a rating), the form every layer shares.

The streaming feature state (:mod:`driftrec.streams.state`), the trainer's example builder
(:mod:`driftrec.model.training.examples`) and the offline replay (:mod:`driftrec.model.evaluation`)
all read the same :class:`Interaction`. It is a ``NamedTuple``: the features stage builds one per
inbound event, and a tuple is the cheapest object to build and read.

A click is an interaction without a rating; :attr:`Interaction.kind` is derived from that, so a
``"rating"`` interaction always carries its rating. (Inbound Rating records must have one:
:mod:`driftrec.core.validation` rejects a rating event without it.)

This is an in-process value, never a wire format: what goes to topics and changelogs
(``ItemDelta``, ``forward_record``, the state tables) is written by the modules that own those formats.
"""

from __future__ import annotations

from typing import NamedTuple

# The kinds, as the event contracts spell their types (``Click.TYPE``, ``Rating.TYPE``).
CLICK = "click"
RATING = "rating"


class Interaction(NamedTuple):
    """A click (``rating`` None) or a rating of ``item_id`` by ``user_id`` at ``event_time``.

    Build it positionally on hot paths (keywords cost more):
    ``Interaction(user_id, item_id, rating, event_time, event_id, domain, recommendation_id, source, offset)``.
    """

    user_id: str
    item_id: str
    rating: float | None  # None = click
    event_time: float  # seconds since the epoch (MovieLens: its unix timestamp)
    event_id: str = ""
    domain: str | None = None
    recommendation_id: str | None = None
    source: str = ""  # source partition id on the stream, e.g. "c3" (clicks partition 3), "r3"
    offset: int = -1  # offset in that partition; -1 = not from a partition (replays, tests)

    @property
    def kind(self) -> str:
        """``"click"`` or ``"rating"`` (:data:`CLICK` / :data:`RATING`), from whether there is a rating."""
        return CLICK if self.rating is None else RATING

    # read-only aliases, the names the offline replay reads (``e.user``, ``e.item``, ``e.timestamp``)
    @property
    def user(self) -> str:
        return self.user_id

    @property
    def item(self) -> str:
        return self.item_id

    @property
    def timestamp(self) -> float:
        return self.event_time
