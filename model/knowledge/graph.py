"""Knowledge-graph side information: loading (head, relation, tail) triples and item<->entity links.

Formats (:func:`load_kg`):

* ``recbole``: RecBole atomic files, a ``.kg`` file whose first line is a typed header such as
  ``head_id:token\trelation_id:token\ttail_id:token`` (columns are found by name, so their order may
  differ) and an optional ``.link`` file with header ``item_id:token\tentity_id:token``;
* ``tsv``: plain tab-separated triples ``head\trelation\ttail`` (an optional header line
  ``head\trelation\ttail``), and an optional link TSV ``item\tentity`` (optional header ``item\tentity``).
  Without a link file, entity ids *are* item ids (for the ``item_ids`` given, or for every head entity).
* ``auto``: ``recbole`` when the first line of the triples file is a typed header, else ``tsv``.
  ``path`` may be a folder holding one ``*.kg`` (and optionally one ``*.link``) file.

Nothing is skipped silently: every line read is kept, counted as blank, malformed (wrong number of
columns, an empty field) or a duplicate, and :class:`LoadReport` keeps the counts plus the first
malformed lines with file name and line number. ``strict=True`` raises :class:`KGError` on the first
malformed line instead.

:class:`KnowledgeGraph` turns the triples into an item x entity incidence: item ``i`` is attached to
entity ``x`` when a triple links ``i``'s entity to ``x`` (in either direction). Two items are KG
neighbours when they share an entity (an actor, the director, a genre...). A shared entity weighs its
inverse document frequency ``log(N / df)`` (``N`` = items attached to any entity, ``df`` = items attached
to this one), so "English language", shared by most films, carries almost nothing while a director
shared by three films counts a lot. Triples that link two items directly (sequel/prequel) become a
private entity of the pair. Relation ids are turned into readable labels (``film.film.directed_by`` ->
"director", ``film.director.film`` -> "director") for :meth:`KnowledgeGraph.explain`.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import sparse

log = logging.getLogger(__name__)

FORMATS = ("auto", "recbole", "tsv")
MAX_EXAMPLES = 50  # malformed lines kept verbatim in the report (all are counted)


class KGError(ValueError):
    """A knowledge-graph file is missing or (in strict mode) malformed."""


# ------------------------------------------------------------------------------------ report


@dataclass
class LoadReport:
    """What loading read, kept and rejected (per kind of line), with examples of the bad lines."""

    files: list[str] = field(default_factory=list)
    format: str = ""
    lines_read: int = 0  # triple lines, header excluded
    blank_lines: int = 0
    triples_kept: int = 0
    malformed: int = 0
    duplicates: int = 0
    link_lines_read: int = 0
    links_kept: int = 0
    link_malformed: int = 0
    link_duplicates: int = 0
    link_conflicts: int = 0  # an item linked again to a different entity (first one kept)
    links_unknown_item: int = 0  # link lines whose item is not in the given catalogue (dropped)
    items_linked: int = 0  # catalogue items with an entity
    items_not_linked: int = 0  # catalogue items without one
    items_in_graph: int = 0  # linked items that appear in at least one kept triple
    entity_triples: int = 0  # triples between two non-item entities (kept, unused for neighbours)
    errors: list[tuple[str, int, str]] = field(default_factory=list)  # (file, line, reason)
    seconds: float = 0.0

    def add_error(self, path: str, lineno: int, reason: str) -> None:
        if len(self.errors) < MAX_EXAMPLES:
            self.errors.append((path, lineno, reason))

    def malformed_lines(self, path: str | None = None) -> list[int]:
        return [ln for p, ln, _ in self.errors if path is None or Path(p).name == Path(path).name]

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "errors"}
        d["errors"] = [f"{p}:{ln}: {r}" for p, ln, r in self.errors]
        return d

    def summary(self) -> str:
        return (
            f"{self.triples_kept} triples kept of {self.lines_read} lines ({self.malformed} malformed, "
            f"{self.duplicates} duplicate, {self.blank_lines} blank); links: {self.links_kept} kept of "
            f"{self.link_lines_read} ({self.link_malformed} malformed, {self.link_duplicates} duplicate, "
            f"{self.link_conflicts} conflicting, {self.links_unknown_item} unknown item); items: "
            f"{self.items_linked} linked, {self.items_not_linked} not linked, {self.items_in_graph} in graph"
        )


# ------------------------------------------------------------------------------ relation labels

_AGENT = {"directed": "director", "written": "writer", "produced": "producer", "edited": "editor",
          "composed": "composer", "narrated": "narrator", "distributed": "distributor"}
_WORD = {"cinematography": "cinematographer", "rating": "content rating", "award_won": "award",
         "films_in_this_genre": "genre", "starring": "actor", "music": "composer"}
_INVERSE_DIRECT = {"sequel": "prequel", "prequel": "sequel"}


def _singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def relation_label(relation: str, inverse: bool = False) -> str:
    """A short readable name for the entity at the far end of ``relation`` seen from an item.

    ``inverse=False``: the item is the head, the label names the tail (``film.film.directed_by`` ->
    "director"); ``inverse=True``: the item is the tail, the label names the head's type
    (``film.director.film`` -> "director", ``film.film_genre.films_in_this_genre`` -> "genre").
    """
    parts = [p for p in re.split(r"[./#:]", relation) if p]
    if not parts:
        return relation or "relation"
    word = parts[-2] if inverse and len(parts) >= 2 else parts[-1]
    word = word.lower()
    if word in _WORD:
        return _WORD[word]
    if word.startswith("film_") and len(word) > 5:
        word = word[5:]
    if word.endswith("_by"):
        verb = word[:-3]
        word = _AGENT.get(verb, verb[:-2] + "er" if verb.endswith("ed") else verb)
    return " ".join(_singular(w) for w in word.split("_") if w) or relation


# -------------------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class Link:
    """Why two items are neighbours: they share ``entity`` (their ``label`` on each side)."""

    entity: str
    label_a: str
    label_b: str
    weight: float
    relation_a: str = ""  # a relation id joining item a and the entity ("~rel" when the item is its tail)
    relation_b: str = ""


@dataclass(frozen=True)
class Neighbour:
    item: str
    score: float
    links: tuple[Link, ...]  # strongest first


class KnowledgeGraph:
    """Entity/relation vocabularies, item<->entity maps, adjacency and IDF-weighted item neighbours."""

    def __init__(
        self,
        triples: Iterable[tuple[str, str, str]],
        links: Mapping[str, str] | None = None,
        *,
        titles: Mapping[str, str] | None = None,
        report: LoadReport | None = None,
    ) -> None:
        self.report = report or LoadReport()
        self.alignment: dict | None = None  # set by load_kg_for_log (check_alignment)
        self.titles: dict[str, str] = dict(titles or {})
        self.triples: list[tuple[int, int, int]] = []
        self.entities: list[str] = []
        self.entity_index: dict[str, int] = {}
        self.relations: list[str] = []
        self.relation_index: dict[str, int] = {}
        for head, rel, tail in triples:
            self.triples.append((self._entity(head), self._relation(rel), self._entity(tail)))
        if links is None:  # entity ids are item ids: every head entity is an item
            links = {self.entities[h]: self.entities[h] for h, _, _ in self.triples}
        self.item_entity: dict[str, str] = {}
        self.entity_items: dict[str, list[str]] = {}
        for item, ent in links.items():
            self.item_entity[item] = ent
            self.entity_items.setdefault(ent, []).append(item)
        # adjacency over entity ids: entity -> [(relation, other entity, is_outgoing)]
        self.adjacency: dict[int, list[tuple[int, int, bool]]] = {}
        for h, r, t in self.triples:
            self.adjacency.setdefault(h, []).append((r, t, True))
            self.adjacency.setdefault(t, []).append((r, h, False))
        self._build_incidence()

    # ------------------------------------------------------------------------- vocabularies

    def _entity(self, e: str) -> int:
        idx = self.entity_index.get(e)
        if idx is None:
            idx = self.entity_index[e] = len(self.entities)
            self.entities.append(e)
        return idx

    def _relation(self, r: str) -> int:
        idx = self.relation_index.get(r)
        if idx is None:
            idx = self.relation_index[r] = len(self.relations)
            self.relations.append(r)
        return idx

    @property
    def n_entities(self) -> int:
        return len(self.entities)

    @property
    def n_relations(self) -> int:
        return len(self.relations)

    def entity_of(self, item: str) -> str | None:
        return self.item_entity.get(item)

    def items_of(self, entity: str) -> list[str]:
        return list(self.entity_items.get(entity, ()))

    def is_item_entity(self, entity: str) -> bool:
        return entity in self.entity_items

    # ----------------------------------------------------------------------- incidence / IDF

    def _build_incidence(self) -> None:
        """Item x "attribute" incidence. An attribute is a non-item entity (or a private entity of a
        direct item-item link); per (item, attribute) the readable labels of the relations between them."""
        attrs: dict[str, int] = {}
        labels: dict[tuple[str, int], set[tuple[str, str]]] = {}
        direct: dict[tuple[str, str], str] = {}  # (a, b) -> label: b is the <label> of a
        self.report.entity_triples = 0

        def attach(item: str, attr: str, label: str, relation: str) -> None:
            a = attrs.setdefault(attr, len(attrs))
            labels.setdefault((item, a), set()).add((label, relation))

        for h, r, t in self.triples:
            he, te, rel = self.entities[h], self.entities[t], self.relations[r]
            h_items, t_items = self.entity_items.get(he), self.entity_items.get(te)
            if h_items and t_items:
                lab = relation_label(rel)
                for a in h_items:
                    for b in t_items:
                        if a == b:
                            continue
                        direct.setdefault((a, b), lab)
                        key = "\x00link:" + "\x00".join(sorted((a, b)))
                        attach(a, key, lab, rel)
                        attach(b, key, lab, "~" + rel)
            elif h_items:
                for a in h_items:
                    attach(a, te, relation_label(rel), rel)
            elif t_items:
                for b in t_items:
                    attach(b, he, relation_label(rel, inverse=True), "~" + rel)
            else:
                self.report.entity_triples += 1
        # items sharing one entity in the link file are the same film
        for ent, its in self.entity_items.items():
            if len(its) > 1:
                for a in its:
                    attach(a, "\x00same:" + ent, "entry", "link")
        self._direct = direct
        self.item_ids: list[str] = sorted({it for it, _ in labels}, key=_natural)
        self.item_index = {it: n for n, it in enumerate(self.item_ids)}
        self.attribute_index = attrs
        self.attributes: list[str] = [""] * len(attrs)
        for k, v in attrs.items():
            self.attributes[v] = k
        # (graph item, attribute) -> readable labels; and one raw relation id per label
        self._labels = {(self.item_index[it], a): tuple(sorted({l for l, _ in ls})) for (it, a), ls in labels.items()}
        self._relations = {(self.item_index[it], a): min(r for _, r in ls) for (it, a), ls in labels.items()}
        rows = np.fromiter((self.item_index[it] for it, _ in labels), dtype=np.int64, count=len(labels))
        cols = np.fromiter((a for _, a in labels), dtype=np.int64, count=len(labels))
        n_items, n_attr = len(self.item_ids), len(attrs)
        self.A = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_items, n_attr))
        self.df = np.asarray(self.A.sum(axis=0)).ravel()
        n = max(n_items, 1)
        self.idf = np.where(self.df > 0, np.log(n / np.maximum(self.df, 1)), 0.0)
        self.AT = self.A.T.tocsr()
        self.report.items_in_graph = n_items

    def attribute_name(self, a: int) -> str:
        name = self.attributes[a]
        return name.replace("\x00", " ").strip() if name.startswith("\x00") else name

    def entity_weight(self, entity: str) -> float:
        """The IDF weight of an entity (0 when unknown or attached to no item)."""
        a = self.attribute_index.get(entity)
        return 0.0 if a is None else float(self.idf[a])

    def degree(self, item: str) -> int:
        i = self.item_index.get(item)
        return 0 if i is None else int(self.A.indptr[i + 1] - self.A.indptr[i])

    # ---------------------------------------------------------------------------- neighbours

    def similarity_row(self, item: str) -> np.ndarray:
        """Summed IDF of the entities ``item`` shares with every graph item (aligned with item_ids)."""
        i = self.item_index.get(item)
        if i is None:
            return np.zeros(len(self.item_ids))
        row = self.A[i].multiply(self.idf).tocsr()
        out = np.asarray((row @ self.AT).todense()).ravel()
        out[i] = 0.0
        return out

    def profile_scores(self, weights: Mapping[int, float] | Sequence[tuple[int, float]]) -> np.ndarray:
        """``sum_k w_k sim(h_k, .)`` for graph-item indices ``h_k`` with weights ``w_k`` (one sparse product)."""
        pairs = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
        if not pairs:
            return np.zeros(len(self.item_ids))
        idx = np.asarray([p[0] for p in pairs], dtype=np.int64)
        w = np.asarray([p[1] for p in pairs], dtype=np.float64)
        prof = np.asarray(self.A[idx].T @ w).ravel() * self.idf
        return np.asarray(self.A @ prof).ravel()

    def links(self, item_a: str, item_b: str) -> tuple[Link, ...]:
        """The entities ``item_a`` and ``item_b`` share, highest weight first."""
        i, j = self.item_index.get(item_a), self.item_index.get(item_b)
        if i is None or j is None or i == j:
            return ()
        ai = set(self.A.indices[self.A.indptr[i] : self.A.indptr[i + 1]])
        aj = self.A.indices[self.A.indptr[j] : self.A.indptr[j + 1]]
        shared = [a for a in aj if a in ai]
        out = [
            Link(self.attribute_name(a), self._labels[(i, a)][0], self._labels[(j, a)][0], float(self.idf[a]),
                 self._relations[(i, a)], self._relations[(j, a)])
            for a in shared
        ]
        out.sort(key=lambda l: (-l.weight, l.entity))
        return tuple(out)

    def neighbours(self, item_id: str, n: int | None = 20, min_score: float = 0.0) -> list[Neighbour]:
        """Items sharing an entity with ``item_id``, by summed IDF of the shared entities, best first."""
        sim = self.similarity_row(item_id)
        cand = np.flatnonzero(sim > min_score)
        order = cand[np.lexsort((cand, -sim[cand]))]
        if n is not None:
            order = order[:n]
        return [Neighbour(self.item_ids[j], float(sim[j]), self.links(item_id, self.item_ids[j])) for j in order]

    def title(self, item: str) -> str:
        return self.titles.get(item) or f"item {item}"

    def explain(self, item_a: str, item_b: str, titles: Mapping[str, str] | None = None) -> str | None:
        """A short reason to show ``item_b`` to someone who liked ``item_a``, e.g. "same director as
        Pulp Fiction"; ``None`` when the graph does not connect them."""
        name = (titles or {}).get(item_a) or self.title(item_a)
        lab = self._direct.get((item_a, item_b))
        if lab is not None:  # b is the <lab> of a
            return f"{lab} of {name}"
        lab = self._direct.get((item_b, item_a))
        if lab is not None:  # a is the <lab> of b
            inv = _INVERSE_DIRECT.get(lab)
            return f"{inv} of {name}" if inv else f"{name} is its {lab}"
        links = self.links(item_a, item_b)
        if not links:
            return None
        best = links[0]
        if best.label_a == best.label_b:
            return f"same {best.label_a} as {name}" if best.label_a != "entry" else f"same film as {name}"
        return f"its {best.label_b} is the {best.label_a} of {name}"

    def triple_strings(self) -> list[tuple[str, str, str]]:
        return [(self.entities[h], self.relations[r], self.entities[t]) for h, r, t in self.triples]

    def relinked(self, links: Mapping[str, str], titles: Mapping[str, str] | None = None) -> "KnowledgeGraph":
        """The same triples with another item -> entity map (e.g. from :func:`relink_by_title`)."""
        report = LoadReport(**{k: v for k, v in self.report.__dict__.items() if k != "errors"})
        report.errors = list(self.report.errors)
        report.links_kept = report.items_linked = len(links)
        return KnowledgeGraph(self.triple_strings(), dict(links), titles=titles if titles is not None else self.titles,
                              report=report)

    def stats(self) -> dict:
        return {
            "entities": self.n_entities,
            "relations": self.n_relations,
            "triples": len(self.triples),
            "items_linked": len(self.item_entity),
            "items_in_graph": len(self.item_ids),
            "attributes": len(self.attributes),
            "mean_item_degree": float(self.A.getnnz() / max(len(self.item_ids), 1)),
        }


def _natural(s: str):
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


# ---------------------------------------------------------------------------------- loading


def _is_typed_header(fields: Sequence[str]) -> bool:
    return len(fields) >= 2 and all(re.fullmatch(r"[A-Za-z_][\w]*:[a-z_]+", f.strip()) for f in fields)


def _columns(fields: Sequence[str], wanted: Sequence[str], path: Path) -> list[int]:
    names = [f.strip().split(":", 1)[0].lower() for f in fields]
    out = []
    for w in wanted:
        cands = [n for n in (w, w.replace("_id", "")) if n in names]
        if not cands:
            raise KGError(f"{path}:1: header {list(fields)!r} has no {w!r} column")
        out.append(names.index(cands[0]))
    return out


def _read_rows(path: Path, n_cols: int, wanted: Sequence[str], plain_header: Sequence[str], fmt: str,
               strict: bool, report: LoadReport, kind: str):
    """Yield ``(lineno, fields)`` for good lines, counting everything else in ``report``."""
    if not path.is_file():
        raise KGError(f"missing {kind} file {path}")
    report.files.append(str(path))
    cols = list(range(n_cols))
    expect = n_cols
    read_attr = "lines_read" if kind == "triples" else "link_lines_read"
    bad_attr = "malformed" if kind == "triples" else "link_malformed"
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if lineno == 1:
                fields = line.split("\t")
                if fmt == "recbole" or _is_typed_header(fields):
                    if not _is_typed_header(fields):
                        msg = f"{path}:1: expected a typed RecBole header (name:type), got {line!r}"
                        if strict:
                            raise KGError(msg)
                        report.add_error(str(path), 1, "missing typed header")
                        setattr(report, read_attr, getattr(report, read_attr) + 1)
                        setattr(report, bad_attr, getattr(report, bad_attr) + 1)
                        continue
                    cols = _columns(fields, wanted, path)
                    expect = len(fields)
                    continue
                if [f.strip().lower() for f in fields] == list(plain_header):
                    continue
            if not line.strip():
                report.blank_lines += 1
                continue
            setattr(report, read_attr, getattr(report, read_attr) + 1)
            fields = line.split("\t")
            reason = None
            if len(fields) != expect:
                reason = f"expected {expect} tab-separated fields, got {len(fields)}"
            else:
                fields = [fields[c].strip() for c in cols]
                if any(not f for f in fields):
                    reason = "empty field"
            if reason:
                if strict:
                    raise KGError(f"{path}:{lineno}: {reason}")
                setattr(report, bad_attr, getattr(report, bad_attr) + 1)
                report.add_error(str(path), lineno, reason)
                continue
            yield lineno, fields


def _find(folder: Path, suffix: str) -> Path | None:
    found = sorted(folder.glob(f"*{suffix}"))
    if len(found) > 1:
        raise KGError(f"{folder} holds several *{suffix} files: {', '.join(p.name for p in found)}")
    return found[0] if found else None


def load_kg(
    path: str | Path,
    link_path: str | Path | None = None,
    *,
    fmt: str = "auto",
    item_ids: Iterable[str] | None = None,
    titles: Mapping[str, str] | None = None,
    strict: bool = False,
) -> KnowledgeGraph:
    """Load a knowledge graph (see the module docstring); the result's ``.report`` says what was read.

    ``item_ids``: the catalogue; links to other items are counted (``links_unknown_item``) and dropped,
    and catalogue items without a link are counted (``items_not_linked``).
    """
    import time

    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise KGError(f"unknown KG format {fmt!r}; expected one of {', '.join(FORMATS)}")
    path = Path(path)
    if path.is_dir():
        kg_file = _find(path, ".kg")
        if kg_file is None:
            raise KGError(f"{path} holds no *.kg file")
        if link_path is None:
            link_path = _find(path, ".link")
        path = kg_file
    report = LoadReport()
    if fmt == "auto":
        if not path.is_file():
            raise KGError(f"missing triples file {path}")
        with path.open(encoding="utf-8", errors="replace") as fh:
            first = fh.readline().rstrip("\r\n").split("\t")
        fmt = "recbole" if _is_typed_header(first) else "tsv"
    report.format = fmt

    seen: set[tuple[str, str, str]] = set()
    triples: list[tuple[str, str, str]] = []
    for _, (h, r, t) in _read_rows(path, 3, ("head_id", "relation_id", "tail_id"), ("head", "relation", "tail"),
                                   fmt, strict, report, "triples"):
        key = (h, r, t)
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        triples.append(key)
    report.triples_kept = len(triples)

    catalogue = None if item_ids is None else {str(i) for i in item_ids}
    links: dict[str, str] | None = None
    if link_path is not None:
        links = {}
        lp = Path(link_path)
        for lineno, (item, ent) in _read_rows(lp, 2, ("item_id", "entity_id"), ("item", "entity"), fmt, strict,
                                              report, "links"):
            if catalogue is not None and item not in catalogue:
                report.links_unknown_item += 1
                report.add_error(str(lp), lineno, f"unknown item {item!r}")
                continue
            prev = links.get(item)
            if prev is not None:
                if prev == ent:
                    report.link_duplicates += 1
                else:
                    report.link_conflicts += 1
                    report.add_error(str(lp), lineno, f"item {item!r} already linked to {prev!r}")
                continue
            links[item] = ent
        report.links_kept = len(links)
    elif catalogue is not None:
        ents = {e for h, _, t in triples for e in (h, t)}
        links = {i: i for i in catalogue if i in ents}
    if catalogue is not None:
        report.items_linked = sum(1 for i in catalogue if i in (links or {}))
        report.items_not_linked = len(catalogue) - report.items_linked
    else:
        report.items_linked = len(links) if links is not None else len({h for h, _, _ in triples})
    kg = KnowledgeGraph(triples, links, titles=titles, report=report)
    report.seconds = time.perf_counter() - t0
    return kg


_ARTICLE_SUFFIX = re.compile(r"^(.*), (the|a|an|le|la|les|l'|il|el|der|die|das)$", re.I)


def load_catalogue_graph(path: str | Path | None, items: Mapping) -> KnowledgeGraph | None:
    """The graph at ``path`` (a folder with ``*.kg`` [+ ``*.link``], or a triples file) linked to a catalogue
    (item id -> Item), or None without a path (``ranking.kg_path``: the worker and the trainer load it so)."""
    if not path:
        return None
    return load_kg(path, item_ids=list(items), titles={i: it.title for i, it in items.items()})


def normalise_title(title: str) -> str:
    """``"Shawshank Redemption, The"`` -> ``"shawshank redemption"`` (trailing/leading article dropped,
    alternative titles in parentheses dropped, punctuation removed)."""
    t = re.sub(r"\s*\([^)]*\)", "", title).strip()
    m = _ARTICLE_SUFFIX.match(t)
    if m:
        t = m.group(1)
    t = re.sub(r"^(the|a|an) ", "", t.lower())
    return " ".join(re.findall(r"[a-z0-9]+", t))


def _short(title: str) -> str:
    return normalise_title(title.split(":")[0])


def relink_by_title(links: Mapping[str, str], source_items: Mapping, target_items: Mapping) -> tuple[dict[str, str], dict]:
    """Re-key an item -> entity map from one catalogue's ids to another's by (normalised title, year).

    For a link file keyed by MovieLens movieIds (ML-1M/ML-20M/ml-latest share them) used with ML-100K,
    whose ids differ: ``source_items`` is the ml-latest catalogue, ``target_items`` the ML-100K one
    (``RatingLog.items``: id -> Item with ``title`` and ``year``). Ambiguous keys are left out.
    Returns (links keyed by target ids, counts)."""

    def key(it):
        return normalise_title(getattr(it, "title", str(it))), getattr(it, "year", None)

    by_key: dict[tuple, list[str]] = {}
    for tid, it in target_items.items():
        by_key.setdefault(key(it), []).append(tid)
    out: dict[str, str] = {}
    stats: Counter[str] = Counter()
    short: dict[tuple, list[str]] = {}  # fallback: the title before a ":" ("Star Wars: Episode IV..." -> "star wars")
    for tid, it in target_items.items():
        k = key(it)
        short.setdefault((_short(getattr(it, "title", "")), k[1]), []).append(tid)
    for sid, ent in links.items():
        it = source_items.get(sid)
        if it is None:
            stats["source_id_unknown"] += 1
            continue
        cands = by_key.get(key(it), [])
        if not cands:
            cands = short.get((_short(getattr(it, "title", "")), key(it)[1]), [])
        if len(cands) != 1:
            stats["ambiguous" if cands else "no_match"] += 1
            continue
        if cands[0] in out:
            stats["target_taken"] += 1
            continue
        out[cands[0]] = ent
        stats["matched"] += 1
    return out, dict(stats)


def check_alignment(kg: KnowledgeGraph, item_genres: Mapping[str, Iterable[str]], *, min_df: int = 20,
                    margin: float = 0.05, seed: int = 0) -> dict:
    """Does the link file match the catalogue? For graph entities reached through a "genre" relation
    (at least ``min_df`` items), the mean share of their items carrying the entity's most common
    catalogue genre ("purity"), against the same with the item ids shuffled. Correct links give a clearly
    higher purity; links keyed by another id space give about the shuffled value. ``aligned`` is None
    when the graph has fewer than 3 such genre entities (nothing to judge by)."""
    genres = {i: set(g) for i, g in item_genres.items()}
    AT = kg.AT
    cols = []
    for a in range(len(kg.attributes)):
        if kg.df[a] >= min_df:
            rows = AT.indices[AT.indptr[a] : AT.indptr[a + 1]]
            if "genre" in kg._labels[(int(rows[0]), a)]:
                cols.append(a)
    items = np.asarray(kg.item_ids, dtype=object)

    def purity(ids: np.ndarray) -> float:
        vals = []
        for a in cols:
            rows = AT.indices[AT.indptr[a] : AT.indptr[a + 1]]
            counts = Counter(g for r in rows for g in genres.get(ids[r], ()))
            vals.append(max(counts.values(), default=0) / len(rows))
        return float(np.mean(vals)) if vals else float("nan")

    real = purity(items)
    shuffled = purity(items[np.random.default_rng(seed).permutation(len(items))])
    aligned = None if len(cols) < 3 else bool(real - shuffled > margin)
    return {"genre_entities": len(cols), "purity": round(real, 4), "purity_shuffled": round(shuffled, 4),
            "aligned": aligned}


def load_kg_for_log(kg_dir: str | Path, rating_log, *, strict: bool = False, check: bool = True) -> KnowledgeGraph:
    """:func:`load_kg` with a :class:`driftrec.model.evaluation.movielens.RatingLog`'s catalogue (ids and titles); logs a warning
    when :func:`check_alignment` finds that the links do not match the catalogue (``kg.alignment``)."""
    kg = load_kg(kg_dir, item_ids=list(rating_log.items),
                 titles={i: it.title for i, it in rating_log.items.items()}, strict=strict)
    if check:
        kg.alignment = check_alignment(kg, {i: it.genres for i, it in rating_log.items.items()})
        if kg.alignment["aligned"] is False:
            log.warning("knowledge graph %s: links do not match the catalogue's genres (purity %.3f vs %.3f "
                        "with shuffled links): the link file is probably keyed by other item ids", kg_dir,
                        kg.alignment["purity"], kg.alignment["purity_shuffled"])
    return kg
