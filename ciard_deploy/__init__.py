"""ciard-deploy: distill robust compact classifiers, export them, and verify them on the runtime.

The Python API (``ciard_deploy.api``; each verb returns a typed result)::

    import ciard_deploy as cd
    run = cd.distill(recipe, "runs/x")   # also cd.train, cd.export, cd.pack, cd.verify, cd.save_model

``distill``, ``export`` and ``verify`` are subpackages made callable; the other names are loaded on first
use (PEP 562), so ``import ciard_deploy`` stays cheap and torch-free.
"""

from __future__ import annotations

import importlib
from typing import Any

from ciard_deploy._lazy import lazy_attributes

__version__ = "0.1.0"

#: the API's names besides the callable subpackages (``distill``, ``export``, ``verify``)
_LAZY = {name: "ciard_deploy.api" for name in ("DistillResult", "ExportResult", "RobustnessPack", "VerifyReport",
                                                "pack", "save_model", "train")}
_SUBPACKAGES = ("distill", "export", "verify")
_api_attribute, _dir = lazy_attributes(__name__, _LAZY, globals())


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:  # importing a subpackage sets it as this package's attribute
        return importlib.import_module(f"{__name__}.{name}")
    return _api_attribute(name)


def __dir__() -> list[str]:
    return sorted(set(_dir()) | set(_SUBPACKAGES))


__all__ = ["DistillResult", "ExportResult", "RobustnessPack", "VerifyReport", "distill", "export", "pack",
           "save_model", "train", "verify"]
