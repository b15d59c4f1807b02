"""Architectures of model families: ``timm:NAME`` (timm) and ``torchvision:NAME`` (torchvision.models).

A family model is built with fresh weights (``pretrained`` stays off: nothing downloads), with the
recipe's ``num_classes`` and input channels, and optionally a CIFAR-style stem (``stem="cifar"``: the
first convolution becomes 3x3 stride 1 and the stem max-pool goes, as CIFAR ResNets have it) for the
ResNets of both families. ``check_input_size`` runs one forward pass on a zero batch of the data's
shape, so a model that cannot take the data (a ViT fixed at 224 px, an Inception on 8 px) is refused
in one line before training starts. timm and torchvision are imported only here, when a model is built.
"""

from __future__ import annotations

import difflib
from typing import Any, Sequence

import torch
from torch import nn

from ciard_deploy.errors import EnvironmentMissing, UsageError
from ciard_deploy.options.catalog import MODEL_FAMILIES, STEMS, split_arch


def _family_module(family: str, arch: str) -> Any:
    """The family's package (timm, torchvision.models); EnvironmentMissing (exit 3) naming the extra."""
    try:
        if family == "timm":
            import timm

            return timm
        import torchvision.models

        return torchvision.models
    except ImportError:
        package = "timm" if family == "timm" else "torchvision"
        raise EnvironmentMissing(f"{arch} needs {package}, which is not installed here: "
                                 f"pip install 'ciard-deploy[{MODEL_FAMILIES[family]}]'") from None


def family_models(family: str) -> list[str]:
    """Every architecture name of ``family`` (``timm.list_models()``, ``torchvision.models.list_models()``)."""
    module = _family_module(family, f"{family}:")
    return sorted(module.list_models())


def _check_exists(family: str, model: str, arch: str) -> None:
    names = family_models(family)
    if model in names:
        return
    close = difflib.get_close_matches(model, names, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(f'{family}:{c}' for c in close)}?" if close else ""
    lister = "timm.list_models()" if family == "timm" else "torchvision.models.list_models()"
    raise UsageError(f"unknown model {arch!r}: {family} has no architecture {model!r}.{hint} ({lister} lists them)")


def _cifar_stem(net: nn.Module, arch: str) -> None:
    """The first convolution becomes 3x3 stride 1 (same channels) and the stem max-pool an identity."""
    family = split_arch(arch)[0]  # type: ignore[index]
    if family == "timm":
        from timm.models.resnet import ResNet as TimmResNet

        ok = isinstance(net, TimmResNet)
    else:
        from torchvision.models.resnet import ResNet as TvResNet

        ok = isinstance(net, TvResNet)
    if not ok:
        raise UsageError(f"stem 'cifar' adapts ResNets (timm's and torchvision's); {arch} is a "
                         f"{type(net).__name__}: drop stem (or pick a ResNet, e.g. {family}:resnet18)")
    first = net.conv1[0] if isinstance(net.conv1, nn.Sequential) else net.conv1  # timm deep stems: a Sequential
    conv = nn.Conv2d(first.in_channels, first.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if isinstance(net.conv1, nn.Sequential):
        net.conv1[0] = conv
    else:
        net.conv1 = conv
    net.maxpool = nn.Identity()


def build_family_model(arch: str, num_classes: int, in_chans: int, stem: str | None = None) -> nn.Module:
    """A ``timm:NAME`` / ``torchvision:NAME`` network with fresh weights (no normalization: the caller wraps it).

    Raises:
        UsageError: the family has no such model (near matches named), a stem the model cannot take.
        EnvironmentMissing: timm / torchvision not installed (exit 3, the extra named).
    """
    parts = split_arch(arch)
    if parts is None or parts[0] not in MODEL_FAMILIES:
        raise UsageError(f"{arch!r} is not a FAMILY:NAME architecture ({', '.join(MODEL_FAMILIES)})")
    if stem is not None and stem not in STEMS:
        raise UsageError(f"unknown stem {stem!r} for {arch}: {', '.join(STEMS)} or none")
    family, model = parts
    module = _family_module(family, arch)
    _check_exists(family, model, arch)
    try:
        if family == "timm":
            net = module.create_model(model, pretrained=False, num_classes=num_classes, in_chans=in_chans)
        else:
            net = module.get_model(model, weights=None, num_classes=num_classes)
            if in_chans != 3:
                _first_conv_channels(net, in_chans, arch)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise UsageError(f"{arch} cannot be built with {num_classes} classes and {in_chans} input channels: "
                         f"{_first_line(e)}") from None
    if stem is not None:
        _cifar_stem(net, arch)
    return net


def _first_conv_channels(net: nn.Module, in_chans: int, arch: str) -> None:
    """torchvision models take 3 channels: their first convolution is rebuilt for ``in_chans`` (fresh weights)."""
    name, first = next(((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)), ("", None))
    if first is None or first.groups != 1:
        raise UsageError(f"{arch}: no first convolution found to take {in_chans} input channels")
    conv = nn.Conv2d(in_chans, first.out_channels, first.kernel_size, first.stride, first.padding,  # type: ignore[arg-type]
                     first.dilation, 1, first.bias is not None, first.padding_mode)  # type: ignore[arg-type]
    parent_name, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, child, conv)


def check_input_size(net: nn.Module, arch: str, input_shape: Sequence[int], num_classes: int) -> None:
    """One forward pass of a zero batch of ``input_shape`` (C, H, W) in eval mode; a model that cannot take
    it, or does not give ``num_classes`` logits, is a UsageError (exit 2) naming the arch and the size."""
    shape = tuple(int(s) for s in input_shape)
    size = "x".join(map(str, shape))
    was_training = net.training
    try:
        with torch.no_grad():
            out = net.eval()(torch.zeros((1, *shape)))
    except (RuntimeError, AssertionError, ValueError, TypeError, IndexError) as e:
        raise UsageError(f"{arch} cannot take this dataset's {size} inputs: {_first_line(e)}"
                         + (" (stem: cifar keeps small images large enough for a ResNet)"
                            if "resnet" in arch.lower() else "")) from None
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"{arch} on {size} inputs gives {got}, not (1, {num_classes}) logits")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


__all__ = ["build_family_model", "check_input_size", "family_models"]
