"""In-memory item catalogue: item_id -> :class:`driftrec.core.contracts.Item`, per domain.

The scorer reads item texts from here. Writers (the items-topic agent, ``POST /v1/items``, tests) call
:meth:`Catalogue.upsert`; readers take an immutable :class:`CatalogueView` of one domain, so a reader
never sees a half-applied update. Every change bumps the domain's version, which the scorer uses to
know when item vectors need refreshing.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping

from driftrec.core.contracts import Item, new_event_id, now
from driftrec.core.validation import MAX_ID_LEN


@dataclass(frozen=True)
class CatalogueView:
    """A consistent, read-only view of one domain at one version."""

    domain: str
    version: int
    items: Mapping[str, Item]

    def get(self, item_id: str) -> Item | None:
        return self.items.get(item_id)

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.items


def item_from_dict(data: Mapping[str, Any], default_domain: str = "default") -> Item:
    """Build an :class:`Item` from a plain dict (wire JSON); missing event fields are filled in."""
    if not isinstance(data, Mapping):
        raise ValueError("an item must be a JSON object")
    item_id = data.get("item_id")
    title = data.get("title")
    if not isinstance(item_id, str) or not item_id or len(item_id) > MAX_ID_LEN:
        raise ValueError(f"item.item_id must be a non-empty string (at most {MAX_ID_LEN} chars)")
    if not isinstance(title, str) or not title:
        raise ValueError(f"item {item_id!r}: title must be a non-empty string")
    genres = data.get("genres") or []
    tags = data.get("tags") or []
    if not isinstance(genres, list) or not all(isinstance(g, str) for g in genres):
        raise ValueError(f"item {item_id!r}: genres must be a list of strings")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError(f"item {item_id!r}: tags must be a list of strings")
    year = data.get("year")
    if year is not None and (not isinstance(year, int) or isinstance(year, bool)):
        raise ValueError(f"item {item_id!r}: year must be an integer")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise ValueError(f"item {item_id!r}: description must be a string")
    domain = data.get("domain") or default_domain
    if not isinstance(domain, str):
        raise ValueError(f"item {item_id!r}: domain must be a string")
    vector = data.get("vector")
    if vector is not None:
        if not isinstance(vector, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in vector
        ):
            raise ValueError(f"item {item_id!r}: vector must be a list of numbers")
        vector = [float(v) for v in vector]
    event_time = data.get("event_time")
    return Item(
        event_id=str(data.get("event_id") or new_event_id()),
        event_time=float(event_time) if isinstance(event_time, (int, float)) else now(),
        item_id=item_id,
        title=title,
        genres=list(genres),
        year=year,
        tags=list(tags),
        description=description,
        domain=domain,
        vector=vector,
    )


def _content(item: Item) -> dict[str, Any]:
    """An item without its event envelope: a redelivered, unchanged item is not a change."""
    data = item.asdict()
    data.pop("event_id", None)
    data.pop("event_time", None)
    return data


class Catalogue:
    """Thread-safe, versioned item store. Updates are copy-on-write per domain."""

    def __init__(self, items: Iterable[Item] = (), default_domain: str = "default") -> None:
        self.default_domain = default_domain
        self._lock = threading.Lock()
        self._views: dict[str, CatalogueView] = {}
        self._listeners: list[Callable[[str, int], None]] = []
        if items:
            self.upsert(items)

    # -- reading -------------------------------------------------------------------------------
    def view(self, domain: str | None = None) -> CatalogueView:
        domain = domain or self.default_domain
        view = self._views.get(domain)
        return view if view is not None else CatalogueView(domain, 0, MappingProxyType({}))

    def get(self, item_id: str, domain: str | None = None) -> Item | None:
        return self.view(domain).get(item_id)

    def domains(self) -> list[str]:
        return sorted(self._views)

    def version(self, domain: str | None = None) -> int:
        return self.view(domain).version

    def __len__(self) -> int:
        return sum(len(v) for v in self._views.values())

    # -- writing -------------------------------------------------------------------------------
    def upsert(self, items: Iterable[Item]) -> dict[str, int]:
        """Insert or replace items (newest write wins). Returns {domain: new version} for changed domains."""
        by_domain: dict[str, list[Item]] = {}
        for item in items:
            by_domain.setdefault(item.domain or self.default_domain, []).append(item)
        changed: dict[str, int] = {}
        with self._lock:
            for domain, batch in by_domain.items():
                old = self._views.get(domain)
                data = dict(old.items) if old else {}
                dirty = False
                for item in batch:
                    prev = data.get(item.item_id)
                    if prev is None or _content(prev) != _content(item):
                        data[item.item_id] = item
                        dirty = True
                if dirty:
                    version = (old.version if old else 0) + 1
                    self._views[domain] = CatalogueView(domain, version, MappingProxyType(data))
                    changed[domain] = version
            listeners = list(self._listeners)
        for domain, version in changed.items():
            for fn in listeners:
                fn(domain, version)
        return changed

    def remove(self, item_ids: Iterable[str], domain: str | None = None) -> int:
        domain = domain or self.default_domain
        with self._lock:
            old = self._views.get(domain)
            if old is None:
                return 0
            data = dict(old.items)
            removed = sum(1 for i in list(item_ids) if data.pop(i, None) is not None)
            if removed:
                self._views[domain] = CatalogueView(domain, old.version + 1, MappingProxyType(data))
            listeners = list(self._listeners)
            version = self._views[domain].version
        if removed:
            for fn in listeners:
                fn(domain, version)
        return removed

    def add_listener(self, fn: Callable[[str, int], None]) -> None:
        """Call ``fn(domain, version)`` after each change (from the writer's thread)."""
        with self._lock:
            self._listeners.append(fn)

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_items(cls, items: Iterable[Item], default_domain: str = "default") -> "Catalogue":
        return cls(list(items), default_domain=default_domain)

    def load_dicts(self, rows: Iterable[Mapping[str, Any]]) -> dict[str, int]:
        return self.upsert(item_from_dict(r, self.default_domain) for r in rows)

    def load_jsonl(self, path: str | Path) -> dict[str, int]:
        """Load items from a JSON-lines file (one item object per line; blank lines skipped)."""
        rows = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
        return self.load_dicts(rows)
