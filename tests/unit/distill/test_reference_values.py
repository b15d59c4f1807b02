"""Golden per-step numbers of every method (tools/reference_check.py): recomputed and compared at relative
1e-9, so a change to any method's arithmetic fails here; and the reference scripts' step details that the
paper recipes select (issue 15), each checked for the effect the script's documented behaviour predicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ciard_deploy.distill.losses import pgd_train_attack
from ciard_deploy.distill.methods import create_method
from ciard_deploy.options.methods import ArdConfig, MtardConfig, TradesConfig

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("reference_check")


@pytest.fixture(scope="module")
def computed(tool):
    return tool.compute_all()


@pytest.fixture(scope="module")
def golden():
    return json.loads((ROOT / "tests" / "unit" / "distill" / "reference_values.json").read_text())


def test_every_method_matches_its_golden_values(tool, computed, golden):
    assert tool.differences(computed, golden) == []
    names = set(golden["cases"])
    assert {"natural", "pgd_at", "trades", "ard", "rslad", "mtard", "ciard"} <= names
    # the paper recipes differ from the engine defaults exactly where issue 15 says the scripts do
    assert names - set(tool.METHOD_NAMES) == {"trades@paper", "ard@paper", "mtard@paper"}
    assert computed["settings"]["dtype"] == "float64" and all(len(c["steps"]) == 3 for c in computed["cases"].values())


def test_a_changed_value_is_caught(tool, golden):
    bent = json.loads(json.dumps(golden))
    step = bent["cases"]["ciard"]["steps"][2]
    step["student_sum"] *= 1 + 1e-8
    assert tool.differences(bent, golden) != [] and tool.differences(golden, golden) == []
    assert any("ciard step 3 student_sum" in d for d in tool.differences(bent, golden))


def test_the_paper_settings_have_the_scripts_effects(golden):
    c = golden["cases"]
    trades, trades_p = c["trades"]["steps"], c["trades@paper"]["steps"]
    # TRADES' third clean forward: same loss and parameters after step 1, BatchNorm moved once more
    assert trades_p[0]["loss"] == trades[0]["loss"] and trades_p[0]["student_sum"] == trades[0]["student_sum"]
    assert trades_p[0]["student_buffers_sum"] != trades[0]["student_buffers_sum"]
    assert trades_p[1]["x_adv_sum"] != trades[1]["x_adv_sum"]  # the next eval-mode attack differs
    # ARD's train-mode attack moves BatchNorm during the attack: the first step already differs
    assert c["ard@paper"]["steps"][0]["x_adv_sum"] != c["ard"]["steps"][0]["x_adv_sum"]
    # MTARD: T = 1 throughout; the weight step shrinks after the milestone epoch, not from its start
    mtard, mtard_p = c["mtard"]["steps"], c["mtard@paper"]["steps"]
    assert all(s["tau_clean"] == s["tau_robust"] == 1.0 for s in mtard_p) and mtard[1]["tau_clean"] != 1.0
    assert [s["weight_lr"] for s in mtard] == [0.025, 0.0025, 2.5e-05]
    assert [s["weight_lr"] for s in mtard_p] == [0.025, 0.025, 0.0025]
    assert c["mtard@paper"]["params"]["clean_forward"] == "after_attack"


# --------------------------------------------------------------------------- the options one by one
def bn_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5)).double()


def test_train_mode_attack_updates_batchnorm_on_every_step_and_restores_the_mode():
    net, x, y = bn_net(), torch.rand(4, 3, 6, 6, dtype=torch.float64), torch.arange(4)
    net.eval()
    pgd_train_attack(net, x, y, eps=8 / 255, steps=3, start="none")
    assert int(net[1].num_batches_tracked) == 0 and not net.training
    pgd_train_attack(net, x, y, eps=8 / 255, steps=3, start="none", train_mode=True)
    assert int(net[1].num_batches_tracked) == 3 and not net.training


def test_unclamped_uniform_start_leaves_the_unit_cube_before_the_first_step():
    seen = []
    net = bn_net().eval()
    net.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    x = torch.zeros(2, 3, 6, 6, dtype=torch.float64)  # every uniform start below 0 would be clipped
    for clamp in (True, False):
        torch.manual_seed(0)
        out = pgd_train_attack(net, x, torch.arange(2), eps=8 / 255, steps=1, start="uniform", clamp_start=clamp)
        assert out.min() >= 0.0  # the projection after each step clips either way
    assert seen[0].min() >= 0.0 and seen[1].min() < 0.0


def test_mtard_after_attack_runs_the_clean_forward_after_the_adversarial_one():
    order: dict[str, list[str]] = {}
    for mode in ("before_attack", "after_attack"):
        student = bn_net(1)
        seen: list[str] = []
        student.register_forward_pre_hook(lambda m, inp, seen=seen: seen.append("train" if m.training else "attack"))
        x = torch.rand(4, 3, 6, 6, dtype=torch.float64)
        m = create_method("mtard", {"clean_forward": mode}, student, {"clean": bn_net(2), "robust": bn_net(3)},
                          num_classes=5, eps=8 / 255, attack_steps=2)
        m.train_step(x, torch.arange(4), 0)
        order[mode] = [s for i, s in enumerate(seen) if s == "train" or i == 0 or seen[i - 1] != "attack"]
    assert order["before_attack"] == ["train", "attack", "train"]  # clean, attack, adversarial
    assert order["after_attack"] == ["attack", "train", "train"]  # attack, adversarial, clean


def test_new_fields_leave_the_dump_at_their_default_so_recipe_hashes_are_kept():
    assert not {"attack_mode", "clamp_start"} & set(ArdConfig().model_dump())
    assert not {"shrink_at", "clean_forward"} & set(MtardConfig().model_dump())
    assert "third_clean_forward" not in TradesConfig().model_dump()
    assert TradesConfig(third_clean_forward=True).model_dump()["third_clean_forward"] is True
    with pytest.raises(ValueError, match="shrink_at 'end' needs shrink_mode 'once'"):
        MtardConfig(shrink_at="end", shrink_mode="per_batch")
