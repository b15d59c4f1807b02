"""TRADES (Zhang et al., ICML 2019): clean cross-entropy plus beta * KL(clean || adversarial). No teacher."""

from __future__ import annotations

import torch

from ciard_deploy.distill.losses import cross_entropy, kl_soft, pgd_train_attack
from ciard_deploy.distill.methods.base import METHODS, Method, StepResult
from ciard_deploy.options.methods import TradesConfig


@METHODS.register("trades")
class Trades(Method):
    """TRADES step.

    Attack (student in eval mode): maximize ``KL(S(x) || S(x'))`` starting from ``x + 0.001 randn``.
    Loss (student in train mode): ``CE(S(x), y) + beta * KL(softmax(S(x)) || softmax(S(x_adv)))``,
    the KL target not detached (as in the official code). ``S(x)`` is computed once and reused, or
    (``third_clean_forward``, as the official script) computed again after ``S(x_adv)`` and the KL
    target taken from that third forward: same loss and gradients, one more BatchNorm update.
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
        target_nat = self.student(x) if self.cfg.third_clean_forward else logits_nat
        loss_rob = kl_soft(target_nat, logits_adv, reduction=self.cfg.kl_reduction)
        loss = loss_nat + self.cfg.beta * loss_rob
        metrics = {"loss_nat": loss_nat.item(), "loss_rob": loss_rob.item(),
                   "acc": (logits_nat.detach().argmax(1) == y).float().mean().item(),
                   "acc_adv": (logits_adv.detach().argmax(1) == y).float().mean().item()}
        return StepResult(loss, metrics, x_adv)
