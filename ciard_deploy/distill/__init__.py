"""Distillation: the trainer loop, the methods (one module each in ``methods/``) and their losses.

    from ciard_deploy.distill import run
    summary = run("recipes/quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15.yaml", "runs/ciard")

``run`` and the trainer's event types are loaded on first use (PEP 562), so importing this
package stays cheap.
"""

from __future__ import annotations

from ciard_deploy._lazy import lazy_attributes
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ciard_deploy.distill.teachers import resolve_teachers
    from ciard_deploy.distill.trainer import RunControl, TrainEvent, TrainingInterrupted, run

_LAZY = {
    "run": "ciard_deploy.distill.trainer",
    "RunControl": "ciard_deploy.distill.trainer",
    "TrainEvent": "ciard_deploy.distill.trainer",
    "TrainingInterrupted": "ciard_deploy.distill.trainer",
    "resolve_teachers": "ciard_deploy.distill.teachers",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())

__all__ = ["RunControl", "TrainEvent", "TrainingInterrupted", "resolve_teachers", "run"]
