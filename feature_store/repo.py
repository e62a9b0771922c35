"""Generate the Feast repository config from driftrec settings and apply the definitions.

No CLI step: :func:`open_store` writes ``feature_store.yaml`` into ``settings.feast.repo_dir``
(project, file registry, file offline store, the online store from the backend module,
``entity_key_serialization_version: 3``), builds a :class:`feast.FeatureStore` on it and applies
:mod:`driftrec.feature_store.definitions` (idempotent). ``import feast`` takes 3-4 s, so this module imports
it lazily.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from driftrec.core.settings import Settings
from driftrec.feature_store.backends import get_backend

if TYPE_CHECKING:  # pragma: no cover
    from feast import FeatureStore

log = logging.getLogger(__name__)

_apply_lock = threading.Lock()


def repo_config(settings: Settings, store: str | None = None) -> dict:
    """The ``feature_store.yaml`` content for these settings (as a dict)."""
    f = settings.feast
    store = store or f.online_store
    repo_dir = Path(f.repo_dir).resolve()
    return {
        "project": f.project,
        "provider": "local",
        "registry": {"registry_type": "file", "path": str(repo_dir / "registry.db"), "cache_ttl_seconds": 0},
        "online_store": get_backend(store).online_store_config(settings),
        "offline_store": {"type": "file"},
        "entity_key_serialization_version": 3,
    }


def write_repo_config(settings: Settings, store: str | None = None) -> Path:
    repo_dir = Path(settings.feast.repo_dir).resolve()
    (repo_dir / "offline").mkdir(parents=True, exist_ok=True)
    path = repo_dir / "feature_store.yaml"
    text = yaml.safe_dump(repo_config(settings, store), sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        # Several processes (workers, their writer processes, the scorer) open the same repo: each
        # writes its own temporary file and renames it over, so a reader never sees half a file.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return repo_dir


@contextlib.contextmanager
def _repo_lock(repo_dir: Path):
    """Serialise ``apply`` across threads and processes (Feast's file registry is read-modify-write)."""
    with _apply_lock, open(repo_dir / ".apply.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def open_store(settings: Settings, store: str | None = None, *, apply: bool = True) -> "FeatureStore":
    """A FeatureStore on the generated repo; ``apply`` registers the definitions (idempotent)."""
    from feast import FeatureStore

    from driftrec.feature_store import definitions

    repo_dir = write_repo_config(settings, store)
    fs = FeatureStore(repo_path=str(repo_dir))
    if apply:
        with _repo_lock(repo_dir):
            fs.apply(definitions.objects(repo_dir))
    return fs
