"""Distillation and adversarial-training methods, one module each, on one step interface.

Importing this package registers every method in ``METHODS``; each method's ``Config`` (torch-free, read
by recipe validation) is in ``options.methods``.
"""

from ciard_deploy.distill.methods import ard, ciard, mtard, natural, pgd_at, rslad, trades  # noqa: F401  (registration)
from ciard_deploy.distill.methods.base import METHODS, Method, StepResult, create_method, freeze, list_methods, make_config
from ciard_deploy.options.methods import MethodConfig

__all__ = ["METHODS", "Method", "MethodConfig", "StepResult", "create_method", "freeze", "list_methods",
           "make_config"]
