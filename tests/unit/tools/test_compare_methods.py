"""tools/compare_methods.py derive(): every method gets the source recipe's data, budget and student,
and the source method keeps every option of its own (a dropped `kl_reduction: batchmean` once made
CIARD train with a 10x weaker distillation loss than the baselines it was compared with)."""

from __future__ import annotations


import pytest

from ciard_deploy.config import find_recipe, load_raw, validate_recipe

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("source", ["smoke/cifar10_ciard_small_cnn_wide_to_small_cnn_linf8_smoke",
                                    "quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15"])
def test_derive_keeps_the_comparison_fair(load_tool, source):
    cm = load_tool("compare_methods")
    path = find_recipe(source)
    raw = load_raw(path)
    base = validate_recipe(raw, path)
    derived = {m: validate_recipe(cm.derive(raw, m), path) for m in cm.METHODS}
    assert derived["ciard"].hash == base.hash  # CIARD exactly as the recipe says
    assert derived["ciard"].method.kl_reduction == "batchmean"
    for m in ("mtard", "rslad", "ard"):
        assert derived[m].method.kl_reduction == "batchmean", m  # the same distillation loss scale
    for m, r in derived.items():
        assert r.method.name == m and r.model_spec.arch == base.model_spec.arch
        assert r.data == base.data and r.attack == base.attack and r.optim == base.optim, m
        assert r.train.epochs == base.train.epochs and r.train.seed == base.train.seed
    assert derived["pgd_at"].kind == "train" and derived["rslad"].teachers.clean is None
