"""The architecture and dataset names a recipe may use, torch-free.

The ``models.MODELS`` and ``data.DATASETS`` registries accept only the names listed here (registering
another is an error that points here), so recipe validation can check a name without importing the
torch modules that build them. A new architecture or dataset adds its module there and its name here;
methods are listed with their ``Config`` in ``options.methods.METHOD_CATALOG``.
"""

from __future__ import annotations

from collections.abc import Iterable

from ciard_deploy.registry import unknown_name_message

MODEL_NAMES: tuple[str, ...] = (
    "mobilenetv2", "mobilenetv2_tiny", "preactresnet18", "resnet18", "resnet18_tiny", "resnet34", "resnet56",
    "small_cnn", "small_cnn_wide", "tiny_cnn", "wrn-16-2", "wrn-28-10", "wrn-34-10")

DATASET_NAMES: tuple[str, ...] = ("cifar10", "cifar100", "digits", "imagefolder", "tinyimagenet")


def check_name(kind: str, name: str, names: Iterable[str]) -> str:
    """``name`` if ``names`` has it, else a ValueError worded as the registry's (``unknown model 'x'. Did you
    mean ...? Valid: ...``), which pydantic reports at the recipe key."""
    valid = sorted(names)
    if name not in valid:
        raise ValueError(unknown_name_message(kind, name, valid))
    return name


__all__ = ["DATASET_NAMES", "MODEL_NAMES", "check_name"]
