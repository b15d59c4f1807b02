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


def load_test_set_for(meta, dataset: str | None = None, data_root: str | None = None, download: bool = False,
                      n: int | None = None, seed: int = 0) -> tuple[str, ArrayDataset]:
    """The seeded, class-stratified test subset a model (its ``CheckpointMeta``) is evaluated on.

    Returns (dataset name, the subset: ``.tensors()`` gives float32 [0, 1] images and labels,
    ``.indices`` their positions in the split); the dataset defaults to the one in the metadata,
    and its image shape and class count must fit the model.
    """
    name = dataset or meta.dataset
    if not name:
        raise UsageError("the checkpoint names no dataset: pass --dataset")
    ds = create_dataset(name, "test", root=data_root, download=download, n=n, seed=seed)
    x, y = ds.tensors()
    if tuple(x.shape[1:]) != tuple(meta.input_shape):
        raise UsageError(f"dataset {name} has images of shape {tuple(x.shape[1:])} but the model takes "
                         f"{tuple(meta.input_shape)}")
    if len(y) and int(y.max()) >= int(meta.num_classes):
        raise UsageError(f"dataset {name} has {int(y.max()) + 1}+ classes but the model has {meta.num_classes}")
    return name, ds


__all__ = ["DATASETS", "ArrayDataset", "DatasetInfo", "create_dataset", "get_dataset_info", "iterate_batches",
           "list_datasets", "load_tensors", "load_test_set_for", "stratified_indices"]
