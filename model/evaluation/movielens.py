"""Loading MovieLens-format rating logs into one in-memory form.

Formats:

* ``ml-100k``: ``u.data`` (tab-separated ``user item rating unix-time``) and ``u.item`` (pipe-separated,
  latin-1: ``id|title|release date|video date|url|19 genre flags``), genre names from ``u.genre``;
* ``ml-latest`` (also ml-latest-small, ml-25m, ...): ``ratings.csv`` (``userId,movieId,rating,timestamp``)
  and ``movies.csv`` (``movieId,title,genres`` with ``|``-separated genres, titles like ``Name (1995)``);
* ``auto``: whichever of the two the folder holds.

Whatever the format, the result is a :class:`RatingLog`: events sorted by timestamp with a *stable* sort
(ties keep file order, so two runs over the same files replay the same sequence) and a catalogue
``item id -> Item``. Missing or malformed files raise :class:`DataError` naming the file and line.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from driftrec.core.contracts import Item
from driftrec.core.interactions import Interaction

FORMATS = ("ml-100k", "ml-latest", "auto")

# The 19 ML-100K genres, in flag order, for when u.genre is absent.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)

_YEAR_IN_TITLE = re.compile(r"^(.*?)\s*\((\d{4})(?:[-–]\d{0,4})?\)\s*$")
_YEAR_IN_DATE = re.compile(r"(\d{4})\s*$")


class DataError(ValueError):
    """A data file is missing or malformed."""


@dataclass
class RatingLog:
    """Events (timestamp order, stable) and the item catalogue."""

    events: list[Interaction]
    items: dict[str, Item]
    format: str = ""
    source: str = ""
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[Interaction]:
        return iter(self.events)

    @property
    def users(self) -> list[str]:
        return sorted({e.user for e in self.events})

    def head(self, n: int) -> "RatingLog":
        """The first ``n`` events (in time order), same catalogue."""
        return RatingLog(self.events[:n], self.items, self.format, self.source, dict(self.extra))


def split_title(title: str) -> tuple[str, int | None]:
    """``"Toy Story (1995)"`` -> ``("Toy Story", 1995)``; no year -> ``(title, None)``."""
    title = title.strip()
    m = _YEAR_IN_TITLE.match(title)
    if m and m.group(1):
        return m.group(1).strip(), int(m.group(2))
    return title, None


def make_item(item_id: str, title: str, genres: list[str], year: int | None) -> Item:
    return Item(event_id=f"catalogue-{item_id}", event_time=0.0, item_id=item_id, title=title,
                genres=list(genres), year=year)


def _sorted(events: list[Interaction]) -> list[Interaction]:
    return sorted(events, key=lambda e: e.timestamp)  # list.sort is stable


def _require(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"missing data file {path}")
    return path


def _number(value: str, kind, path: Path, lineno: int, what: str):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise DataError(f"{path}:{lineno}: {what} {value!r} is not a number") from None


# ------------------------------------------------------------------------------------ ml-100k


def _read_genres_100k(path: Path) -> list[str]:
    if not path.is_file():
        return list(ML100K_GENRES)
    names: dict[int, str] = {}
    with path.open(encoding="latin-1") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            name, sep, idx = line.rpartition("|")
            if not sep or not idx.strip().isdigit():
                raise DataError(f"{path}:{lineno}: expected 'name|index', got {line!r}")
            names[int(idx)] = name
    return [names[i] for i in sorted(names)]


def load_ml100k(folder: str | Path) -> RatingLog:
    folder = Path(folder)
    data_path = _require(folder / "u.data")
    item_path = _require(folder / "u.item")
    genre_names = _read_genres_100k(folder / "u.genre")
    n_genres = len(genre_names)

    items: dict[str, Item] = {}
    with item_path.open(encoding="latin-1") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("|")
            if len(parts) != 5 + n_genres:
                raise DataError(
                    f"{item_path}:{lineno}: expected {5 + n_genres} '|'-separated fields, got {len(parts)}"
                )
            item_id = parts[0].strip()
            if not item_id:
                raise DataError(f"{item_path}:{lineno}: empty item id")
            flags = parts[5:]
            if any(f not in ("0", "1") for f in flags):
                raise DataError(f"{item_path}:{lineno}: genre flags must be 0/1")
            title, year = split_title(parts[1])
            if year is None:
                m = _YEAR_IN_DATE.search(parts[2].strip())
                year = int(m.group(1)) if m else None
            genres = [g for g, f in zip(genre_names, flags) if f == "1" and g != "unknown"]
            items[item_id] = make_item(item_id, title, genres, year)

    events: list[Interaction] = []
    with data_path.open(encoding="latin-1") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 4:
                raise DataError(f"{data_path}:{lineno}: expected 4 tab-separated fields, got {len(parts)}")
            user, item, rating, ts = parts
            events.append(Interaction(user, item, _number(rating, float, data_path, lineno, "rating"),
                                      _number(ts, float, data_path, lineno, "timestamp")))
    _fill_unknown_items(events, items)
    return RatingLog(_sorted(events), items, "ml-100k", str(folder))


# ---------------------------------------------------------------------------------- ml-latest


def load_ml_latest(folder: str | Path) -> RatingLog:
    folder = Path(folder)
    ratings_path = _require(folder / "ratings.csv")
    movies_path = _require(folder / "movies.csv")

    items: dict[str, Item] = {}
    with movies_path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["movieId", "title", "genres"]:
            raise DataError(f"{movies_path}:1: expected header 'movieId,title,genres', got {header!r}")
        for row in reader:
            lineno = reader.line_num
            if not row:
                continue
            if len(row) != 3:
                raise DataError(f"{movies_path}:{lineno}: expected 3 fields, got {len(row)}")
            item_id = row[0].strip()
            if not item_id:
                raise DataError(f"{movies_path}:{lineno}: empty movieId")
            title, year = split_title(row[1])
            genres = [g for g in row[2].split("|") if g and g != "(no genres listed)"]
            items[item_id] = make_item(item_id, title, genres, year)

    events: list[Interaction] = []
    with ratings_path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:4]] != ["userId", "movieId", "rating", "timestamp"]:
            raise DataError(
                f"{ratings_path}:1: expected header 'userId,movieId,rating,timestamp', got {header!r}"
            )
        for row in reader:
            lineno = reader.line_num
            if not row:
                continue
            if len(row) != 4:
                raise DataError(f"{ratings_path}:{lineno}: expected 4 fields, got {len(row)}")
            user, item, rating, ts = (v.strip() for v in row)
            events.append(Interaction(user, item, _number(rating, float, ratings_path, lineno, "rating"),
                                      _number(ts, float, ratings_path, lineno, "timestamp")))
    _fill_unknown_items(events, items)
    return RatingLog(_sorted(events), items, "ml-latest", str(folder))


# -------------------------------------------------------------------------------------- common


def _fill_unknown_items(events: list[Interaction], items: dict[str, Item]) -> None:
    """Items rated but absent from the catalogue get a bare entry (their id as title)."""
    for e in events:
        if e.item not in items:
            items[e.item] = make_item(e.item, f"item {e.item}", [], None)


def detect_format(folder: str | Path) -> str:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data path {folder} is not a directory")
    if (folder / "u.data").is_file():
        return "ml-100k"
    if (folder / "ratings.csv").is_file():
        return "ml-latest"
    raise DataError(f"{folder} holds neither u.data (ml-100k) nor ratings.csv (ml-latest)")


def load(folder: str | Path, fmt: str = "auto") -> RatingLog:
    """Load a MovieLens-format folder (``fmt`` one of :data:`FORMATS`)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data path {folder} is not a directory")
    if fmt == "auto":
        fmt = detect_format(folder)
    return load_ml100k(folder) if fmt == "ml-100k" else load_ml_latest(folder)
