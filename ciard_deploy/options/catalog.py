"""The architecture and dataset names a recipe may use, torch-free.

The ``models.MODELS`` and ``data.DATASETS`` registries accept only the names listed here (registering
another is an error that points here), so recipe validation can check a name without importing the
torch modules that build them. A new architecture or dataset adds its module there and its name here;
methods are listed with their ``Config`` in ``options.methods.METHOD_CATALOG``.

An architecture may also come from a model family, ``timm:NAME`` or ``torchvision:NAME``
(``models.external``): a recipe's name is checked here by its form only; whether the family has that
model is checked when the model is built (that needs timm or torchvision, hence torch).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ciard_deploy.registry import unknown_name_message

MODEL_NAMES: tuple[str, ...] = (
    "mobilenetv2", "mobilenetv2_tiny", "preactresnet18", "resnet18", "resnet18_tiny", "resnet34", "resnet56",
    "small_cnn", "small_cnn_wide", "tiny_cnn", "wrn-16-2", "wrn-28-10", "wrn-34-10")

#: built-in architectures whose activation a recipe may choose (``model.activation``): their choices, the
#: first being the architecture's own (MobileNetV2's ReLU6; the kuangliu-style CIFAR MobileNetV2 of the CIARD
#: reference code uses ReLU)
ACTIVATIONS: dict[str, tuple[str, ...]] = {"mobilenetv2": ("relu6", "relu"), "mobilenetv2_tiny": ("relu6", "relu")}

#: model families whose architectures a recipe names as ``FAMILY:NAME`` -> the extra that installs them
MODEL_FAMILIES: dict[str, str] = {"timm": "timm", "torchvision": "train"}

#: first-layer variants a recipe may ask of a family model (``model.stem``)
STEMS: tuple[str, ...] = ("cifar",)

_FAMILY_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,99}")

DATASET_NAMES: tuple[str, ...] = ("cifar10", "cifar100", "digits", "imagefolder", "tinyimagenet")


def check_name(kind: str, name: str, names: Iterable[str]) -> str:
    """``name`` if ``names`` has it, else a ValueError worded as the registry's (``unknown model 'x'. Did you
    mean ...? Valid: ...``), which pydantic reports at the recipe key."""
    valid = sorted(names)
    if name not in valid:
        raise ValueError(unknown_name_message(kind, name, valid))
    return name


def check_activation(arch: str | None, activation: str | None) -> None:
    """An activation choice needs an architecture that offers it (``ACTIVATIONS``)."""
    if activation is None:
        return
    choices = ACTIVATIONS.get(arch or "")
    if choices is None:
        raise ValueError(f"activation {activation!r}: only {', '.join(sorted(ACTIVATIONS))} offer a choice of "
                         f"activation, not {arch!r} (drop activation)")
    if activation not in choices:
        raise ValueError(f"activation {activation!r}: {arch} offers {', '.join(choices)}")


def split_arch(name: str) -> tuple[str, str] | None:
    """``("timm", "resnet18")`` for ``"timm:resnet18"``; None for a name without a family prefix."""
    family, sep, model = name.partition(":")
    return (family, model) if sep else None


def check_arch(name: str) -> str:
    """``name`` if it is a built-in architecture or a well-formed ``FAMILY:NAME``, else a ValueError naming
    the problem (an unknown built-in name gets the registry's near-match message)."""
    parts = split_arch(name)
    if parts is None:
        try:
            return check_name("model", name, MODEL_NAMES)
        except ValueError as e:
            families = " or ".join(f"{f}:NAME" for f in MODEL_FAMILIES)
            raise ValueError(f"{e}; or a model of a family: {families}") from None
    family, model = parts
    if family not in MODEL_FAMILIES:
        raise ValueError(unknown_name_message("model family", family, list(MODEL_FAMILIES))
                         + f" (as in {next(iter(MODEL_FAMILIES))}:{model or 'resnet18'})")
    if "." in model:
        base = model.split(".")[0]
        raise ValueError(f"{name!r}: '.{model.split('.', 1)[1]}' names pretrained weights; ciard builds the "
                         f"architecture only, with fresh weights (nothing downloads): use {family}:{base}")
    if not _FAMILY_MODEL.fullmatch(model):
        raise ValueError(f"{name!r}: give a {family} model name after '{family}:' (letters, digits, _ and -), "
                         f"e.g. {family}:resnet18")
    return name


__all__ = ["ACTIVATIONS", "DATASET_NAMES", "MODEL_FAMILIES", "MODEL_NAMES", "STEMS", "check_activation", "check_arch",
           "check_name", "split_arch"]
