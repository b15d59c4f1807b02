"""Dataset registry. Every dataset yields float32 NCHW images in [0, 1] and int64 labels.

    create_dataset("digits", "train")                        # bundled, offline default
    create_dataset("cifar10", "test", root=..., download=True)
    create_dataset("imagefolder", "train", root="path/with/train_and_test")
"""

from __future__ import annotations

import torch

from ciard_deploy.data import digits, folders  # noqa: F401  (registration)
from ciard_deploy.data.base import (DATASETS, ArrayDataset, DatasetInfo, iterate_batches,
                                    stratified_indices)
from ciard_deploy.errors import UsageError


def create_dataset(name: str, split: str = "train", root: str | None = None, download: bool = False,
                   n: int | None = None, seed: int = 0) -> ArrayDataset:
    """Loads a registered dataset split; ``n`` takes a seeded class-stratified subset."""
    if split not in ("train", "test"):
        raise UsageError(f"split must be 'train' or 'test', got {split!r}")
    ds = DATASETS.get(name).load(split, root=root, download=download)
    if n is not None:
        if n <= 0:
            raise UsageError(f"--n must be positive, got {n}")
        ds = ds.subset(stratified_indices(ds.labels, n, seed))
    return ds


def get_dataset_info(name: str, root: str | None = None) -> DatasetInfo:
    return DATASETS.get(name).info(root=root)


def list_datasets() -> list[str]:
    return DATASETS.names()


def load_tensors(name: str, split: str = "test", root: str | None = None, download: bool = False,
                 n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 images in [0, 1], int64 labels) of a split, or a stratified subset of ``n``."""
    return create_dataset(name, split, root, download, n, seed).tensors()


__all__ = ["DATASETS", "ArrayDataset", "DatasetInfo", "create_dataset", "get_dataset_info", "iterate_batches",
           "list_datasets", "load_tensors", "stratified_indices"]
