"""The online-store backend seam (Feast's ``infra/online_stores`` style: one module per store).

A backend names its Feast online store, turns driftrec's settings into that store's validated config
(:class:`OnlineStoreConfig`, written into ``feature_store.yaml``), builds Feast's store object for
readers, and provides the blocking :class:`RowStore` the writer process runs. Backends import the
codec and the definitions only; :mod:`driftrec.feature_store.repo` opens the Feast store and hands it
in, so nothing here imports upward.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from driftrec.core.settings import Settings
from driftrec.feature_store.codec import ITEM_CODEC, USER_CODEC, Row
from driftrec.feature_store.definitions import ITEM_VIEW, USER_VIEW

if TYPE_CHECKING:  # pragma: no cover
    from feast import FeatureStore


class OnlineStoreConfig(abc.ABC):
    """A backend's part of ``feature_store.yaml``, validated when built."""

    @abc.abstractmethod
    def as_feast(self) -> dict[str, Any]:
        """The ``online_store`` mapping Feast reads."""


class RowStore(abc.ABC):
    """Writes batches of user and item rows to one online store (blocking; one writer per store)."""

    def __init__(self, fs: "FeatureStore") -> None:
        self.config = fs.config
        self.views = (fs.get_feature_view(USER_VIEW), fs.get_feature_view(ITEM_VIEW))
        self.codecs = (USER_CODEC, ITEM_CODEC)

    @abc.abstractmethod
    def write(self, user_rows: Sequence[Row], item_rows: Sequence[Row]) -> None:
        """Write both views' rows; return once they are readable."""

    @abc.abstractmethod
    def close(self) -> None: ...


class Backend(abc.ABC):
    """One online store: its name, config, Feast store object and row store."""

    name: ClassVar[str]
    rows_class: ClassVar[type[RowStore]]

    @abc.abstractmethod
    def config(self, settings: Settings) -> OnlineStoreConfig: ...

    def online_store_config(self, settings: Settings) -> dict[str, Any]:
        return self.config(settings).as_feast()

    @abc.abstractmethod
    def online_store(self):
        """A new Feast online-store object (readers keep one per thread)."""

    def rows(self, fs: "FeatureStore") -> RowStore:
        return self.rows_class(fs)
