"""CW-inf: L-inf PGD on the Carlini-Wagner margin loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ciard_deploy.attacks.base import GRADIENTS, check_positive
from ciard_deploy.attacks.budget import Budget
from ciard_deploy.attacks.common import TorchAttack
from ciard_deploy.attacks.torch_ops import make_generator
from ciard_deploy.attacks.pgd import default_step_size, pgd_linf, warn_if_short


def cw_margin_loss(logits: torch.Tensor, y: torch.Tensor, confidence: float = 50.0) -> torch.Tensor:
    """Summed CW margin loss ``-max(z_y - max_{j != y} z_j + confidence, 0)`` to be maximized.

    Matches the reference code of the ARD/RSLAD/CIARD evaluations: the loss stops pushing a
    sample once it is misclassified by a margin of ``confidence``.
    """
    logits = logits.float()
    true_mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, y.unsqueeze(1), True)
    real = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    other = logits.masked_fill(true_mask, float("-inf")).amax(dim=1)
    return -torch.clamp(real - other + confidence, min=0.0).sum()


class CWInf(TorchAttack):
    """CW-inf (Carlini & Wagner, S&P 2017, margin loss under an L-inf PGD budget); white-box.

    Threat model: L-inf ball of radius eps, pixels in [0, 1], gradient access. As in the CIARD
    protocol: ``cw30`` is 30 steps of 2/255 on the margin loss with confidence 50, starting
    from the clean image (zero perturbation).

    Args:
        eps: L-inf radius.
        steps: iterations (the ``K`` of ``cw<K>``); default 30.
        step_size: step per iteration; default max(2/255, eps/4) (see ``pgd.default_step_size``).
        confidence: margin kappa; default 50.
        random_start: start from a uniform point of the eps-ball instead; default False.
        seed: seeds the random start, if any.

    Example:
        >>> CWInf(8 / 255, steps=30).label
        'cw30@8/255'
    """

    requires = frozenset({GRADIENTS})

    def __init__(self, eps: float, steps: int = 30, step_size: float | None = None, confidence: float = 50.0,
                 random_start: bool = False, seed: int | None = None) -> None:
        step_size = default_step_size(eps) if step_size is None else step_size
        check_positive("steps", steps)
        check_positive("step_size", step_size)
        check_positive("confidence", confidence, allow_zero=True)
        self.name = f"cw{int(steps)}"
        self.budget = Budget("Linf", float(eps), int(steps), float(step_size))
        self.confidence = float(confidence)
        self.random_start = bool(random_start)
        self.seed = seed
        warn_if_short(self.label, self.budget.eps, self.budget.steps, float(step_size))

    def options(self) -> dict[str, Any]:
        return {"confidence": self.confidence, "random_start": self.random_start, "seed": self.seed}

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        conf = self.confidence
        b = self.budget
        return pgd_linf(model, x, y, b.eps, b.step_size, b.steps, self.random_start,
                        lambda logits, target: cw_margin_loss(logits, target, conf),
                        make_generator(self.seed, x.device))
