"""PGD adversarial training (Madry et al., ICLR 2018): cross-entropy on PGD examples. No teacher."""

from __future__ import annotations

import torch

from ciard_deploy.distill.losses import cross_entropy, pgd_train_attack
from ciard_deploy.distill.methods.base import METHODS, Method, StepResult
from ciard_deploy.options.methods import PgdAtConfig


@METHODS.register("pgd_at")
class PgdAT(Method):
    """``x_adv = PGD_CE(S, x, y)`` (student in eval mode for the attack), ``loss = CE(S(x_adv), y)``
    with the student in train mode."""

    name = "pgd_at"
    Config = PgdAtConfig
    teachers = ()
    cfg: PgdAtConfig

    def train_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> StepResult:
        x_adv = pgd_train_attack(self.student, x, y, eps=self.eps, steps=self.attack_steps, step_size=self.step_size,
                                 loss="ce", start="uniform" if self.cfg.random_start else "none")
        self.student.train()
        logits = self.student(x_adv)
        loss = cross_entropy(logits, y)
        acc = (logits.detach().argmax(1) == y).float().mean()
        return StepResult(loss, {"loss_adv": loss.item(), "acc_adv": acc.item()}, x_adv)
