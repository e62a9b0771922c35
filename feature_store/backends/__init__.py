"""Online-store backends, one module each: :mod:`.sqlite` (default) and :mod:`.redis` (production).

``get_backend(name)`` imports the one asked for (Feast's store modules are heavy to import).
"""

from __future__ import annotations

import importlib

from driftrec.feature_store.backends.base import Backend, OnlineStoreConfig, RowStore

_MODULES = {"sqlite": "driftrec.feature_store.backends.sqlite", "redis": "driftrec.feature_store.backends.redis"}
NAMES = tuple(_MODULES)

__all__ = ["Backend", "NAMES", "OnlineStoreConfig", "RowStore", "get_backend"]


def get_backend(name: str) -> Backend:
    try:
        module = _MODULES[name]
    except KeyError:
        raise ValueError(f"unknown online store {name!r} ({'|'.join(NAMES)})") from None
    return importlib.import_module(module).BACKEND
