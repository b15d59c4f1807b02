"""A tiny generic registry (timm-style): register by name, create by name, list names.

An unknown name raises UsageError listing the valid names and the closest match.
"""

from __future__ import annotations

import difflib
from typing import Callable, Collection, Generic, Iterator, TypeVar

from ciard_deploy.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (usually constructors) of one kind.

    ``catalog``: the names it may hold, declared torch-free elsewhere (``options.catalog``,
    ``options.methods``) so recipes can be checked without importing the registered modules.
    """

    def __init__(self, kind: str, catalog: Collection[str] | None = None) -> None:
        self.kind = kind
        self.catalog = catalog
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator registering an object under ``name`` (default: its ``__name__``)."""

        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__")
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} registered twice")
            if self.catalog is not None and key not in self.catalog:
                raise ValueError(f"{self.kind} {key!r} is not in its catalog: add it there (options.catalog / "
                                 "options.methods) so recipes can name it")
            self._items[key] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        self.register(name)(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UsageError(unknown_name_message(self.kind, name, self.names())) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        return [(k, self._items[k]) for k in self.names()]


def unknown_name_message(kind: str, name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}.{hint} Valid: {', '.join(valid)}"
