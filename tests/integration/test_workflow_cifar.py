"""`ciard run` on real CIFAR-10 images: the shipped smoke CIARD recipe (image-folder loader, its
deploy: section) on a small copy of the JPEG CIFAR-10 set (tests/conftest.py ``cifar_folder``: 50
training and 20 test images per class), teachers and student cut to one epoch. This is the path a
user takes with `ciard run smoke/... --set data.data_root=DIR`; it proves the chain (teachers,
CIARD, ONNX FP32 + INT8 calibrated on the folder's training images, a pack from its test split,
verify with Square) works on 3x32x32 real images, not how accurate so small a run is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ciard_deploy.cli import app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "recipes" / "smoke"
RECIPE = "smoke/cifar10_ciard_small_cnn_wide_to_small_cnn_linf8_smoke"
SMALL = "data: {train_subset: 400, holdout: 50}\ntrain: {epochs: 1, eval_n: 50, final_attacks: []}\n"


def test_run_on_real_cifar10_images_end_to_end(cifar_folder, tmp_path):
    for role, name in (("clean", "cifar10_natural_small_cnn_wide_smoke"),
                       ("robust", "cifar10_trades_small_cnn_wide_linf8_smoke")):
        (tmp_path / f"{role}.yaml").write_text(f"extends: {SMOKE / name}.yaml\n" + SMALL)
    sets = [f"data.data_root={cifar_folder}", f"teachers.clean.recipe={tmp_path / 'clean.yaml'}",
            f"teachers.robust.recipe={tmp_path / 'robust.yaml'}", "data.train_subset=400", "data.holdout=50",
            "train.epochs=1", "train.eval_n=50", "train.final_attacks=[]", "train.device=cpu",
            "deploy.calib_n=128", "deploy.parity_n=200", "deploy.pack.n=200", "deploy.square_queries=50",
            "deploy.square_n=40", "deploy.gates.min_clean=null", "deploy.pack.attacks=[pgd20,fgsm]",
            "deploy.pack.artifact_attacks=[mtpgd10]"]
    out, summary = tmp_path / "wf", tmp_path / "result.json"
    res = CliRunner().invoke(app, ["run", RECIPE, "--out", str(out), "--threads", "1", "--json", str(summary),
                                   *[a for s in sets for a in ("--set", s)]])
    # the gates left are relative (drops against the PyTorch student, agreement): a one-epoch student
    # near chance must still be reproduced by its runtimes, or the run exits 1
    assert res.exit_code == 0, (res.stdout, res.stderr)
    result = json.loads(summary.read_text())
    assert {k: v["action"] for k, v in result["stages"].items()} == dict.fromkeys(
        ("distill", "export", "pack", "verify"), "ran")
    st = result["state"]
    assert st["recipe"]["dataset"] == "imagefolder" and st["recipe"]["method"] == "ciard"
    assert set(st["stages"]["distill"]["inputs"]["teachers"]) == {"clean", "robust"}
    ref = result["reference"]
    assert ref["n"] == 200 and ref["eps_label"] == "8/255" and 0.10 <= ref["clean"] <= 1.0
    rows = {r["name"]: r for r in result["artifacts"]}
    assert set(rows) == {"onnx", "onnx-int8"}
    for r in rows.values():
        assert r["worst_case"]["label"] == "worst(wb(mtpgd10)+pgd20+fgsm+square50)@8/255"
        assert r["gates"]["failed"] == [] and r["worst_case"]["upper_bound"] is False
        assert abs(r["clean"] - ref["clean"]) <= 0.02
    assert rows["onnx"]["agreement"] >= 0.995 and rows["onnx-int8"]["agreement"] >= 0.95
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert manifest["model"]["input_shape"] == [3, 32, 32] and manifest["model"]["classes"][0] == "airplane"
    cal = manifest["calibration"]  # from the folder's own training images
    assert cal["dataset"] == "imagefolder" and cal["split"] == "train" and cal["n"] == 128
