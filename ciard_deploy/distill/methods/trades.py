"""TRADES (Zhang et al., ICML 2019): clean cross-entropy plus beta * KL(clean || adversarial). No teacher."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ciard_deploy.distill.losses import cross_entropy, kl_soft, pgd_train_attack
from ciard_deploy.distill.methods.base import METHODS, Method, MethodConfig, StepResult


class TradesConfig(MethodConfig):
    """TRADES hyper-parameters (defaults of the official CIFAR-10 script)."""

    beta: float = Field(6.0, ge=0, description="weight of the robust KL term (1/lambda in the paper; 6.0 on CIFAR-10)")
    start_std: float = Field(0.001, ge=0, description="std of the Gaussian noise the attack starts from "
                                                       "(x + std * randn)")
    kl_reduction: Literal["batchmean", "elementwise"] = Field(
        "batchmean", description="batchmean: KL summed over classes, averaged over the batch (the official "
                                 "code); elementwise: also averaged over classes (num_classes times smaller)")


@METHODS.register("trades")
class Trades(Method):
    """TRADES step.

    Attack (student in eval mode): maximize ``KL(S(x) || S(x'))`` starting from ``x + 0.001 randn``.
    Loss (student in train mode): ``CE(S(x), y) + beta * KL(softmax(S(x)) || softmax(S(x_adv)))``,
    the KL target not detached (as in the official code; ``S(x)`` is computed once and reused).
    """

    name = "trades"
    Config = TradesConfig
    teachers = ()
    cfg: TradesConfig

    def train_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> StepResult:
        self.student.eval()
        with torch.no_grad():
            target = self.student(x)
        x_adv = pgd_train_attack(self.student, x, eps=self.eps, steps=self.attack_steps, step_size=self.step_size,
                                 loss="kl", target_logits=target, start="normal", start_std=self.cfg.start_std)
        self.student.train()
        logits_nat = self.student(x)
        logits_adv = self.student(x_adv)
        loss_nat = cross_entropy(logits_nat, y)
        loss_rob = kl_soft(logits_nat, logits_adv, reduction=self.cfg.kl_reduction)
        loss = loss_nat + self.cfg.beta * loss_rob
        metrics = {"loss_nat": loss_nat.item(), "loss_rob": loss_rob.item(),
                   "acc": (logits_nat.detach().argmax(1) == y).float().mean().item(),
                   "acc_adv": (logits_adv.detach().argmax(1) == y).float().mean().item()}
        return StepResult(loss, metrics, x_adv)
