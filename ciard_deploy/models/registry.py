"""The model registry: name -> constructor(num_classes, in_chans) plus a short description; ``create_model``
builds a registered model or a family one (``timm:NAME``, ``torchvision:NAME``: ``models.external``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from ciard_deploy.errors import UsageError
from ciard_deploy.models.external import build_family_model, check_input_size
from ciard_deploy.options.catalog import MODEL_NAMES, check_activation, split_arch
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
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, *,
                 stem: str | None = None, input_shape: Sequence[int] | None = None,
                 activation: str | None = None) -> nn.Module:
    """Builds a model that takes float32 NCHW images in [0, 1].

    Args:
        name: a name from ``list_models()``, or ``timm:NAME`` / ``torchvision:NAME`` (fresh weights).
        num_classes: number of output logits.
        in_chans: input channels (1 for digits, 3 for CIFAR).
        mean, std: per-channel normalization applied inside the model (defaults 0 and 1).
        stem: ``"cifar"``: a family ResNet gets a 3x3 stride-1 first conv and no stem max-pool.
        input_shape: (C, H, W) of the data: a family model must take it (one forward of a zero batch).
        activation: an architecture's activation choice (``options.catalog.ACTIVATIONS``; None: its own).

    Raises:
        UsageError: unknown name (near match named), a stem for a built-in model or a model it cannot
            adapt, a family model that cannot take ``input_shape``.
        EnvironmentMissing: the family's package (timm, torchvision) is not installed.
    """

    if activation is not None:
        try:
            check_activation(name, activation)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if split_arch(name) is not None:
        net = build_family_model(name, num_classes, in_chans, stem)
        if input_shape is not None:
            check_input_size(net, name, input_shape, num_classes)
    elif stem is not None:
        raise UsageError(f"stem {stem!r} adapts timm:/torchvision: models; the built-in {name!r} has its own stem")
    else:
        kw = {} if activation is None else {"activation": activation}
        net = MODELS.get(name).build(num_classes=num_classes, in_chans=in_chans, **kw)
    mean = list(mean) if mean is not None else [0.0] * in_chans
    std = list(std) if std is not None else [1.0] * in_chans
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"mean/std need {in_chans} values, got {len(mean)}/{len(std)}")
    return Normalized(net, mean, std)


def list_models() -> list[str]:
    return MODELS.names()
