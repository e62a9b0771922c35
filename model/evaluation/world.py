"""A synthetic world for the demo, tests and the drift experiment.

Items have text attributes (a title built from words that hint at the genre, genres, a year, tags);
users have stable tastes over genres (a favourite genre, weight 3, and a second one, weight 2).
Before ``shift_at`` (an event index) each interaction is drawn from the user's taste (so the text carries
real signal: the next item is like the user's history) and ratings follow affinity plus noise. At
``shift_at`` an abrupt shift happens for every user at once; ``shift_kind`` says which:

* ``"taste"`` (the default): every user's taste moves to other genres, mapped by a fixed derangement
  ``shift_map`` (an 8-cycle over the genres). Only *what* users like changes: once the user's history
  has filled with new-taste items, "items like my history" is right again (covariate shift), so a
  frozen content model recovers by itself as histories turn over.
* ``"relation"``: the relation between history and next item changes (concept drift). After the shift
  a user's next item comes from ``shift_map`` applied to the genres of the user's *newest* interaction
  (main genre weight 3, extra genre weight 2), whatever their stable taste. The walk follows the 8-cycle,
  so the next genre is never one of the genres of the last few items: "items like my history", which
  was right before the shift, stays wrong for good, and only a model that learns the new relation
  (newest item's genre g -> items of ``shift_map[g]``) follows it. A user with no interaction before
  the shift starts from the mapped stable taste, as in ``"taste"``.

Everything is deterministic for a given seed (the catalogue, tastes and popularity from ``seed``; the
event stream from ``seed`` or the ``seed`` given to :meth:`World.events`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Iterator

from driftrec.core.contracts import Click, Item, Rating, RecommendationRequest

GENRES = {
    "space": ["Star", "Galaxy", "Orbit", "Nebula", "Rocket", "Comet"],
    "western": ["Saddle", "Canyon", "Sheriff", "Dust", "Outlaw", "Frontier"],
    "romance": ["Heart", "Kiss", "Love", "Promise", "Wedding", "Letters"],
    "horror": ["Blood", "Ghost", "Crypt", "Nightmare", "Shadow", "Curse"],
    "comedy": ["Laugh", "Prank", "Oops", "Giggle", "Party", "Clown"],
    "war": ["Battle", "Trench", "Siege", "Soldier", "Front", "Medal"],
    "animation": ["Toy", "Cartoon", "Bunny", "Dragonling", "Pixel", "Puppet"],
    "mystery": ["Clue", "Detective", "Secret", "Cipher", "Alibi", "Riddle"],
}
NOUNS = ["Story", "Return", "Legend", "Night", "Days", "Road", "City", "Affair", "Chronicles", "Game"]
TAGS = {
    "space": ["aliens", "spaceship"], "western": ["cowboys", "horses"], "romance": ["love story", "couple"],
    "horror": ["scary", "monster"], "comedy": ["funny", "slapstick"], "war": ["army", "history"],
    "animation": ["kids", "family"], "mystery": ["whodunit", "crime"],
}

# A second vocabulary over the *same* genres (same taste structure), with other title words, nouns and
# tags: e.g. a "books" domain next to the default (movie-like) one, for cross-domain transfer experiments.
BOOK_TITLE_WORDS = {
    "space": ["Astronaut", "Planet", "Cosmos", "Starship", "Lunar", "Satellite"],
    "western": ["Ranch", "Prairie", "Gunslinger", "Mesa", "Stagecoach", "Rustler"],
    "romance": ["Darling", "Beloved", "Passion", "Sweetheart", "Courtship", "Embrace"],
    "horror": ["Haunting", "Grave", "Phantom", "Dread", "Coffin", "Wraith"],
    "comedy": ["Jester", "Blunder", "Chuckle", "Farce", "Mischief", "Caper"],
    "war": ["Regiment", "Bunker", "Invasion", "Brigade", "Sniper", "Armistice"],
    "animation": ["Fairy", "Kitten", "Storybook", "Teddy", "Crayon", "Gnome"],
    "mystery": ["Inspector", "Enigma", "Suspect", "Footprint", "Motive", "Verdict"],
}
BOOK_NOUNS = ["Tale", "Memoir", "Saga", "Diary", "Novel", "Almanac", "Anthology", "Papers", "Notebook", "Trilogy"]
BOOK_TAGS = {
    "space": ["science fiction", "planets"], "western": ["ranchers", "frontier life"],
    "romance": ["romantic", "relationships"], "horror": ["gothic", "supernatural"],
    "comedy": ["humour", "satire"], "war": ["military", "wartime"],
    "animation": ["children's book", "illustrated"], "mystery": ["detective novel", "suspense"],
}

SHIFT_KINDS = ("taste", "relation")


@dataclass
class World:
    n_users: int = 200
    n_items: int = 400
    seed: int = 7
    shift_at: int | None = None
    shift_kind: str = "taste"  # "taste" | "relation" (see the module docstring)
    start_time: float = 1_700_000_000.0
    seconds_per_event: float = 30.0
    domain: str = "default"
    items: list[Item] = field(default_factory=list)
    tastes: list[dict[str, float]] = field(default_factory=list)
    shifted_tastes: list[dict[str, float]] = field(default_factory=list)
    shift_map: dict[str, str] = field(default_factory=dict)
    # Optional vocabulary (None = the module defaults GENRES / NOUNS / TAGS). ``title_words`` and ``tags``
    # map every genre of GENRES to its words, so two worlds with different vocabularies share the genres
    # and the taste structure but not the title words.
    title_words: dict[str, list[str]] | None = None
    nouns: list[str] | None = None
    tags: dict[str, list[str]] | None = None

    def __post_init__(self) -> None:
        if self.shift_kind not in SHIFT_KINDS:
            raise ValueError(f"shift_kind must be one of {SHIFT_KINDS}, not {self.shift_kind!r}")
        rng = random.Random(self.seed)
        genres = list(GENRES)
        words = self.title_words or GENRES
        nouns = self.nouns or NOUNS
        tags = self.tags or TAGS
        missing = [g for g in genres if not words.get(g) or not tags.get(g)]
        if missing or not nouns:
            raise ValueError(f"world vocabulary lacks title words/tags for genres {missing} or nouns")
        self.items = []
        for i in range(self.n_items):
            main = genres[i % len(genres)]
            extra = rng.choice([g for g in genres if g != main]) if rng.random() < 0.3 else None
            gs = [main] + ([extra] if extra else [])
            title = f"{rng.choice(words[main])} {rng.choice(nouns)}"
            if rng.random() < 0.3:
                title += f" {rng.randint(2, 4)}"
            self.items.append(Item(
                event_id=f"item-{self.domain}-{i}", event_time=self.start_time, item_id=self._iid(i), title=title,
                genres=gs, year=rng.randint(1950, 2024), tags=list(tags[main]), domain=self.domain,
            ))
        self.tastes = [self._taste(rng, genres) for _ in range(self.n_users)]
        # The shift map: a fixed derangement of the genres, one 8-cycle (rotation by 3; gcd(3, 8) = 1).
        self.shift_map = dict(zip(genres, genres[3:] + genres[:3]))
        self.shifted_tastes = [{self.shift_map[g]: w for g, w in t.items()} for t in self.tastes]
        self._popularity = [rng.paretovariate(1.5) for _ in range(self.n_items)]

    def _iid(self, i: int) -> str:
        return f"{self.domain}-m{i}" if self.domain != "default" else f"m{i}"

    @staticmethod
    def _taste(rng: random.Random, genres: list[str]) -> dict[str, float]:
        liked = rng.sample(genres, 2)
        return {g: (3.0 if g == liked[0] else 2.0 if g == liked[1] else 0.0) for g in genres}

    def user_id(self, u: int) -> str:
        return f"u{u}" if self.domain == "default" else f"{self.domain}-u{u}"

    def shifted(self, event_index: int) -> bool:
        return self.shift_at is not None and event_index >= self.shift_at

    def relation_taste(self, last_item: Item) -> dict[str, float]:
        """After a ``"relation"`` shift: the genre weights for the item after ``last_item``."""
        t: dict[str, float] = {}
        for n, g in enumerate(last_item.genres):
            t.setdefault(self.shift_map[g], 3.0 if n == 0 else 2.0)
        return t

    def taste(self, u: int, event_index: int, last_item: Item | None = None) -> dict[str, float]:
        """Genre weights for user ``u``'s interaction number ``event_index``.

        ``last_item``: the user's newest interaction before it; only a ``"relation"`` shift reads it
        (without it, the mapped stable taste, as for a user with no earlier interaction).
        """
        if not self.shifted(event_index):
            return self.tastes[u]
        if self.shift_kind == "relation" and last_item is not None:
            return self.relation_taste(last_item)
        return self.shifted_tastes[u]

    def affinity(self, u: int, item: Item, event_index: int, last_item: Item | None = None) -> float:
        t = self.taste(u, event_index, last_item)
        return max(t.get(g, 0.0) for g in item.genres)

    def relevant(self, u: int, event_index: int, last_item: Item | None = None) -> set[str]:
        """Items this user likes at this point of the stream (for quality experiments).

        After a ``"relation"`` shift this depends on the user's newest interaction (``last_item``).
        """
        return {it.item_id for it in self.items if self.affinity(u, it, event_index, last_item) >= 2.0}

    def events(self, n: int, *, request_every: int = 0, seed: int | None = None) -> Iterator[Click | Rating | RecommendationRequest]:
        """n interactions (clicks and ratings), plus a recommendation request every ``request_every``."""
        rng = random.Random(self.seed * 1000 + 1 if seed is None else seed)
        weights_cache: dict[tuple, list[float]] = {}
        last: dict[int, Item] = {}  # each user's newest interaction (read by a "relation" shift)
        for e in range(n):
            u = rng.randrange(self.n_users)
            prev = last.get(u) if self.shift_kind == "relation" and self.shifted(e) else None
            key = ("after", tuple(prev.genres)) if prev is not None else (u, self.shifted(e))
            w = weights_cache.get(key)
            if w is None:
                w = [math.exp(1.5 * self.affinity(u, it, e, prev)) * self._popularity[j] for j, it in enumerate(self.items)]
                weights_cache[key] = w
            j = rng.choices(range(self.n_items), weights=w)[0]
            item = self.items[j]
            last[u] = item
            t = self.start_time + (e + 1) * self.seconds_per_event
            uid = self.user_id(u)
            if rng.random() < 0.5:
                yield Click(event_id=f"{self.domain}-s{self.seed}-e{e}", event_time=t, user_id=uid, item_id=item.item_id, domain=self.domain)
            else:
                score = 1.0 + self.affinity(u, item, e, prev) + rng.gauss(0, 0.7)
                rating = float(min(5, max(1, round(score))))
                yield Rating(event_id=f"{self.domain}-s{self.seed}-e{e}", event_time=t, user_id=uid, item_id=item.item_id,
                             rating=rating, domain=self.domain)
            if request_every and (e + 1) % request_every == 0:
                yield RecommendationRequest(event_id=f"{self.domain}-s{self.seed}-r{e}", event_time=t, user_id=uid, k=5, domain=self.domain)
