"""The baseline paper recipes' lr schedules, epoch by epoch, against each authors' script's rule as the script
states it (its own epoch count and the moment it sets the lr), so a milestone off by one epoch fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from ciard_deploy.config import load_recipe
from ciard_deploy.distill.schedules import lr_factor

C10 = Path(__file__).resolve().parents[3] / "recipes" / "cifar10"


def trades_script(epoch1: int) -> float:
    """yaodongyu/TRADES adjust_learning_rate(epoch), called before each epoch, epochs 1..N."""
    lr = 0.1
    if epoch1 >= 75:
        lr = 0.1 * 0.1
    if epoch1 >= 90:
        lr = 0.1 * 0.01
    if epoch1 >= 100:
        lr = 0.1 * 0.001
    return lr


def decay_after(milestones1: list[int]):
    """RSLAD / MTARD: `if epoch in [...]: lr *= 0.1` at the end of 1-based epoch `epoch`."""
    def lr_of(epoch1: int) -> float:
        return 0.1 * 0.1 ** sum(1 for m in milestones1 if m < epoch1)
    return lr_of


def decay_before0(milestones0: list[int]):
    """ARD (declared schedule) and Madry-style PGD-AT: lr x 0.1 set before 0-based epoch m."""
    def lr_of(epoch1: int) -> float:
        return 0.1 * 0.1 ** sum(1 for m in milestones0 if m <= epoch1 - 1)
    return lr_of


@pytest.mark.parametrize("name, epochs, rule", [
    ("cifar10_trades_none_to_resnet18_linf8.yaml", 100, trades_script),
    ("cifar10_pgd_at_none_to_resnet18_linf8.yaml", 200, decay_before0([100, 150])),
    ("cifar10_ard_wrn-34-10_to_resnet18_linf8.yaml", 200, decay_before0([100, 150])),
    ("cifar10_rslad_wrn-34-10_to_resnet18_linf8.yaml", 300, decay_after([215, 260, 285])),
    ("cifar10_mtard_wrn-34-10_to_resnet18_linf8.yaml", 300, decay_after([215, 260, 285])),
])
def test_baseline_recipe_follows_its_script(name, epochs, rule):
    r = load_recipe(C10 / name)
    assert r.train.epochs == epochs and r.optim.schedule == "step" and r.optim.lr == 0.1
    assert (r.optim.momentum, r.optim.weight_decay) == (0.9, 2e-4)
    ours = [r.optim.lr * lr_factor(r, i) for i in range(epochs)]
    theirs = [rule(e1) for e1 in range(1, epochs + 1)]
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_trades_edges_and_ciard_recipes_keep_their_schedule():
    r = load_recipe(C10 / "cifar10_trades_none_to_resnet18_linf8.yaml")
    # 1-based epochs 74, 75, 89, 90, 99, 100 -> 0-based 73, 74, 88, 89, 98, 99
    got = [lr_factor(r, i) for i in (73, 74, 88, 89, 98, 99)]
    assert got == pytest.approx([1.0, 0.1, 0.1, 0.01, 0.01, 0.001])
    assert load_recipe(C10 / "cifar10_ciard_wrn-34-10_to_resnet18_linf8.yaml").optim.schedule == "ciard"
