"""The layers import one way and no module imports itself back through others.

core (contracts, validation, settings, metrics, Kafka helpers) < feature_store < model < streams <
entry points (cli, worker, demo, bench, testing). The client for app teams sits on the core alone, so
it installs without the ML stack. Inside ``model``, the shared root modules (seams, LM loading,
checkpoints, the item catalogue, item text) sit under the roles: knowledge and ranking, then serving and
training, then evaluation on top.

Every import counts, the ones inside functions too (a lazy import upward is still an upward
dependency); only ``if TYPE_CHECKING:`` blocks are exempt.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"driftrec": ROOT / "driftrec", "driftrec.streams": ROOT / "streams", "driftrec.model": ROOT / "model",
                "driftrec.feature_store": ROOT / "feature_store", "driftrec.bench": ROOT / "bench"}

# (module prefix, rank); a module may import modules of the same or a lower rank only. Longest prefix wins.
RANKS = [
    ("driftrec.core", 0),
    ("driftrec.client", 1),
    ("driftrec.feature_store", 2),
    ("driftrec.model", 3),  # the root modules of model: base, lm, adapters, catalogue, text
    ("driftrec.model.knowledge", 4),
    ("driftrec.model.ranking", 4),
    ("driftrec.model.serving", 5),
    ("driftrec.model.training", 5),
    ("driftrec.model.evaluation", 6),
    ("driftrec.streams", 7),
    ("driftrec", 8),  # entry points: cli, worker, demo, testing
    ("driftrec.bench", 8),
]
ALLOWED_SIBLING = {
    ("driftrec.model.knowledge", "driftrec.model.ranking"),  # KG candidates are a CandidateSource
    ("driftrec", "driftrec.bench"), ("driftrec.bench", "driftrec"),  # entry points: cli runs bench, bench runs the demo
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "driftrec" and parts and parts[0] in {"streams", "model", "feature_store", "bench"}:
                continue
            out[name] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                for sub in ast.walk(child):
                    if hasattr(sub, "lineno"):
                        lines.add(sub.lineno)
    return lines


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def rank(mod: str) -> tuple[int, str]:
    if mod == "driftrec":  # the root package holds __version__ only
        return 0, "driftrec.core"
    best = max((p for p, _ in RANKS if mod == p or mod.startswith(p + ".")), key=len)
    return dict(RANKS)[best], best


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def test_no_bare_top_level_imports():
    """Code imports driftrec.streams / driftrec.model / ..., never the bare folder names."""
    bad = []
    for m, p in modules().items():
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            bad += [f"{m}: {n}" for n in names if n.split(".")[0] in {"streams", "model", "feature_store", "bench"}]
    assert not bad, bad


def test_imports_go_down_the_layers(graph):
    violations = []
    for mod, deps in graph.items():
        r, layer = rank(mod)
        for dep in deps:
            rd, dlayer = rank(dep)
            if rd > r:
                violations.append(f"{mod} ({layer}) imports {dep} ({dlayer})")
            elif rd == r and dlayer != layer and (layer, dlayer) not in ALLOWED_SIBLING:
                violations.append(f"{mod} ({layer}) imports its sibling {dep} ({dlayer})")
    assert not violations, "\n".join(sorted(violations))


def test_no_import_cycles(graph):
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_every_package_folder_is_packaged():
    """pyproject's explicit package list (needed for the folder -> driftrec.* mapping) misses none."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = {m for m, p in modules().items() if p.name == "__init__.py"}
    assert on_disk == listed
    assert {k: str(ROOT / v) for k, v in cfg["package-dir"].items()} == {k: str(v) for k, v in PACKAGE_DIRS.items()}
