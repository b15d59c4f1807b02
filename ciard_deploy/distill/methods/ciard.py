"""CIARD (Lu et al., ICCV 2025): dual-teacher distillation with a contrastive push loss and
cyclic robust-teacher retraining. See CIARD.md ("One training step", "Reference-code details").

On top of the dual-teacher step (``dual_teacher.py``):

- push loss: on the samples where the clean teacher is fooled (``argmax Tc(x_adv) != y``),
  ``L_push = KL(softmax(Tc(x_adv)) || softmax(S(x_adv) / 5))``, averaged over those samples only,
  is *subtracted* with weight ``10 ** (min(mag L_rob, mag L_nat) - mag L_push)``,
  ``mag = floor(log10(.))``; skipped when no sample qualifies or it is not finite;
- robust-teacher retraining: the robust teacher runs in train mode on ``x_adv``, with gradients
  once its steps have started (and, without gradients, on the clean batch, for its BatchNorm
  statistics; the reference keeps the graph before the start too, unused); after the student
  step ``CE(Tr(x_adv), y)`` is back-propagated into it and its own SGD (momentum 0.1, wd 2e-4)
  steps, from the epoch after ``round(teacher_start_fraction * epochs)`` on, with lr
  ``teacher_lr * delayed_cosine_exp(epoch, start, epochs)`` (exactly 0 at the last epoch);
- the clean teacher stays frozen (eval, ``requires_grad=False``) for the whole run.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ciard_deploy.distill.losses import cross_entropy, kl_soft, push_weight
from ciard_deploy.distill.methods.base import METHODS
from ciard_deploy.distill.methods.dual_teacher import DualTeacherMethod
from ciard_deploy.distill.schedules import delayed_cosine_exp, fraction_to_epoch
from ciard_deploy.errors import ArtifactError
from ciard_deploy.options.methods import CiardConfig


@METHODS.register("ciard")
class CIARD(DualTeacherMethod):
    """CIARD step on the common interface; see the module docstring."""

    name = "ciard"
    Config = CiardConfig
    teachers = ("clean", "robust")
    cfg: CiardConfig

    def __init__(self, cfg: CiardConfig, student: torch.nn.Module, teachers: Mapping[str, torch.nn.Module],
                 **kw: Any) -> None:
        super().__init__(cfg, student, teachers, **kw)
        self.teacher_start_epoch = fraction_to_epoch(cfg.teacher_start_fraction, self.epochs)  # 1-based, 50 of 300
        self.teacher_optimizer: torch.optim.SGD | None = None
        if cfg.teacher_retraining:
            robust = self.teacher_nets["robust"]
            for p in robust.parameters():
                p.requires_grad_(True)
            self.teacher_optimizer = torch.optim.SGD(robust.parameters(), lr=0.0, momentum=cfg.teacher_momentum,
                                                     weight_decay=cfg.teacher_weight_decay)

    @property
    def retraining(self) -> bool:
        return self.cfg.teacher_retraining

    @property
    def push_enabled(self) -> bool:
        return self.cfg.push_loss

    def trainable_teachers(self) -> dict[str, torch.nn.Module]:
        return {"robust": self.teacher_nets["robust"]} if self.cfg.teacher_retraining else {}

    # ------------------------------------------------------------------ robust-teacher schedule
    def teacher_active(self, epoch: int) -> bool:
        """Whether the robust teacher takes steps in (0-based) ``epoch``: from the epoch after the start."""
        return self.cfg.teacher_retraining and epoch + 1 > self.teacher_start_epoch

    def teacher_needs_grad(self, epoch: int) -> bool:
        return self.teacher_active(epoch)

    def teacher_lr_at(self, epoch: int) -> float:
        """Robust-teacher lr in (0-based) ``epoch``: 0 before its start, then the cosine * exp decay to 0."""
        if not self.teacher_active(epoch):
            return 0.0
        return self.cfg.teacher_lr * delayed_cosine_exp(epoch + 1, self.teacher_start_epoch, self.epochs)

    def on_epoch_start(self, epoch: int) -> None:
        super().on_epoch_start(epoch)
        if self.teacher_optimizer is not None:
            for g in self.teacher_optimizer.param_groups:
                g["lr"] = self.teacher_lr_at(epoch)

    # ------------------------------------------------------------------ push term
    def extra_terms(self, loss: torch.Tensor, metrics: dict[str, float], **t: Any) -> torch.Tensor:
        metrics.update({"loss_push": 0.0, "push_weight": 0.0, "push_n": 0.0})
        c_adv, s_adv, y = t["c_adv"], t["s_adv"], t["y"]
        if c_adv is None:
            return loss
        fooled = c_adv.argmax(dim=1) != y
        n = int(fooled.sum().item())
        metrics["clean_fooled"] = float(n)
        if n == 0:
            return loss
        l_push = kl_soft(c_adv[fooled], s_adv[fooled], teacher_T=1.0, student_T=self.cfg.push_temperature,
                         reduction=self.cfg.kl_reduction)
        values = (metrics["loss_rob"], metrics["loss_nat"], l_push.item())
        if not all(math.isfinite(v) for v in values):
            return loss
        w = push_weight(*values)
        metrics.update({"loss_push": values[2], "push_weight": w, "push_n": float(n)})
        return loss - w * l_push

    # ------------------------------------------------------------------ robust-teacher step
    def teacher_step(self, pending: dict[str, Any]) -> dict[str, float]:
        if self.teacher_optimizer is None:
            return {}
        epoch = pending["epoch"]
        lr = self.teacher_lr_at(epoch)
        out = {"teacher_lr": lr}
        r_adv = pending["r_adv"]
        if not self.teacher_active(epoch) or r_adv is None:
            return out
        for g in self.teacher_optimizer.param_groups:
            g["lr"] = lr
        self.teacher_optimizer.zero_grad(set_to_none=True)
        loss_t = cross_entropy(r_adv, pending["y"])
        loss_t.backward()
        self.teacher_optimizer.step()
        out["loss_teacher"] = loss_t.item()
        return out

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self.teacher_optimizer is not None:
            sd["teacher_optimizer"] = self.teacher_optimizer.state_dict()
        return sd

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if self.teacher_optimizer is not None:
            if "teacher_optimizer" not in state:
                raise ArtifactError("ciard method state lacks the robust teacher's optimizer state "
                                    "(saved with teacher_retraining off?)")
            self.teacher_optimizer.load_state_dict(state["teacher_optimizer"])
