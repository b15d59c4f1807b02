"""scikit-learn's bundled UCI digits (1,797 8x8 grayscale images): the offline default."""

from __future__ import annotations

import numpy as np
import torch

from ciard_deploy.data.base import DATASETS, ArrayDataset, DatasetEntry, DatasetInfo, stratified_indices

DIGITS_INFO = DatasetInfo(
    name="digits",
    classes=tuple(str(i) for i in range(10)),
    input_shape=(1, 8, 8),
    mean=(0.305,),
    std=(0.375,),
    augment="none",
    description="scikit-learn's bundled 8x8 handwritten digits (offline, 1,437 train / 360 test)",
)
SPLIT_SEED = 0
N_TEST = 360


def load_digits_split(split: str, root: str | None = None, download: bool = False) -> ArrayDataset:
    """A fixed, seeded, class-stratified 80/20 split of the 1,797 images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    test_idx = stratified_indices(y, N_TEST, seed=SPLIT_SEED)
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[test_idx] = True
    keep = mask if split == "test" else ~mask
    return ArrayDataset(x[keep].contiguous(), y[keep].contiguous(), DIGITS_INFO, split)


DATASETS.add("digits", DatasetEntry("digits", load_digits_split, lambda root=None: DIGITS_INFO,
                                    needs_root=False, description=DIGITS_INFO.description))
