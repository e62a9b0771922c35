"""Items and users as text: what the language model reads, one rendering for training and serving.

``render_history`` renders a :class:`~driftrec.model.base.UserContext` (newest first, "(rated 4/5)" or
"(clicked)") for the scorer's user tower and the training examples built from the stream;
``render_user_text`` renders (item, rating) pairs for the offline replay.
"""

from __future__ import annotations

from typing import Callable, Sequence

from driftrec.core.contracts import Item
from driftrec.model.base import UserContext

COLD_START_TEXT = "A new user with no history yet."




def short_item_text(item: Item) -> str:
    """An item for the user tower: title, year, genres, tags (no description, to stay short)."""
    text = item.title
    if item.year:
        text += f" ({item.year})"
    if item.genres:
        text += " [" + ", ".join(item.genres[:4]) + "]"
    if item.tags:
        text += " tags: " + ", ".join(item.tags[:4])
    return text


def render_history(
    context: UserContext, lookup: Callable[[str], Item | None], max_items: int = 10
) -> str:
    """The user's recent history as text, newest first, with ratings/clicks and optional free text."""
    parts = []
    if context.text and context.text.strip():
        parts.append(f"Looking for: {context.text.strip()[:500]}.")
    lines = []
    for entry in context.history[:max_items]:
        item = lookup(entry.item_id)
        desc = short_item_text(item) if item is not None else entry.item_id
        if entry.rating is None:
            lines.append(f"{desc} (clicked)")
        else:
            lines.append(f"{desc} (rated {entry.rating:g}/5)")
    if lines:
        parts.append("Recently, newest first: " + "; ".join(lines) + ".")
    return " ".join(parts) if parts else COLD_START_TEXT


def render_user_text(history: Sequence[tuple[object, float | None]], max_items: int = 10) -> str:
    """A user's recent history as text, newest first.

    ``history`` is oldest first, as (Item, rating or None) pairs; only the last ``max_items`` are used.
    """
    parts = []
    for item, rating in list(history)[-max_items:][::-1]:
        title = getattr(item, "title", str(item))
        year = getattr(item, "year", None)
        genres = getattr(item, "genres", None) or []
        s = f"{title} ({year})" if year else str(title)
        if genres:
            s += " [" + ", ".join(genres[:3]) + "]"
        if rating is not None:
            s += f" rated {rating:g}"
        parts.append(s)
    return "recently watched: " + "; ".join(parts) if parts else "new user"
