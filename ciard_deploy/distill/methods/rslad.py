"""RSLAD (Zi et al., ICCV 2021): robust soft labels of the robust teacher on clean and adversarial terms."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ciard_deploy.distill.losses import kl_soft, pgd_train_attack
from ciard_deploy.distill.methods.base import METHODS, Method, MethodConfig, StepResult


class RsladConfig(MethodConfig):
    """RSLAD hyper-parameters (official CIFAR script defaults)."""

    adv_weight: float = Field(5 / 6, ge=0, description="weight of KL(Tr(x) || S(x_adv)) (5/6)")
    nat_weight: float = Field(1 / 6, ge=0, description="weight of KL(Tr(x) || S(x)) (1/6)")
    start_std: float = Field(0.001, ge=0, description="std of the Gaussian noise the attack starts from")
    kl_reduction: Literal["elementwise", "batchmean"] = Field(
        "elementwise", description="elementwise: averaged over batch and classes (official code); batchmean: "
                                   "summed over classes, averaged over the batch")


@METHODS.register("rslad")
class RSLAD(Method):
    """RSLAD step.

    Robust soft labels ``t = Tr(x)`` (frozen teacher, eval, clean batch); the attack (student in
    eval mode, start ``x + 0.001 randn``) maximizes ``KL(t || S(x'))``; loss (student in train
    mode): ``5/6 * KL(t || S(x_adv)) + 1/6 * KL(t || S(x))``.
    """

    name = "rslad"
    Config = RsladConfig
    teachers = ("robust",)
    cfg: RsladConfig

    def train_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> StepResult:
        cfg, teacher = self.cfg, self.teacher_nets["robust"]
        teacher.eval()
        with torch.no_grad():
            t_nat = teacher(x).float()
        x_adv = pgd_train_attack(self.student, x, eps=self.eps, steps=self.attack_steps, step_size=self.step_size,
                                 loss="kl", target_logits=t_nat, start="normal", start_std=cfg.start_std)
        self.student.train()
        s_adv = self.student(x_adv)
        s_nat = self.student(x)
        loss_rob = kl_soft(t_nat, s_adv, reduction=cfg.kl_reduction)
        loss_nat = kl_soft(t_nat, s_nat, reduction=cfg.kl_reduction)
        loss = cfg.adv_weight * loss_rob + cfg.nat_weight * loss_nat
        metrics = {"loss_rob": loss_rob.item(), "loss_nat": loss_nat.item(),
                   "acc_adv": (s_adv.detach().argmax(1) == y).float().mean().item()}
        return StepResult(loss, metrics, x_adv)
