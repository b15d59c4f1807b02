"""The base class of the torch white-box attacks (``TorchAttack``); their tensor helpers are in ``torch_ops``."""

from __future__ import annotations

import abc

import torch
from torch import nn

from ciard_deploy.attacks.base import Attack
from ciard_deploy.attacks.torch_ops import check_inputs, frozen_eval, project_linf


class TorchAttack(Attack):
    """Base of the white-box attacks: checks inputs, freezes the model, projects the result."""

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Returns adversarial images for ``x`` (float32 NCHW in [0, 1]) with labels ``y``.

        Runs on ``x.device``; the model must live there too. The model is used in eval mode
        and left exactly as found.
        """
        check_inputs(x, y)
        x = x.detach()
        if len(x) == 0 or self.budget.eps == 0:
            return x.clone()
        with frozen_eval(model):
            x_adv = self._perturb(model, x, y)
        return project_linf(x_adv.detach(), x, self.budget.eps)

    @abc.abstractmethod
    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The attack's own search, called in frozen eval mode; the result is projected after."""
