"""Learning-rate schedules: the student's per-epoch lr factor (:func:`lr_factor`, every
``optim.schedule``), CIARD's lr shape and the epoch-milestone helpers shared by the trainer and the methods.

The reference script (CIARD.py, 300 epochs) sets, once per epoch ``e`` counted from 1:

    student lr = 0.1                                   for e < 150
               = 0.1 * cosine_exp_factor((e - 150) / 150)   from e = 150 on
    teacher lr = 0                                      for e < 50 (and no teacher step up to e = 50)
               = 1e-4 * cosine_exp_factor((e - 50) / 250)   from e = 50 on

so both reach exactly 0 at e = 300. With a 0-based loop index ``i`` pass ``e = i + 1``:
``lr = base * delayed_cosine_exp(i + 1, start, epochs)``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from ciard_deploy.config import RecipeBase


def cosine_exp_factor(t: float) -> float:
    """``(0.5 + 0.5 cos(pi t)) * exp(-0.01 t^2)``: 1 at t = 0, exactly 0 at t >= 1.

    Args:
        t: progress through the decay phase; clipped to [0, 1].
    """
    t = min(max(float(t), 0.0), 1.0)
    if t >= 1.0:
        return 0.0
    return (0.5 + 0.5 * math.cos(math.pi * t)) * math.exp(-0.01 * t * t)


def delayed_cosine_exp(epoch: float, start: float, end: float) -> float:
    """Factor 1 up to ``start``, then :func:`cosine_exp_factor` over ``start..end``, 0 from ``end`` on.

    Args:
        epoch: the epoch number as the reference counts it (1-based; a 0-based index ``i``
            passes ``i + 1``, so that the last epoch gets exactly 0).
        start: epoch at which the decay begins (150 of 300 for the student, 50 for the teacher).
        end: epoch at which the factor reaches 0 (the number of epochs).

    Example:
        >>> delayed_cosine_exp(150, 150, 300), delayed_cosine_exp(300, 150, 300)
        (1.0, 0.0)
    """
    if epoch <= start:
        return 1.0
    if end <= start or epoch >= end:
        return 0.0
    return cosine_exp_factor((epoch - start) / (end - start))


def fraction_to_epoch(fraction: float, epochs: int) -> int:
    """The 1-based epoch number ``round(fraction * epochs)``: 215/300 of 300 epochs is epoch 215."""
    return int(round(float(fraction) * epochs))


def milestone_epochs(fractions: Sequence[float], epochs: int) -> list[int]:
    """Milestones given as fractions of the run, as 0-based epoch indices (sorted, duplicates kept).

    The paper's milestones 215, 260, 285 of 300 (1-based) are fractions 215/300, ... and land on
    0-based indices 214, 259, 284; a short run gets the same relative positions.
    """
    return sorted(max(0, fraction_to_epoch(f, epochs) - 1) for f in fractions)


def lr_factor(recipe: RecipeBase, epoch_index: int) -> float:
    """The student lr multiplier in epoch ``epoch_index`` (0-based) for the recipe's schedule.

    ``ciard``: 1 up to ``decay_start`` of the run, then (0.5 + 0.5 cos(pi t)) exp(-0.01 t^2)
    reaching exactly 0 at the last epoch, as the reference counts epochs (1-based).
    """
    o, epochs = recipe.optim, recipe.train.epochs
    if o.schedule == "ciard":
        return delayed_cosine_exp(epoch_index + 1, round(o.decay_start * epochs), epochs)
    if o.schedule == "step":
        return o.gamma ** sum(1 for m in o.milestones if m <= epoch_index)
    if o.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch_index / epochs))
    return 1.0
