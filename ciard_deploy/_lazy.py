"""Lazy package attributes (PEP 562): a package re-exports names from its heavy submodules (torch,
autoattack, the trainer) without importing them until first use, so ``import ciard_deploy.attacks``
stays cheap and torch-free code paths never pay for them."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping


def lazy_attributes(package: str, names: Mapping[str, str],
                    namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, whose attribute ``name`` lives in module
    ``names[name]``; a resolved value is stored in ``namespace`` (the package's globals) so each
    name is imported once.

    Example: ``__getattr__, __dir__ = lazy_attributes(__name__, {"run": "pkg.trainer"}, globals())``
    """

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
