"""Natural (standard) training: cross-entropy on clean images. Trains the clean teacher."""

from __future__ import annotations

import torch

from ciard_deploy.distill.losses import cross_entropy
from ciard_deploy.distill.methods.base import METHODS, Method, StepResult
from ciard_deploy.options.methods import NaturalConfig


@METHODS.register("natural")
class Natural(Method):
    """``loss = CE(S(x), y)``, student in train mode; no attack (``x_adv`` is the clean batch)."""

    name = "natural"
    Config = NaturalConfig
    teachers = ()

    def train_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> StepResult:
        self.student.train()
        logits = self.student(x)
        loss = cross_entropy(logits, y)
        acc = (logits.detach().argmax(1) == y).float().mean()
        return StepResult(loss, {"loss_ce": loss.item(), "acc": acc.item()}, x.detach())
