"""Each training method's hyper-parameters (its ``Config``) and the teachers it needs, torch-free.

A recipe's ``method:`` section is checked (and its defaults filled in, which the recipe hash covers)
against these models without importing torch; the method classes in ``distill.methods`` take their
``Config`` from here. ``METHOD_CATALOG`` is the list of method names the ``distill.methods.METHODS``
registry accepts: a new method adds its ``Config`` and one catalog row here, and its module there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from ciard_deploy.options.common import OmitsNewDefaults

#: where the MTARD/CIARD temperature and weight steps shrink, as fractions of the run (215, 260, 285 of 300)
PAPER_MILESTONES = (215 / 300, 260 / 300, 285 / 300)


class MethodConfig(OmitsNewDefaults):
    """Base of each method's hyper-parameters; every field has a description (shown by `ciard recipe show`).
    Fields added after recipes were first hashed are named in ``OMIT_AT_DEFAULT`` (``OmitsNewDefaults``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DualTeacherConfig(MethodConfig):
    """Hyper-parameters shared by MTARD and CIARD."""

    adaptive_temperatures: bool = Field(
        True, description="move the two teacher temperatures toward equal output entropies after each step "
                          "(B-MTARD / CIARD); false keeps them at temp_init")
    temp_init: float = Field(1.0, gt=0, description="initial temperature of both teachers")
    temp_lr: float = Field(0.001, ge=0, description="temperature step per batch")
    temp_min: float = Field(1.0, gt=0, description="lower bound of the temperatures")
    temp_max: float = Field(10.0, gt=0, description="upper bound of the temperatures")
    adaptive_weights: bool = Field(
        False, description="MTARD adaptive teacher weights a, b (start 0.5/0.5, moved each step by weight_lr "
                           "toward each term's relative progress L/L_first_batch, normalized to sum 1); "
                           "false uses the fixed rob_weight and nat_weight")
    weight_lr: float = Field(0.025, ge=0, le=1, description="step of the adaptive weights per batch")
    rob_weight: float = Field(1.0, ge=0, description="fixed weight a of L_rob (used when adaptive_weights is false)")
    nat_weight: float = Field(1.0, ge=0, description="fixed weight b of L_nat (used when adaptive_weights is false)")
    kl_reduction: Literal["elementwise", "batchmean"] = Field(
        "elementwise", description="elementwise: KL terms averaged over batch and classes (reference code; "
                                   "num_classes times smaller than batchmean); batchmean: summed over classes")
    start_std: float = Field(0.001, ge=0, description="std of the Gaussian noise the training PGD starts from")
    shrink_milestones: tuple[float, ...] = Field(
        PAPER_MILESTONES, description="where the temperature and weight step sizes shrink, as fractions of the "
                                      "run (215, 260, 285 of 300 epochs; epoch round(f * epochs), 1-based)")
    shrink_factor: float = Field(0.1, gt=0, le=1, description="factor applied to both step sizes at a milestone")
    shrink_mode: Literal["per_batch", "once"] = Field(
        "per_batch", description="per_batch: multiply on every batch of a milestone epoch (the released CIARD "
                                 "script; the steps underflow and temperatures/weights freeze from the first "
                                 "milestone); once: a single tenfold shrink at the start of each milestone epoch")

    @model_validator(mode="after")
    def _check_bounds(self) -> "DualTeacherConfig":
        if not self.temp_min <= self.temp_init <= self.temp_max:
            raise ValueError(f"need temp_min <= temp_init <= temp_max, got {self.temp_min}, {self.temp_init}, "
                             f"{self.temp_max}")
        bad = [f for f in self.shrink_milestones if not 0.0 <= f <= 1.0]
        if bad:
            raise ValueError(f"shrink_milestones are fractions of the run in [0, 1], got {bad}")
        return self


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
    attack_mode: Literal["eval", "train"] = Field(
        "eval", description="mode of the student while the attack runs: eval (BatchNorm uses and keeps its running "
                            "statistics); train (the official ARD script: batch statistics, and the running ones "
                            "updated on every attack step)")
    clamp_start: bool = Field(
        True, description="clip the uniform random start to [0, 1] before the first attack step; false: the "
                          "official ARD script (x + U(-eps, eps) unclipped, clipped only after the first step)")

    OMIT_AT_DEFAULT: ClassVar[frozenset[str]] = frozenset({"attack_mode", "clamp_start"})


class CiardConfig(DualTeacherConfig):
    """CIARD hyper-parameters; defaults reproduce the released CIFAR-10 script (with a = b = 1)."""

    push_loss: bool = Field(True, description="subtract the contrastive push term (false: the paper's ablation)")
    push_temperature: float = Field(5.0, gt=0, description="temperature of the student in the push term")
    teacher_retraining: bool = Field(
        True, description="fine-tune the robust teacher on the student's adversarial examples after each student "
                          "step (false: the ablation; the robust teacher is then frozen in eval mode)")
    teacher_lr: float = Field(1e-4, ge=0, description="base lr of the robust teacher's SGD")
    teacher_momentum: float = Field(0.1, ge=0, description="momentum of the robust teacher's SGD")
    teacher_weight_decay: float = Field(2e-4, ge=0, description="weight decay of the robust teacher's SGD")
    teacher_start_fraction: float = Field(
        50 / 300, ge=0, le=1, description="fraction of the run without robust-teacher steps: none in the first "
                                          "round(f * epochs) epochs (50 of 300 in the paper), then lr "
                                          "teacher_lr * cosine * exp(-0.01 t^2) decaying to 0 at the end")
    teacher_clean_bn_pass: bool = Field(
        True, description="also run the robust teacher on the clean batch (train mode, no grad, output unused) "
                          "so its BatchNorm statistics follow clean and adversarial batches (reference detail)")


class MtardConfig(DualTeacherConfig):
    """MTARD hyper-parameters (official scripts: adaptive weights, rate 0.025, shrink once per milestone)."""

    adaptive_weights: bool = Field(
        True, description="adaptive teacher weights (start 0.5/0.5, moved each step by weight_lr toward each "
                          "term's relative progress L/L_first_batch, normalized to sum 1); false uses the fixed "
                          "rob_weight and nat_weight")
    shrink_mode: Literal["per_batch", "once"] = Field(
        "once", description="once: a single tenfold shrink of the temperature/weight steps per milestone epoch "
                            "(MTARD scripts); per_batch: on every batch of a milestone epoch (CIARD script)")
    shrink_at: Literal["start", "end"] = Field(
        "start", description="once mode: start: the shrink applies from the first batch of the milestone epoch; "
                             "end: after its last batch, i.e. from the next epoch (the MTARD script, which "
                             "shrinks at the end of epochs 215, 260, 285)")
    clean_forward: Literal["before_attack", "after_attack"] = Field(
        "before_attack", description="when the student's clean forward (train mode, updating BatchNorm) runs: "
                                     "before_attack (CIARD/B-MTARD order: the attack then sees BatchNorm statistics "
                                     "that include this clean batch); after_attack (the MTARD script: attack, "
                                     "adversarial forward, then clean forward)")

    OMIT_AT_DEFAULT: ClassVar[frozenset[str]] = frozenset({"shrink_at", "clean_forward"})

    @model_validator(mode="after")
    def _shrink_at_needs_once(self) -> "MtardConfig":
        if self.shrink_at != "start" and self.shrink_mode != "once":
            raise ValueError("shrink_at 'end' needs shrink_mode 'once' (per_batch shrinks during the milestone epoch)")
        return self


class NaturalConfig(MethodConfig):
    """Natural training has no hyper-parameters of its own (optimizer and schedule are the trainer's)."""


class PgdAtConfig(MethodConfig):
    """Madry PGD-AT; the attack budget (eps, steps, step size) comes from the recipe's attack section."""

    random_start: bool = Field(True, description="start PGD from a uniform random point of the eps-ball "
                                                 "(Madry et al.); false starts from the clean image")


class RsladConfig(MethodConfig):
    """RSLAD hyper-parameters (official CIFAR script defaults)."""

    adv_weight: float = Field(5 / 6, ge=0, description="weight of KL(Tr(x) || S(x_adv)) (5/6)")
    nat_weight: float = Field(1 / 6, ge=0, description="weight of KL(Tr(x) || S(x)) (1/6)")
    start_std: float = Field(0.001, ge=0, description="std of the Gaussian noise the attack starts from")
    kl_reduction: Literal["elementwise", "batchmean"] = Field(
        "elementwise", description="elementwise: averaged over batch and classes (official code); batchmean: "
                                   "summed over classes, averaged over the batch")


class TradesConfig(MethodConfig):
    """TRADES hyper-parameters (defaults of the official CIFAR-10 script)."""

    beta: float = Field(6.0, ge=0, description="weight of the robust KL term (1/lambda in the paper; 6.0 on CIFAR-10)")
    start_std: float = Field(0.001, ge=0, description="std of the Gaussian noise the attack starts from "
                                                       "(x + std * randn)")
    kl_reduction: Literal["batchmean", "elementwise"] = Field(
        "batchmean", description="batchmean: KL summed over classes, averaged over the batch (the official "
                                 "code); elementwise: also averaged over classes (num_classes times smaller)")
    third_clean_forward: bool = Field(
        False, description="run the clean batch through the student a third time (train mode) after the adversarial "
                           "forward and take the KL target from it, as the official TRADES script does: the same "
                           "loss and gradients, but BatchNorm's running statistics move once more (clean, "
                           "adversarial, clean), so the next step's eval-mode attack differs; false reuses the "
                           "first clean forward")

    OMIT_AT_DEFAULT: ClassVar[frozenset[str]] = frozenset({"third_clean_forward"})


@dataclass(frozen=True)
class MethodInfo:
    """What a recipe needs to know of a method: its hyper-parameters and the teacher roles it distills from."""

    Config: type[MethodConfig]
    teachers: tuple[str, ...] = ()


METHOD_CATALOG: dict[str, MethodInfo] = {
    "ard": MethodInfo(ArdConfig, ("robust",)),
    "ciard": MethodInfo(CiardConfig, ("clean", "robust")),
    "mtard": MethodInfo(MtardConfig, ("clean", "robust")),
    "natural": MethodInfo(NaturalConfig),
    "pgd_at": MethodInfo(PgdAtConfig),
    "rslad": MethodInfo(RsladConfig, ("robust",)),
    "trades": MethodInfo(TradesConfig),
}

__all__ = ["ArdConfig", "CiardConfig", "DualTeacherConfig", "METHOD_CATALOG", "MethodConfig", "MethodInfo",
           "MtardConfig", "NaturalConfig", "PAPER_MILESTONES", "PgdAtConfig", "RsladConfig", "TradesConfig"]
