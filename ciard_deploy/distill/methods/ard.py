"""ARD (Goldblum et al., AAAI 2020): adversarially robust distillation from one robust teacher."""

from __future__ import annotations

import torch

from ciard_deploy.distill.losses import at_least_float32, cross_entropy, kl_soft, pgd_train_attack
from ciard_deploy.distill.methods.base import METHODS, Method, StepResult
from ciard_deploy.options.methods import ArdConfig


@METHODS.register("ard")
class ARD(Method):
    """ARD step.

    Teacher Tr (frozen, eval) on the clean batch gives ``t``; the attack (student in eval mode, or
    in train mode with ``attack_mode: train`` as the ARD script) crafts ``x_adv``; loss (student in
    train mode):
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
            t_nat = at_least_float32(teacher(x))
        T = cfg.temperature
        x_adv = pgd_train_attack(self.student, x, y, eps=self.eps, steps=self.attack_steps, step_size=self.step_size,
                                 loss=cfg.attack_loss, target_logits=t_nat, kl_T=T,
                                 start="uniform" if cfg.random_start else "none",
                                 train_mode=cfg.attack_mode == "train", clamp_start=cfg.clamp_start)
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
