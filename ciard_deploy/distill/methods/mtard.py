"""MTARD (Zhao et al., ECCV 2022; B-MTARD, TPAMI 2024): clean + robust teachers with adaptive weights.

It is CIARD without the push loss and without robust-teacher retraining: both teachers are
frozen (eval, no gradients). Temperatures adapt as in B-MTARD (the version CIARD builds on);
``adaptive_temperatures: false`` gives the ECCV 2022 method (T = 1). The MTARD script's step
order (``clean_forward: after_attack``) and shrink timing (``shrink_at: end``) are options
(``options.methods.MtardConfig``); the paper recipes select them.
"""

from __future__ import annotations

from ciard_deploy.distill.methods.base import METHODS
from ciard_deploy.distill.methods.dual_teacher import DualTeacherMethod
from ciard_deploy.options.methods import MtardConfig


@METHODS.register("mtard")
class MTARD(DualTeacherMethod):
    """``loss = w_rob * KL(Tr(x_adv)/tau_r || S(x_adv)) + w_nat * KL(Tc(x)/tau_c || S(x))`` with adaptive weights."""

    name = "mtard"
    Config = MtardConfig
    teachers = ("clean", "robust")
    cfg: MtardConfig
