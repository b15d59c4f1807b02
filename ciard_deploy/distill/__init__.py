"""Distillation: the trainer loop, the methods (one module each in ``methods/``) and their losses.

    from ciard_deploy.distill import run
    summary = run("recipes/quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15.yaml", "runs/ciard")

``run`` and ``resolve_teachers`` are loaded on first use (PEP 562), so importing this package stays
cheap and torch-free; the event types (``events``) are torch-free and imported here directly.
"""

from __future__ import annotations

from ciard_deploy._lazy import callable_package, lazy_attributes
from typing import TYPE_CHECKING

from ciard_deploy.distill.events import RunControl, TrainEvent, TrainingInterrupted

if TYPE_CHECKING:  # pragma: no cover
    from ciard_deploy.distill.trainer import resolve_teachers, run

_LAZY = {
    "run": "ciard_deploy.distill.trainer",
    "resolve_teachers": "ciard_deploy.distill.trainer",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())

__all__ = ["RunControl", "TrainEvent", "TrainingInterrupted", "resolve_teachers", "run"]

# `ciard_deploy.distill(...)` runs the Python API verb `ciard_deploy.api.distill` (loaded on the first call)
callable_package(__name__, "ciard_deploy.api:distill")
