"""The training loop's speed switches (recipe ``train.data_on_device``, ``train.fused_optimizer``,
``train.compile``), applied once at setup; none changes what a step computes.

- data on the device: the in-memory training set (uint8) moves to the GPU once; batches are indexed,
  converted and augmented there (the crop and flip draws still come from the run's CPU generator, so the
  batches are the ones a host-side run makes) and no step copies from the host;
- the student's SGD: torch's default (foreach on CUDA) or one fused kernel;
- ``torch.compile`` in place (``nn.Module.compile``): the modules keep their parameters and state-dict
  keys, so checkpoints, saved state and resume read as without it.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from torch import nn

from ciard_deploy.data import ArrayDataset

log = logging.getLogger(__name__)

#: ``data_on_device: auto`` moves the training images when they take under this part of the free GPU memory
AUTO_MEMORY_FRACTION = 0.25


def resolve_data_on_device(mode: str, device: torch.device, nbytes: int, free_bytes: int | None = None) -> bool:
    """Whether the training set goes to ``device``: ``true``/``false`` as given (true on a CPU is a no-op
    move), ``auto`` on CUDA only and when ``nbytes`` is under a quarter of the free memory."""
    if mode == "true":
        return True
    if mode == "false" or device.type != "cuda":
        return False
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    return nbytes < AUTO_MEMORY_FRACTION * free_bytes


def place_train_data(train: ArrayDataset, mode: str, device: torch.device) -> ArrayDataset:
    """``train`` with its images and labels on ``device`` when ``mode`` resolves to true, else itself."""
    nbytes = train.images.element_size() * train.images.nelement()
    if not resolve_data_on_device(mode, device, nbytes):
        return train
    log.info("training set on %s (%.0f MB)", device, nbytes / 2**20)
    return ArrayDataset(train.images.to(device), train.labels.to(device), train.info, train.split, train.indices)


def student_sgd(params: Iterable[nn.Parameter], optim: Any, fused: bool) -> torch.optim.SGD:
    """The student's SGD from the recipe's ``optim`` section; ``fused``: one fused kernel per step."""
    kw: dict[str, Any] = {"fused": True} if fused else {}
    return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                           nesterov=optim.nesterov and optim.momentum > 0, **kw)


def compile_in_place(models: Iterable[nn.Module]) -> None:
    """``torch.compile`` each module in place; its parameters and state-dict keys stay as they are."""
    for m in models:
        m.compile()


__all__ = ["AUTO_MEMORY_FRACTION", "compile_in_place", "place_train_data", "resolve_data_on_device", "student_sgd"]
