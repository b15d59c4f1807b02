"""Dataset descriptions and the in-memory dataset every loader returns.

All datasets are held as uint8 (or float32) NCHW tensors and hand out float32 images in
[0, 1]; normalization lives inside the models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import torch

from ciard_deploy.options.catalog import DATASET_NAMES
from ciard_deploy.registry import Registry
from ciard_deploy.data.transforms import augment_batch

Split = Literal["train", "test"]


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is: classes, input shape, normalization, default augmentation."""

    name: str
    classes: tuple[str, ...]
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Literal["crop_flip", "none"] = "none"
    crop_padding: int = 4
    description: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return self.input_shape[0]


@dataclass
class ArrayDataset(torch.utils.data.Dataset):
    """Images (uint8 0..255 or float32 0..1, NCHW) and int64 labels, held in memory."""

    images: torch.Tensor
    labels: torch.Tensor
    info: DatasetInfo
    split: str = "train"
    indices: torch.Tensor | None = field(default=None)  # positions in the full split, if subsampled

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise ValueError("images must be NCHW and match labels in length")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return to_float(self.images[i]), int(self.labels[i])

    def tensors(self, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 images in [0, 1], int64 labels), optionally at positions ``idx``."""
        if idx is None:
            return to_float(self.images), self.labels
        return to_float(self.images[idx]), self.labels[idx]

    def subset(self, idx: torch.Tensor) -> "ArrayDataset":
        base = self.indices[idx] if self.indices is not None else idx
        return ArrayDataset(self.images[idx], self.labels[idx], self.info, self.split, base)


def to_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    load: Callable[..., ArrayDataset]  # (split, root, download) -> ArrayDataset
    info: Callable[..., DatasetInfo]  # (root) -> DatasetInfo
    needs_root: bool
    description: str


DATASETS: Registry[DatasetEntry] = Registry("dataset", catalog=DATASET_NAMES)


def stratified_indices(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """A seeded, class-stratified sample of ``n`` positions (sorted), as even as the classes allow."""
    n_total = len(labels)
    if n >= n_total:
        return torch.arange(n_total)
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    per_class = {int(c): (labels == c).nonzero().flatten() for c in classes}
    for c, idx in per_class.items():
        per_class[c] = idx[torch.randperm(len(idx), generator=g)]
    chosen: list[torch.Tensor] = []
    quota = n // len(classes)
    rest = n - quota * len(classes)
    leftovers = []
    for i, c in enumerate(sorted(per_class)):
        take = quota + (1 if i < rest else 0)
        chosen.append(per_class[c][:take])
        leftovers.append(per_class[c][take:])
    got = sum(len(c) for c in chosen)
    if got < n:  # small classes: fill from the rest, still seeded
        pool = torch.cat(leftovers)
        pool = pool[torch.randperm(len(pool), generator=g)]
        chosen.append(pool[: n - got])
    return torch.sort(torch.cat(chosen)).values


def iterate_batches(ds: ArrayDataset, batch_size: int, shuffle: bool = False,
                    generator: torch.Generator | None = None, augment: bool = False,
                    drop_last: bool = False, indices: torch.Tensor | None = None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Float32 [0, 1] batches straight from memory, with the dataset's augmentation if asked.

    ``indices`` restricts the epoch to those positions (used for a DDP rank's shard).
    """

    order = indices if indices is not None else torch.arange(len(ds))
    if shuffle:
        order = order[torch.randperm(len(order), generator=generator)]
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        if len(idx) == 0:
            break
        x, y = ds.tensors(idx)
        if augment and ds.info.augment == "crop_flip":
            x = augment_batch(x, ds.info.crop_padding, generator)
        yield x, y
