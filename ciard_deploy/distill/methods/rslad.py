"""RSLAD (Zi et al., ICCV 2021): robust soft labels of the robust teacher on clean and adversarial terms."""

from __future__ import annotations


import torch

from ciard_deploy.distill.losses import at_least_float32, kl_soft, pgd_train_attack
from ciard_deploy.distill.methods.base import METHODS, Method, StepResult
from ciard_deploy.options.methods import RsladConfig


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
            t_nat = at_least_float32(teacher(x))
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
