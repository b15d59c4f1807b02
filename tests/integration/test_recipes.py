"""Every shipped recipe validates (teacher recipes included) and follows the naming and header
conventions; every quick digits recipe runs one short epoch (torchtune's test_configs idea)."""

from __future__ import annotations

import json
import math

import pytest

from ciard_deploy.config import DistillRecipe, check_recipe_tree, list_recipes, load_recipe, recipes_dir
from ciard_deploy.distill.trainer import run

pytestmark = pytest.mark.integration


SHIPPED = list_recipes()
QUICK = [n for n in SHIPPED if n.startswith("quick/") or n.startswith("teachers/digits_")]


def test_the_expected_recipes_are_shipped():
    names = set(SHIPPED)
    for ds in ("cifar10", "cifar100", "tinyimagenet"):
        for student in ("resnet18", "mobilenetv2"):
            assert f"{ds}/{ds}_ciard_wrn-34-10_to_{student}_linf8" in names
        for teacher in ("natural_resnet56", "trades_wrn-34-10_linf8", "pgd_at_wrn-34-10_linf8"):
            assert f"teachers/{ds}_{teacher}" in names
    for method in ("pgd_at", "trades", "ard", "rslad", "mtard"):
        assert any(n.startswith(f"cifar10/cifar10_{method}_") and "resnet18" in n for n in names), method
    quick_methods = {load_recipe(SHIPPED[n]).method.name for n in QUICK}
    assert quick_methods == {"natural", "pgd_at", "trades", "ard", "rslad", "mtard", "ciard"}
    assert "smoke/cifar10_ciard_small_cnn_wide_to_small_cnn_linf8_smoke" in names


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_recipe_validates_and_follows_conventions(name):
    path = SHIPPED[name]
    r = load_recipe(path)
    assert check_recipe_tree(r) == [], name
    first = path.read_text().splitlines()[0]
    rel = path.relative_to(recipes_dir())
    assert first.startswith(f"# ciard {r.kind} recipes/{rel.as_posix()} --out "), first
    stem = path.stem
    dataset = "cifar10" if r.data.dataset == "imagefolder" else r.data.dataset
    assert stem.startswith(f"{dataset}_{r.method.name}_"), stem
    assert r.model_spec.arch in stem, stem
    if r.train.epochs >= 100:  # the paper settings
        assert r.data.batch_size == 128 and r.attack.eps == pytest.approx(8 / 255)
    paper = name.split("/")[0] in ("cifar10", "cifar100", "tinyimagenet")
    if paper and isinstance(r, DistillRecipe) and r.method.name == "ciard":
        assert r.train.epochs == 300 and r.optim.schedule == "ciard" and r.train.selection == "test"
    elif paper:  # the baselines: their authors' step schedules (issue 15; test_paper_schedules checks each)
        assert r.optim.schedule == "step" and r.optim.milestones[-1] < r.train.epochs and r.train.selection == "test"


@pytest.mark.slow  # the first distill case trains the shipped digits teachers (~40 s)
@pytest.mark.parametrize("name", sorted(QUICK))
def test_quick_recipe_smoke_runs_one_short_epoch(name, tmp_path):
    """One epoch on 300 images (teachers come from their full recipes, trained once per session)."""
    r = load_recipe(SHIPPED[name], ["train.epochs=1", "data.train_subset=300", "train.final_eval_n=60"])
    s = run(r, tmp_path / "run")
    assert s["status"] == "complete"
    label = f"pgd20@{s['eps_label']}"
    assert set(s["last"]) == {"clean", label}
    assert all(0.0 <= v <= 1.0 for v in s["last"].values())
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(line["loss"]) and line["images"] > 0


#: `ciard run` on every quick recipe but CIARD's (test_workflow and test_quickstart run that one in full):
#: one epoch on 300 images (teachers from their full recipes, trained once per session, as above), then
#: the whole deploy chain on small budgets: ONNX FP32, a 60-image fgsm pack, Square 20 live on 20 images.
#: Gates an epoch can pass (agreement with PyTorch), so exit 0 proves the chain, not the model.
RUN_SETS = ["train.epochs=1", "data.train_subset=300", "train.final_eval_n=60", "train.final_attacks=[]",
            "deploy.formats=[onnx]", "deploy.parity_n=60", "deploy.pack.n=60", "deploy.pack.attacks=[fgsm]",
            "deploy.pack.artifact_attacks=[]", "deploy.live_attacks=[square20]", "deploy.live_n=20",
            "deploy.gates={min_agreement: 0.99}"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n in SHIPPED if n.startswith("quick/") and "_ciard_" not in n))
def test_quick_recipe_runs_the_whole_chain(name, tmp_path):
    from typer.testing import CliRunner

    from ciard_deploy.cli import app

    out, summary = tmp_path / "wf", tmp_path / "result.json"
    args = ["run", name, "--out", str(out), "--threads", "1", "--quiet", "--json", str(summary)]
    res = CliRunner().invoke(app, args + [a for s in RUN_SETS for a in ("--set", s)])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    result = json.loads(summary.read_text())
    assert result["status"] == "passed"
    assert {k: v["action"] for k, v in result["stages"].items()} == dict.fromkeys(
        ("distill", "export", "pack", "verify"), "ran")
    (row,) = result["artifacts"]
    assert row["name"] == "onnx" and row["agreement"] >= 0.99
    assert row["worst_case"]["label"] == "worst(fgsm+square20)@0.15" and row["worst_case"]["upper_bound"]
    assert (out / "verify" / "onnx.json").is_file() and (out / "export" / "model.onnx").is_file()
