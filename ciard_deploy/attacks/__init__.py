"""Adversarial attacks behind one interface, and an AutoAttack-style evaluation.

    from ciard_deploy.attacks import create_attack, run_cascade
    attacks = [create_attack(s, "8/255") for s in ("fgsm", "pgd20", "cw30", "aa")]
    result = run_cascade(model, x, y, attacks)
    result.to_dict()  # {"robust_acc": {"pgd20@8/255": ..., ...}, "worst_case_acc": ..., ...}

Importing this package does not import torch: the registry, ``parse_eps``, the results and the
query-only Square (``SquareAttack.run_numpy``) work on a torch-free device. The white-box
attacks and ``run_cascade`` are loaded on first use (PEP 562), together with torch.
"""

from __future__ import annotations

from ciard_deploy._lazy import lazy_attributes
from typing import TYPE_CHECKING

from ciard_deploy.attacks.base import (ATTACKS, Attack, AttackEntry, CAPABILITIES, GRADIENTS, MissingCapability,
                                       QueryAttack, SCORES, TORCH_CAPABILITIES, attack_requires, create_attack,
                                       ensure_capabilities, list_attacks, parse_attack_spec)
from ciard_deploy.attacks.budget import Budget, format_eps, parse_eps
from ciard_deploy.attacks.results import AttackResult, EvalResult
from ciard_deploy.attacks.square import SquareAttack

if TYPE_CHECKING:  # pragma: no cover
    from ciard_deploy.attacks.autoattack import AutoAttackAdapter
    from ciard_deploy.attacks.torch_ops import frozen_eval, project_linf
    from ciard_deploy.attacks.cw import CWInf, cw_margin_loss
    from ciard_deploy.attacks.cascade import run_cascade
    from ciard_deploy.attacks.pgd import FGSM, PGD, pgd_linf

_LAZY = {
    "run_cascade": "ciard_deploy.attacks.cascade",
    "FGSM": "ciard_deploy.attacks.pgd",
    "PGD": "ciard_deploy.attacks.pgd",
    "pgd_linf": "ciard_deploy.attacks.pgd",
    "CWInf": "ciard_deploy.attacks.cw",
    "cw_margin_loss": "ciard_deploy.attacks.cw",
    "AutoAttackAdapter": "ciard_deploy.attacks.autoattack",
    "frozen_eval": "ciard_deploy.attacks.torch_ops",
    "project_linf": "ciard_deploy.attacks.torch_ops",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())

__all__ = [
    "ATTACKS", "Attack", "AttackEntry", "AttackResult", "AutoAttackAdapter", "Budget", "CAPABILITIES", "CWInf",
    "EvalResult", "FGSM", "GRADIENTS", "MissingCapability", "PGD", "QueryAttack", "SCORES", "SquareAttack",
    "TORCH_CAPABILITIES",
    "attack_requires", "create_attack", "cw_margin_loss", "ensure_capabilities", "format_eps",
    "frozen_eval", "list_attacks", "parse_attack_spec", "parse_eps", "pgd_linf", "project_linf", "run_cascade",
]
