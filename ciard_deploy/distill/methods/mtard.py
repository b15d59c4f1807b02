"""MTARD (Zhao et al., ECCV 2022; B-MTARD, TPAMI 2024): clean + robust teachers with adaptive weights.

It is CIARD without the push loss and without robust-teacher retraining: both teachers are
frozen (eval, no gradients). Temperatures adapt as in B-MTARD (the version CIARD builds on);
``adaptive_temperatures: false`` gives the ECCV 2022 method (T = 1).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ciard_deploy.distill.methods.base import METHODS
from ciard_deploy.distill.methods.dual_teacher import DualTeacherConfig, DualTeacherMethod


class MtardConfig(DualTeacherConfig):
    """MTARD hyper-parameters (official scripts: adaptive weights, rate 0.025, shrink once per milestone)."""

    adaptive_weights: bool = Field(
        True, description="adaptive teacher weights (start 0.5/0.5, moved each step by weight_lr toward each "
                          "term's relative progress L/L_first_batch, normalized to sum 1); false uses the fixed "
                          "rob_weight and nat_weight")
    shrink_mode: Literal["per_batch", "once"] = Field(
        "once", description="once: a single tenfold shrink of the temperature/weight steps per milestone epoch "
                            "(MTARD scripts); per_batch: on every batch of a milestone epoch (CIARD script)")


@METHODS.register("mtard")
class MTARD(DualTeacherMethod):
    """``loss = w_rob * KL(Tr(x_adv)/tau_r || S(x_adv)) + w_nat * KL(Tc(x)/tau_c || S(x))`` with adaptive weights."""

    name = "mtard"
    Config = MtardConfig
    teachers = ("clean", "robust")
    cfg: MtardConfig
