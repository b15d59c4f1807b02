"""The clean + robust dual-teacher step shared by MTARD and CIARD (not registered itself).

One step on a batch (x, y), following CIARD.md and the released CIARD/B-MTARD scripts:

1. clean pass: ``s_nat = S(x)`` (train mode); ``t_nat = Tc(x)`` (eval, no grad) (MTARD's
   ``clean_forward: after_attack``: after step 3 instead, the MTARD script's order);
2. ``x_adv``: PGD on the student's cross-entropy (student in eval mode, start ``x + 0.001 randn``);
3. adversarial pass: ``s_adv = S(x_adv)`` (train); ``r_adv = Tr(x_adv)``;
4. ``L_rob = KL(softmax(r_adv / tau_r) || softmax(s_adv))``, ``L_nat = KL(softmax(t_nat / tau_c) || softmax(s_nat))``;
5. temperatures: one step of ``temp_lr`` toward equal teacher entropies, within [temp_min, temp_max];
6. weights: fixed ``a, b`` or MTARD's adaptive ones (moved by ``weight_lr`` toward the relative
   progress ``L / L_first_batch``, clipped at 0 and normalized to sum 1);
7. ``loss = a * L_rob + b * L_nat`` (CIARD subtracts its push term).

State changes (temperatures, weights, reference losses, shrunk step sizes, the robust-teacher
step) are computed in ``train_step`` and committed in ``after_student_step``: a ``train_step``
that is not followed by a student step (a retried batch) does not advance them. The loss uses the
weights updated with this batch's losses, as the reference does; the new temperatures apply from
the next batch (also as the reference).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ciard_deploy.distill.losses import at_least_float32, kl_soft, pgd_train_attack, softmax_entropy
from ciard_deploy.distill.methods.base import Method, StepResult
from ciard_deploy.distill.schedules import milestone_epochs
from ciard_deploy.errors import ArtifactError
from ciard_deploy.options.methods import DualTeacherConfig



class DualTeacherMethod(Method):
    """Clean + robust teacher distillation (MTARD core); CIARD adds the push loss and teacher retraining."""

    teachers = ("clean", "robust")
    Config = DualTeacherConfig
    cfg: DualTeacherConfig

    def __init__(self, cfg: DualTeacherConfig, student: torch.nn.Module, teachers: Mapping[str, torch.nn.Module],
                 **kw: Any) -> None:
        super().__init__(cfg, student, teachers, **kw)
        self.tau_robust = float(cfg.temp_init)
        self.tau_clean = float(cfg.temp_init)
        self.w_rob, self.w_nat = (0.5, 0.5) if cfg.adaptive_weights else (float(cfg.rob_weight), float(cfg.nat_weight))
        self.init_loss_rob = 0.0
        self.init_loss_nat = 0.0
        self.has_init_losses = False
        self.temp_lr = float(cfg.temp_lr)
        self.weight_lr = float(cfg.weight_lr)
        self.epoch = -1  # last epoch started
        self.steps = 0  # student steps completed
        self.milestones = milestone_epochs(cfg.shrink_milestones, self.epochs)
        self._pending: dict[str, Any] | None = None

    # ------------------------------------------------------------------ switches (CIARD overrides)
    @property
    def retraining(self) -> bool:
        return False

    @property
    def push_enabled(self) -> bool:
        return False

    def teacher_needs_grad(self, epoch: int) -> bool:
        """Whether ``Tr(x_adv)`` keeps its graph for a teacher step after the student step."""
        return False

    # ------------------------------------------------------------------ interface
    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.cfg.shrink_mode == "once":
            after = getattr(self.cfg, "shrink_at", "start") == "end"  # MTARD script: from the epoch after
            n = sum(1 for m in self.milestones if m < epoch or (m == epoch and not after))
            scale = self.cfg.shrink_factor ** n
            self.temp_lr = self.cfg.temp_lr * scale
            self.weight_lr = self.cfg.weight_lr * scale

    def train_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> StepResult:
        if epoch != self.epoch:
            self.on_epoch_start(epoch)
        self._pending = None
        cfg = self.cfg
        S, Tc, Tr = self.student, self.teacher_nets["clean"], self.teacher_nets["robust"]
        retrain = self.retraining

        # 1. clean pass (MTARD's clean_forward: after_attack moves it after step 3, as the MTARD script)
        S.train()
        Tc.eval()
        Tr.train(retrain)
        clean_first = getattr(cfg, "clean_forward", "before_attack") == "before_attack"
        if clean_first:
            s_nat, t_nat = self._clean_pass(x, retrain)
        # 2. adversarial examples against the student (eval mode inside, restored to train)
        x_adv = pgd_train_attack(S, x, y, eps=self.eps, steps=self.attack_steps, step_size=self.step_size,
                                 loss="ce", start="normal", start_std=cfg.start_std)
        # 3. adversarial pass
        S.train()
        s_adv = S(x_adv)
        with torch.set_grad_enabled(self.teacher_needs_grad(epoch) and torch.is_grad_enabled()):
            r_adv = Tr(x_adv)  # train mode when retraining (BatchNorm follows x_adv), graph kept when it will step
        if not clean_first:
            s_nat, t_nat = self._clean_pass(x, retrain)
        c_adv = None
        if self.push_enabled:
            with torch.no_grad():
                c_adv = at_least_float32(Tc(x_adv))
        r_det = at_least_float32(r_adv.detach())

        # 4. distillation terms with the current temperatures
        loss_rob = kl_soft(r_det, s_adv, teacher_T=self.tau_robust, reduction=cfg.kl_reduction)
        loss_nat = kl_soft(t_nat, s_nat, teacher_T=self.tau_clean, reduction=cfg.kl_reduction)
        l_rob, l_nat = loss_rob.item(), loss_nat.item()

        # 5. temperatures for the next step
        tau_r, tau_c = self.tau_robust, self.tau_clean
        h_rob = softmax_entropy(r_det, self.tau_robust).item()
        h_nat = softmax_entropy(t_nat, self.tau_clean).item()
        if cfg.adaptive_temperatures:
            tau_r, tau_c = self.next_temperatures(h_rob, h_nat)

        # 6. weights (adaptive ones are updated with this batch's losses and used right away)
        init = (self.init_loss_rob, self.init_loss_nat) if self.has_init_losses else (l_rob, l_nat)
        w_rob, w_nat = self.w_rob, self.w_nat
        if cfg.adaptive_weights:
            w_rob, w_nat = self.next_weights(l_rob, l_nat, init)

        # 7. loss
        loss = w_rob * loss_rob + w_nat * loss_nat
        metrics = {"loss_rob": l_rob, "loss_nat": l_nat, "w_rob": w_rob, "w_nat": w_nat,
                   "tau_robust": self.tau_robust, "tau_clean": self.tau_clean,
                   "entropy_robust": h_rob, "entropy_clean": h_nat}
        loss = self.extra_terms(loss, metrics, s_adv=s_adv, c_adv=c_adv, y=y)
        metrics["loss"] = loss.item()
        metrics["acc_adv"] = (s_adv.detach().argmax(1) == y).float().mean().item()

        self._pending = {"tau": (tau_r, tau_c), "w": (w_rob, w_nat), "init": init, "epoch": int(epoch),
                         "r_adv": r_adv if r_adv.requires_grad else None, "y": y}
        return StepResult(loss, metrics, x_adv)

    def _clean_pass(self, x: torch.Tensor, retrain: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``S(x)`` (train mode, with its graph) and ``Tc(x)`` (no grad); with teacher retraining and
        ``teacher_clean_bn_pass`` also ``Tr(x)`` for its BatchNorm statistics only."""
        s_nat = self.student(x)
        with torch.no_grad():
            t_nat = at_least_float32(self.teacher_nets["clean"](x))
            if retrain and getattr(self.cfg, "teacher_clean_bn_pass", False):
                self.teacher_nets["robust"](x)  # output unused: its BatchNorm statistics also follow clean batches
        return s_nat, t_nat

    def extra_terms(self, loss: torch.Tensor, metrics: dict[str, float], **tensors: Any) -> torch.Tensor:
        """Hook for CIARD's push term; MTARD adds nothing."""
        return loss

    def after_student_step(self) -> dict[str, float]:
        p, self._pending = self._pending, None
        if p is None:
            return {}
        self.tau_robust, self.tau_clean = p["tau"]
        self.w_rob, self.w_nat = p["w"]
        self.init_loss_rob, self.init_loss_nat = p["init"]
        self.has_init_losses = True
        metrics = self.teacher_step(p)
        if self.cfg.shrink_mode == "per_batch":
            n = self.milestones.count(p["epoch"])
            if n:
                scale = self.cfg.shrink_factor ** n
                self.temp_lr *= scale
                self.weight_lr *= scale
        self.steps += 1
        metrics.update({"temp_lr": self.temp_lr, "weight_lr": self.weight_lr})
        return metrics

    def teacher_step(self, pending: dict[str, Any]) -> dict[str, float]:
        """Hook for CIARD's robust-teacher update."""
        return {}

    # ------------------------------------------------------------------ the update rules
    def next_temperatures(self, h_rob: float, h_nat: float) -> tuple[float, float]:
        """One step toward equal entropies: the less entropic teacher's temperature goes up by
        ``temp_lr``, the other's down, both clipped to [temp_min, temp_max]."""
        tau_r, tau_c = self.tau_robust, self.tau_clean
        if not (math.isfinite(h_rob) and math.isfinite(h_nat)):
            return tau_r, tau_c
        d = (h_rob > h_nat) - (h_rob < h_nat)  # sign(H_rob / H_nat - 1) for positive entropies
        lo, hi = self.cfg.temp_min, self.cfg.temp_max
        return (min(max(tau_r - self.temp_lr * d, lo), hi), min(max(tau_c + self.temp_lr * d, lo), hi))

    def next_weights(self, l_rob: float, l_nat: float, init: tuple[float, float]) -> tuple[float, float]:
        """MTARD's rule: ``w <- w - weight_lr * (w - target)`` with ``target = Lhat / (Lhat_rob + Lhat_nat)``
        and ``Lhat = L / L_first_batch``; then clipped at 0 and normalized to sum 1."""
        lhat_r = l_rob / init[0] if init[0] > 0 else 1.0
        lhat_n = l_nat / init[1] if init[1] > 0 else 1.0
        total = lhat_r + lhat_n
        t_r, t_n = (lhat_r / total, lhat_n / total) if total > 0 and math.isfinite(total) else (0.5, 0.5)
        w_r = max(self.w_rob - self.weight_lr * (self.w_rob - t_r), 0.0)
        w_n = max(self.w_nat - self.weight_lr * (self.w_nat - t_n), 0.0)
        s = w_r + w_n
        return (w_r / s, w_n / s) if s > 0 else (0.5, 0.5)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"method": self.name, "tau_robust": self.tau_robust, "tau_clean": self.tau_clean,
                "w_rob": self.w_rob, "w_nat": self.w_nat, "init_loss_rob": self.init_loss_rob,
                "init_loss_nat": self.init_loss_nat, "has_init_losses": self.has_init_losses,
                "temp_lr": self.temp_lr, "weight_lr": self.weight_lr, "epoch": self.epoch, "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("method", self.name) != self.name:
            raise ArtifactError(f"method state is for {state.get('method')!r}, not {self.name!r}")
        try:
            self.tau_robust = float(state["tau_robust"])
            self.tau_clean = float(state["tau_clean"])
            self.w_rob = float(state["w_rob"])
            self.w_nat = float(state["w_nat"])
            self.init_loss_rob = float(state["init_loss_rob"])
            self.init_loss_nat = float(state["init_loss_nat"])
            self.has_init_losses = bool(state["has_init_losses"])
            self.temp_lr = float(state["temp_lr"])
            self.weight_lr = float(state["weight_lr"])
            self.epoch = int(state["epoch"])
            self.steps = int(state["steps"])
        except KeyError as e:
            raise ArtifactError(f"{self.name} method state lacks {e.args[0]!r} "
                                f"(checkpoint from another version?)") from None
        self._pending = None
