"""The data splits of one training run: the training positions (holdout removed), the fixed subset the
trainer selects its best checkpoint on (from the holdout or the test split), and the test split.

Every split is drawn from ``data.split_seed``, so a resumed run, and any run of the same recipe, sees
the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ciard_deploy.config import RecipeBase
from ciard_deploy.data import create_dataset, stratified_indices
from ciard_deploy.errors import RecipeError


@dataclass
class DataSplits:
    """The datasets of one run: training positions, the fixed selection subset, the test split."""

    train: Any  # ArrayDataset (after train_subset)
    train_idx: torch.Tensor  # positions in ``train`` used for training (holdout removed)
    select_x: torch.Tensor
    select_y: torch.Tensor
    select_source: str  # "holdout" or "test"
    info: Any  # DatasetInfo
    test: Any = None  # ArrayDataset, loaded lazily

    @property
    def num_classes(self) -> int:
        return self.info.num_classes


def prepare_data(recipe: RecipeBase) -> DataSplits:
    """Loads the training split, takes the subset and holdout, and the fixed selection subset."""
    d = recipe.data
    train = create_dataset(d.dataset, "train", d.data_root, d.download, n=d.train_subset, seed=d.split_seed)
    n = len(train)
    n_hold = int(round(d.holdout * n)) if d.holdout < 1 else int(d.holdout)
    if n_hold >= n:
        raise RecipeError(f"data.holdout: {n_hold} held-out images leave none of the {n} for training")
    hold_idx = stratified_indices(train.labels, n_hold, seed=d.split_seed) if n_hold else torch.empty(0, dtype=torch.long)
    mask = torch.ones(n, dtype=torch.bool)
    mask[hold_idx] = False
    train_idx = mask.nonzero().flatten()
    if recipe.train.selection == "holdout":
        hold = train.subset(hold_idx)
        pick = stratified_indices(hold.labels, recipe.train.eval_n, seed=d.split_seed)
        sx, sy = hold.tensors(pick)
        test = None
    else:
        test = create_dataset(d.dataset, "test", d.data_root, d.download)
        pick = stratified_indices(test.labels, recipe.train.eval_n, seed=d.split_seed)
        sx, sy = test.tensors(pick)
    return DataSplits(train, train_idx, sx, sy, recipe.train.selection, train.info, test)


def load_test_split(recipe: RecipeBase, splits: DataSplits, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images of the final evaluation: a stratified ``n`` of the test split (all when ``n`` is
    None or 0), drawn from ``data.split_seed``."""
    d = recipe.data
    test = splits.test or create_dataset(d.dataset, "test", d.data_root, d.download)
    idx = stratified_indices(test.labels, n, seed=d.split_seed) if n else None
    return test.tensors(idx)


__all__ = ["DataSplits", "load_test_split", "prepare_data"]
