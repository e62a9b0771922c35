"""The contracts' base class where Faust is not installed (the client-only install).

``pip install driftrec`` is the app teams' client: contracts, validation, producers and subscriptions,
without Faust, torch or Feast. The contracts in :mod:`driftrec.core.contracts` are ``faust.Record``
classes when Faust is there (the worker), and subclasses of :class:`Record` below otherwise. It offers
what the client and the validator use of ``faust.Record`` - keyword and positional construction with
class-level defaults (mutable ones copied), ``asdict()``, equality, ``_options.fields`` /
``_options.defaults`` in declaration order (base class fields first), and the class keywords
(``abstract``, ``serializer``, ``include_metadata``) accepted and ignored - so the same event gives the
same fields and the same wire JSON either way (``tests/e2e/test_slim_client.py`` checks it against
Faust's).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

__all__ = ["Record"]

_MISSING = object()


class _Options:
    __slots__ = ("fields", "defaults")

    def __init__(self, fields: dict[str, Any], defaults: dict[str, Any]) -> None:
        self.fields = fields
        self.defaults = defaults


class Record:
    """A typed record: annotated class attributes are its fields (see the module docstring)."""

    _options: ClassVar[_Options] = _Options({}, {})

    def __init_subclass__(cls, abstract: bool = False, serializer: str | None = None,
                          include_metadata: bool | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields: dict[str, Any] = {}
        defaults: dict[str, Any] = {}
        for base in reversed(cls.__mro__[1:]):
            opts = base.__dict__.get("_options")
            if isinstance(opts, _Options):
                fields.update(opts.fields)
                defaults.update(opts.defaults)
        for name, tp in cls.__dict__.get("__annotations__", {}).items():
            if name.startswith("_") or "ClassVar" in str(tp):
                continue
            fields[name] = tp
            value = cls.__dict__.get(name, _MISSING)
            if value is not _MISSING:
                defaults[name] = value
            else:
                defaults.pop(name, None)
        cls._options = _Options(fields, defaults)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = list(self._options.fields)
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes {len(names)} fields, got {len(args)} positional")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"{type(self).__name__} got two values for {name!r}")
            kwargs[name] = value
        unknown = set(kwargs) - set(names)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(unknown)}")
        defaults = self._options.defaults
        missing = [n for n in names if n not in kwargs and n not in defaults]
        if missing:
            raise TypeError(f"{type(self).__name__} missing required field(s) {missing}")
        for name in names:
            value = kwargs[name] if name in kwargs else copy.copy(defaults[name])
            object.__setattr__(self, name, value)

    def asdict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._options.fields}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.asdict() == self.asdict()  # type: ignore[attr-defined]

    def __hash__(self) -> int:  # records are mutable, like faust.Record: not hashable by value
        return id(self)

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self.asdict().items())
        return f"<{type(self).__name__}: {body}>"
