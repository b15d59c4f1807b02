"""ARD (Goldblum et al., AAAI 2020): adversarially robust distillation from one robust teacher."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ciard_deploy.distill.losses import cross_entropy, kl_soft, pgd_train_attack
from ciard_deploy.distill.methods.base import METHODS, Method, MethodConfig, StepResult


class ArdConfig(MethodConfig):
    """ARD hyper-parameters; defaults are the official script's (alpha 1.0, T 30)."""

    alpha: float = Field(1.0, ge=0, le=1, description="weight of the distillation term; 1 - alpha weighs the clean "
                                                      "cross-entropy (official default 1.0: no CE term)")
    temperature: float = Field(30.0, gt=0, description="temperature T of both teacher and student in the KL "
                                                       "(multiplied back by T^2); official default 30")
    attack_loss: Literal["kl", "ce"] = Field(
        "kl", description="kl: the attack maximizes the student's KL to the teacher's clean output (ARD as described "
                          "in the RSLAD/CIARD comparisons); ce: cross-entropy to the label (the official ARD script)")
    random_start: bool = Field(True, description="start the attack from a uniform point of the eps-ball "
                                                 "(official script)")
    kl_reduction: Literal["elementwise", "batchmean"] = Field(
        "elementwise", description="elementwise: averaged over batch and classes (nn.KLDivLoss() default of the "
                                   "official code); batchmean: summed over classes")


@METHODS.register("ard")
class ARD(Method):
    """ARD step.

    Teacher Tr (frozen, eval) on the clean batch gives ``t``; the attack (student in eval mode)
    crafts ``x_adv``; loss (student in train mode):
    ``alpha * T^2 * KL(softmax(t / T) || softmax(S(x_adv) / T)) + (1 - alpha) * CE(S(x), y)``.
    """

    name = "ard"
    Config = ArdConfig
    teachers = ("robust",)
    cfg: ArdConfig

    def train_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> StepResult:
        cfg, teacher = self.cfg, self.teacher_nets["robust"]
        teacher.eval()
        with torch.no_grad():
            t_nat = teacher(x).float()
        T = cfg.temperature
        x_adv = pgd_train_attack(self.student, x, y, eps=self.eps, steps=self.attack_steps, step_size=self.step_size,
                                 loss=cfg.attack_loss, target_logits=t_nat, kl_T=T,
                                 start="uniform" if cfg.random_start else "none")
        self.student.train()
        s_adv = self.student(x_adv)
        loss_kd = kl_soft(t_nat, s_adv, teacher_T=T, student_T=T, reduction=cfg.kl_reduction) * (T * T)
        loss = cfg.alpha * loss_kd
        metrics = {"loss_kd": loss_kd.item()}
        if cfg.alpha < 1.0:
            s_nat = self.student(x)
            loss_ce = cross_entropy(s_nat, y)
            loss = loss + (1.0 - cfg.alpha) * loss_ce
            metrics["loss_ce"] = loss_ce.item()
        metrics["acc_adv"] = (s_adv.detach().argmax(1) == y).float().mean().item()
        return StepResult(loss, metrics, x_adv)
