"""Lazy package attributes (PEP 562): a package re-exports names from its heavy submodules (torch,
autoattack, the trainer) without importing them until first use, so ``import ciard_deploy.attacks``
stays cheap and torch-free code paths never pay for them; and callable packages (``callable_package``),
whose call runs a function of another module, imported on the first call."""

from __future__ import annotations

import importlib
import sys
import types
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


class _CallablePackage(types.ModuleType):
    """A package module that can be called: ``ciard_deploy.distill(...)`` calls the function its
    ``__ciard_call__`` names (``"module:function"``), imported on the first call."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module, _, function = self.__dict__["__ciard_call__"].partition(":")
        return getattr(importlib.import_module(module), function)(*args, **kwargs)


def callable_package(package: str, target: str) -> None:
    """Makes the package module ``package`` callable, forwarding to ``target`` (``"module:function"``),
    which is imported on the first call only. Python lets a module's ``__class__`` be set to a
    ``ModuleType`` subclass: the package keeps its attributes, submodules and ``import`` behaviour.

    It solves one naming problem: ``ciard_deploy.distill`` is both a subpackage and the Python API's
    verb (``ciard_deploy.api.distill``); whichever way it was reached, ``ciard_deploy.distill(...)``
    runs the verb.

    Example (at the end of a package's ``__init__``): ``callable_package(__name__, "ciard_deploy.api:distill")``
    """
    module = sys.modules[package]
    module.__dict__["__ciard_call__"] = target
    module.__class__ = _CallablePackage
