"""The model registry: name -> constructor(num_classes, in_chans) plus a short description."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from ciard_deploy.options.catalog import MODEL_NAMES
from ciard_deploy.registry import Registry
from ciard_deploy.models.normalize import Normalized


@dataclass(frozen=True)
class ModelEntry:
    name: str
    build: Callable[..., nn.Module]
    role: str

    def num_params(self, num_classes: int = 10, in_chans: int = 3) -> int:
        """Parameter count, computed on the meta device (no memory, no time)."""
        import torch

        with torch.device("meta"):
            net = self.build(num_classes=num_classes, in_chans=in_chans)
        return sum(p.numel() for p in net.parameters())


MODELS: Registry[ModelEntry] = Registry("model", catalog=MODEL_NAMES)


def register_model(name: str, role: str = "") -> Callable:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS.add(name, ModelEntry(name, fn, role))
        return fn

    return deco


def create_model(name: str, num_classes: int = 10, in_chans: int = 3,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> nn.Module:
    """Builds a registered model that takes float32 NCHW images in [0, 1].

    Args:
        name: a name from ``list_models()``.
        num_classes: number of output logits.
        in_chans: input channels (1 for digits, 3 for CIFAR).
        mean, std: per-channel normalization applied inside the model (defaults 0 and 1).
    """

    net = MODELS.get(name).build(num_classes=num_classes, in_chans=in_chans)
    mean = list(mean) if mean is not None else [0.0] * in_chans
    std = list(std) if std is not None else [1.0] * in_chans
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"mean/std need {in_chans} values, got {len(mean)}/{len(std)}")
    return Normalized(net, mean, std)


def list_models() -> list[str]:
    return MODELS.names()
