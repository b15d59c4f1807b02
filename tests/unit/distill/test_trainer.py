"""Trainer pieces that need no training: schedules, RNG state round trips, run-dir rules."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from ciard_deploy.config import recipe_from_dict
from ciard_deploy.distill.rng import rng_state, set_rng_state
from ciard_deploy.distill.schedules import lr_factor
from ciard_deploy.distill.selection import selection_score
from ciard_deploy.distill.train_state import recipe_differences
from ciard_deploy.distill.trainer import run
from ciard_deploy.errors import RecipeError, UsageError

pytestmark = pytest.mark.unit

TRAIN = {"kind": "train", "model": {"arch": "tiny_cnn"}, "method": {"name": "natural"},
         "data": {"train_subset": 120, "batch_size": 32, "holdout": 20},
         "train": {"epochs": 1, "device": "cpu", "eval_attack": None, "select_by": "clean", "eval_n": 20,
                   "final_eval_n": 20}}


def recipe(**optim):
    return recipe_from_dict({**TRAIN, "optim": optim, "train": {**TRAIN["train"], "epochs": 300}})


def test_ciard_schedule_matches_the_reference():
    r = recipe(schedule="ciard")
    f = [lr_factor(r, i) for i in range(300)]
    assert f[0] == 1.0 and f[149] == 1.0  # epochs 1..150 at the base lr
    e = 225  # 1-based epoch 225: t = 0.5
    t = (e - 150) / 150
    assert f[e - 1] == pytest.approx((0.5 + 0.5 * math.cos(math.pi * t)) * math.exp(-0.01 * t * t))
    assert f[299] == 0.0  # exactly 0 at the last epoch
    assert all(a >= b for a, b in zip(f, f[1:]))
    short = recipe_from_dict({**TRAIN, "train": {**TRAIN["train"], "epochs": 10}})
    assert [lr_factor(short, i) for i in range(5)] == [1.0] * 5 and lr_factor(short, 9) == 0.0


def test_step_cosine_constant_schedules():
    r = recipe(schedule="step", milestones=[100, 150], gamma=0.1)
    assert lr_factor(r, 99) == 1.0 and lr_factor(r, 100) == pytest.approx(0.1) and lr_factor(r, 150) == pytest.approx(0.01)
    c = recipe(schedule="cosine")
    assert lr_factor(c, 0) == 1.0 and lr_factor(c, 150) == pytest.approx(0.5)
    assert lr_factor(recipe(schedule="constant"), 299) == 1.0


def test_selection_score():
    m = {"clean": 0.9, "pgd20@8/255": 0.5}
    assert selection_score(m, "mean", "pgd20@8/255") == pytest.approx(0.7)
    assert selection_score(m, "clean", "pgd20@8/255") == 0.9
    assert selection_score(m, "robust", "pgd20@8/255") == 0.5


def test_rng_state_survives_weights_only_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.randn(3), np.random.rand(), random.random(), torch.rand(2, generator=gen)
    state = rng_state(gen)
    torch.save(state, tmp_path / "s.pt")
    expected = (torch.randn(4), np.random.rand(3), random.random(), torch.rand(4, generator=gen))
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    gen2 = torch.Generator()
    set_rng_state(loaded, gen2)
    got = (torch.randn(4), np.random.rand(3), random.random(), torch.rand(4, generator=gen2))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and torch.equal(got[3], expected[3])


def test_existing_run_dir_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    with pytest.raises(UsageError, match="run dir exists.*--resume"):
        run(recipe_from_dict(TRAIN), out)
    with pytest.raises(UsageError, match="not a ciard run dir"):
        run(recipe_from_dict(TRAIN), out, resume=True)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert (out / "mine.txt").read_text() == "user data"


def test_resume_with_another_recipe_names_the_difference(tmp_path):
    out = tmp_path / "run"
    s = run(recipe_from_dict(TRAIN), out, stop_after_epoch=0)
    assert s["status"] == "partial"
    with pytest.raises(RecipeError, match=r"train.seed: 0 -> 1"):
        run(recipe_from_dict(TRAIN, ["train.seed=1"]), out, resume=True)


def test_fp16_on_cpu_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="fp16 needs CUDA"):
        run(recipe_from_dict(TRAIN, ["train.amp=fp16"]), tmp_path / "r", device="cpu")
    assert not (tmp_path / "r").exists()


def test_recipe_differences_lists_dotted_keys():
    a = recipe_from_dict(TRAIN)
    b = recipe_from_dict(TRAIN, ["optim.lr=0.5", "data.batch_size=16"])
    assert recipe_differences(a, b) == ["data.batch_size: 32 -> 16", "optim.lr: 0.1 -> 0.5"]


def test_ddp_shards_are_equal_disjoint_and_cover_the_epoch():
    from ciard_deploy.distill.ddp import DistContext, shard

    order = torch.randperm(103)
    parts = [shard(order, DistContext(rank=r, world_size=3)) for r in range(3)]
    assert {len(p) for p in parts} == {34}  # the tail that does not divide evenly is dropped
    seen = torch.cat(parts)
    assert len(set(seen.tolist())) == 102 and set(seen.tolist()) <= set(order.tolist())
    assert torch.equal(shard(order, DistContext()), order)  # single process: the whole epoch
