"""A synthetic world for the demo, tests and the drift experiment.

Items have text attributes (a title built from words that hint at the genre, genres, a year, tags);
users have tastes over genres. Interactions are drawn from each user's taste (so the text carries
real signal), ratings follow affinity plus noise, and at ``shift_at`` (an event index) every user's
taste moves to other genres at once: an abrupt preference shift that a recommender must follow.
Deterministic for a given seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Iterator

from streams.contracts import Click, Item, Rating, RecommendationRequest

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


@dataclass
class World:
    n_users: int = 200
    n_items: int = 400
    seed: int = 7
    shift_at: int | None = None
    start_time: float = 1_700_000_000.0
    seconds_per_event: float = 30.0
    domain: str = "default"
    items: list[Item] = field(default_factory=list)
    tastes: list[dict[str, float]] = field(default_factory=list)
    shifted_tastes: list[dict[str, float]] = field(default_factory=list)
    # Optional vocabulary (None = the module defaults GENRES / NOUNS / TAGS). ``title_words`` and ``tags``
    # map every genre of GENRES to its words, so two worlds with different vocabularies share the genres
    # and the taste structure but not the title words.
    title_words: dict[str, list[str]] | None = None
    nouns: list[str] | None = None
    tags: dict[str, list[str]] | None = None

    def __post_init__(self) -> None:
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
        # The shift: each user's favourite genres map to other genres (a fixed derangement).
        perm = genres[3:] + genres[:3]
        mapping = dict(zip(genres, perm))
        self.shifted_tastes = [{mapping[g]: w for g, w in t.items()} for t in self.tastes]
        self._popularity = [rng.paretovariate(1.5) for _ in range(self.n_items)]

    def _iid(self, i: int) -> str:
        return f"{self.domain}-m{i}" if self.domain != "default" else f"m{i}"

    @staticmethod
    def _taste(rng: random.Random, genres: list[str]) -> dict[str, float]:
        liked = rng.sample(genres, 2)
        return {g: (3.0 if g == liked[0] else 2.0 if g == liked[1] else 0.0) for g in genres}

    def user_id(self, u: int) -> str:
        return f"u{u}" if self.domain == "default" else f"{self.domain}-u{u}"

    def taste(self, u: int, event_index: int) -> dict[str, float]:
        if self.shift_at is not None and event_index >= self.shift_at:
            return self.shifted_tastes[u]
        return self.tastes[u]

    def affinity(self, u: int, item: Item, event_index: int) -> float:
        t = self.taste(u, event_index)
        return max(t.get(g, 0.0) for g in item.genres)

    def relevant(self, u: int, event_index: int) -> set[str]:
        """Items this user likes at this point of the stream (for quality experiments)."""
        return {it.item_id for it in self.items if self.affinity(u, it, event_index) >= 2.0}

    def events(self, n: int, *, request_every: int = 0, seed: int | None = None) -> Iterator[Click | Rating | RecommendationRequest]:
        """n interactions (clicks and ratings), plus a recommendation request every ``request_every``."""
        rng = random.Random(self.seed * 1000 + 1 if seed is None else seed)
        weights_cache: dict[tuple[int, bool], list[float]] = {}
        for e in range(n):
            u = rng.randrange(self.n_users)
            shifted = self.shift_at is not None and e >= self.shift_at
            key = (u, shifted)
            w = weights_cache.get(key)
            if w is None:
                w = [math.exp(1.5 * self.affinity(u, it, e)) * self._popularity[j] for j, it in enumerate(self.items)]
                weights_cache[key] = w
            j = rng.choices(range(self.n_items), weights=w)[0]
            item = self.items[j]
            t = self.start_time + (e + 1) * self.seconds_per_event
            uid = self.user_id(u)
            if rng.random() < 0.5:
                yield Click(event_id=f"{self.domain}-s{self.seed}-e{e}", event_time=t, user_id=uid, item_id=item.item_id, domain=self.domain)
            else:
                score = 1.0 + self.affinity(u, item, e) + rng.gauss(0, 0.7)
                rating = float(min(5, max(1, round(score))))
                yield Rating(event_id=f"{self.domain}-s{self.seed}-e{e}", event_time=t, user_id=uid, item_id=item.item_id,
                             rating=rating, domain=self.domain)
            if request_every and (e + 1) % request_every == 0:
                yield RecommendationRequest(event_id=f"{self.domain}-s{self.seed}-r{e}", event_time=t, user_id=uid, k=5, domain=self.domain)
