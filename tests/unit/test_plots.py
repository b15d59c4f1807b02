"""Pictures: training curves from a real CIARD run's metrics.jsonl, the accuracy chart, `ciard plot`.

A PNG counts as valid when it has the PNG signature, decodes (matplotlib.image.imread), weighs
more than a few KB and is not one flat colour (pixel standard deviation above a threshold).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ciard_deploy.cli import app
from ciard_deploy.errors import ArtifactError
from ciard_deploy.plots import (accuracy_chart, curve_keys, read_metrics, rows_from_reports, safe_training_curves,
                                training_curves)

pytestmark = pytest.mark.unit
runner = CliRunner()

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CURVES = ["losses.png", "accuracy.png", "temperatures_weights.png", "learning_rates.png"]


def assert_valid_png(path: Path, min_kb: float = 8.0, min_std: float = 0.03) -> np.ndarray:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name}: not a PNG"
    assert len(data) > min_kb * 1024, f"{path.name}: only {len(data)} bytes"
    img = imread(path)  # float in [0, 1], H x W x (3|4)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, img.shape
    rgb = img[..., :3]
    assert float(rgb.std()) > min_std, f"{path.name}: nearly one flat colour (std {rgb.std():.4f})"
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 20, f"{path.name}: too few colours to be a chart"
    return img


# --------------------------------------------------------------------------- a real CIARD run (about 3 s)
@pytest.fixture(scope="module")
def ciard_run(tmp_path_factory) -> Path:
    """The shipped quick CIARD recipe, shrunk: random-init teachers given as checkpoints (no teacher
    training), 3 epochs on 300 digits, eval every epoch, teacher retraining from epoch 2."""
    import torch

    from ciard_deploy.config import find_recipe, load_recipe
    from ciard_deploy.data import get_dataset_info
    from ciard_deploy.distill.trainer import run
    from ciard_deploy.checkpoints import CheckpointMeta, save_checkpoint
    from ciard_deploy.models import create_model

    d = tmp_path_factory.mktemp("plots")
    info = get_dataset_info("digits")
    torch.manual_seed(0)
    teachers = {}
    for role in ("clean", "robust"):
        net = create_model("small_cnn", info.num_classes, info.in_chans, info.mean, info.std)
        teachers[role] = save_checkpoint(d / f"teacher_{role}", net, CheckpointMeta(
            "small_cnn", info.num_classes, tuple(info.input_shape), tuple(info.mean), tuple(info.std), "digits",
            tuple(info.classes)))
    recipe = load_recipe(find_recipe("quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15"), [
        f"teachers.clean.checkpoint={teachers['clean']}", "teachers.clean.recipe=null",
        f"teachers.robust.checkpoint={teachers['robust']}", "teachers.robust.recipe=null",
        "train.epochs=3", "data.train_subset=300", "train.eval_n=50", "train.eval_every=1",
        "train.final_eval_n=50", "attack.steps=2", "method.teacher_start_fraction=0.3"])
    run(recipe, d / "run")
    return d / "run"


def test_training_curves_of_a_real_ciard_run(ciard_run):
    paths = training_curves(ciard_run)
    assert [p.name for p in paths] == CURVES
    assert all(p.parent == ciard_run / "plots" for p in paths)
    for p in paths:
        assert_valid_png(p)
    assert not list((ciard_run / "plots").glob(".*.tmp")), "a temp file of the atomic write was left behind"


def test_the_rules_match_the_keys_the_trainer_writes(ciard_run):
    """Every CIARD quantity the issue asks for is drawn, from the trainer's own key names."""
    records = read_metrics(ciard_run)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    keys = curve_keys(records)
    label = next(k for k in records[-1]["eval"] if "@" in k)  # e.g. pgd20@0.15
    assert {"loss", "loss_rob", "loss_nat", "loss_push"} <= set(keys["losses.png"])
    assert keys["accuracy.png"][:2] == ["clean", label] and "score" not in keys["accuracy.png"]
    assert {"tau_robust", "tau_clean", "w_rob", "w_nat"} <= set(keys["temperatures_weights.png"])
    assert {"lr", "teacher_lr"} <= set(keys["learning_rates.png"])
    # nothing the trainer logs per epoch as a loss, temperature, weight or lr escapes the rules
    flat = {k for r in records for k in r}
    drawn = {k for ks in keys.values() for k in ks}
    for k in flat:
        if k.startswith(("loss", "tau_", "w_")) or k == "lr" or k.endswith("_lr"):
            assert k in drawn, k


def test_cli_plot_writes_to_out_and_prints_the_paths(ciard_run, tmp_path):
    out = tmp_path / "pictures"
    res = runner.invoke(app, ["plot", str(ciard_run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    printed = [Path(ln.strip()) for ln in res.output.strip().splitlines()]
    assert printed == [out / name for name in CURVES]
    for p in printed:
        assert_valid_png(p)


# --------------------------------------------------------------------------- synthetic records: rules and edge cases
def _write_metrics(run_dir: Path, lines: list[str]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines))
    return run_dir


def _trades_record(epoch: int, **extra) -> dict:
    """What a TRADES teacher run writes (no temperatures, no weights), eval every other epoch."""
    rec = {"epoch": epoch, "lr": 0.1 * 0.5 ** epoch, "loss": 2.0 / epoch, "loss_nat": 1.5 / epoch,
           "loss_rob": 0.5 / epoch, "acc": 0.5 + 0.05 * epoch, "images": 1600, "time_s": 1.2, "images_per_s": 1333.3}
    if epoch % 2 == 0:
        rec["eval"] = {"clean": 0.6 + 0.05 * epoch, "pgd20@8/255": 0.2 + 0.03 * epoch, "score": 0.5}
    rec.update(extra)
    return rec


def test_absent_keys_leave_their_figure_out(tmp_path):
    run_dir = _write_metrics(tmp_path / "trades", [json.dumps(_trades_record(e)) for e in range(1, 7)])
    paths = training_curves(run_dir)
    assert [p.name for p in paths] == ["losses.png", "accuracy.png", "learning_rates.png"]
    for p in paths:
        assert_valid_png(p)
    keys = curve_keys(read_metrics(run_dir))
    assert keys["accuracy.png"] == ["clean", "pgd20@8/255", "acc"]


def test_resumed_and_cut_short_metrics_are_read_sensibly(tmp_path, caplog):
    lines = [json.dumps(_trades_record(e)) for e in (1, 2, 3)]
    lines.append(json.dumps(_trades_record(2, loss=9.0)))  # epoch 2 again (a resumed run): the later line wins
    lines.append('{"epoch": 4, "lr": 0.0')  # a write cut short by a crash
    run_dir = _write_metrics(tmp_path / "resumed", lines)
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[1]["loss"] == 9.0
    assert "not JSON" in caplog.text


def test_flat_eval_keys_and_worst_case_labels(tmp_path):
    rec = {"epoch": 1, "loss": 1.0, "eval/clean": 0.9, "eval/fgsm@0.1": 0.5, "eval/score": 0.7,
           "eval": {"pgd20@0.1": 0.4, "worst(fgsm+pgd20)@0.1": 0.35}}
    keys = curve_keys([rec])
    assert keys["accuracy.png"] == ["clean", "pgd20@0.1", "fgsm@0.1", "worst(fgsm+pgd20)@0.1"]


def test_learning_rates_that_reach_zero_or_are_all_zero(tmp_path):
    recs = [{"epoch": e, "loss": 1.0, "lr": 0.1 * (3 - e) / 2, "teacher_lr": 0.0, "temp_lr": 10.0 ** -(3 * e)}
            for e in (1, 2, 3)]
    run_dir = _write_metrics(tmp_path / "zeros", [json.dumps(r) for r in recs])
    paths = training_curves(run_dir, tmp_path / "out")
    assert [p.name for p in paths] == ["losses.png", "learning_rates.png"]
    assert_valid_png(paths[1])


def test_metrics_file_path_is_accepted(tmp_path):
    run_dir = _write_metrics(tmp_path / "r", [json.dumps(_trades_record(e)) for e in (1, 2)])
    paths = training_curves(run_dir / "metrics.jsonl")
    assert paths[0].parent == run_dir / "plots"


@pytest.mark.parametrize("setup, needle", [
    (lambda d: d.mkdir(), "has no metrics.jsonl"),
    (lambda d: None, "run dir not found"),
    (lambda d: _write_metrics(d, ["", "not json"]), "no epoch records"),
    (lambda d: _write_metrics(d, [json.dumps({"epoch": 1, "images": 10})]), "nothing to plot"),
])
def test_unusable_run_dirs_raise_one_line_artifact_errors(tmp_path, setup, needle):
    run_dir = tmp_path / "run"
    setup(run_dir)
    with pytest.raises(ArtifactError, match=needle) as exc:
        training_curves(run_dir)
    assert "\n" not in str(exc.value)
    assert safe_training_curves(run_dir) == []  # the end-of-training hook only logs


def test_cli_plot_without_metrics_exits_2_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["plot", str(tmp_path / "empty")])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(" ".join(lines)) and lines[0].startswith("error:") and "metrics.jsonl" in res.output
    assert "Traceback" not in res.output


# --------------------------------------------------------------------------- accuracy chart
def _report(name: str, clean: float, pgd: float, square: float, ref_clean: float = 0.92, ref_pgd: float = 0.55,
            checksum: str = "sha256:aaaa1111bbbb") -> dict:
    """The keys of a verify report (verify/report.py) that the chart reads."""
    return {
        "artifact": {"name": name, "path": f"export/{name}"},
        "pack": {"checksum": checksum},
        "results": {
            "clean_acc": clean, "reference_clean_acc": ref_clean,
            "attacks": [
                {"label": "pgd20@8/255", "kind": "transfer", "robust_acc": pgd, "reference_acc": ref_pgd},
                {"label": "square1000@8/255", "kind": "query", "robust_acc": square, "reference_acc": None},
            ],
            "worst_case_transfer": {"label": "worst(pgd20)@8/255", "acc": pgd, "reference_acc": ref_pgd},
            "worst_case": {"label": "worst(pgd20+square1000)@8/255", "acc": min(pgd, square)},
        },
    }


def test_rows_from_reports_put_pytorch_first():
    rows = rows_from_reports([_report("model.onnx", 0.92, 0.55, 0.6), _report("model.int8.onnx", 0.9, 0.5, 0.58)])
    assert [r["model"] for r in rows] == ["pytorch", "model.onnx", "model.int8.onnx"]
    assert rows[0] == {"model": "pytorch", "clean": 0.92, "pgd20@8/255": 0.55, "worst(pgd20)@8/255": 0.55}
    assert rows[2]["square1000@8/255"] == 0.58 and rows[2]["worst(pgd20+square1000)@8/255"] == 0.5
    two_packs = rows_from_reports([_report("a.onnx", .9, .5, .5), _report("b.onnx", .9, .5, .5, checksum="sha256:cc")])
    assert [r["model"] for r in two_packs][:2] == ["pytorch (pack aaaa1111)", "pytorch (pack cc)"]


def test_accuracy_chart_is_a_valid_png(tmp_path):
    rows = rows_from_reports([_report("model.onnx", 0.92, 0.55, 0.6), _report("model.fp16.onnx", 0.92, 0.55, 0.61),
                              _report("model.int8.onnx", 0.9, 0.5, 0.58)])
    path = accuracy_chart(rows, tmp_path / "charts" / "verify.png")
    assert path == tmp_path / "charts" / "verify.png"
    assert_valid_png(path)


@pytest.mark.parametrize("rows, needle", [
    ([], "no rows"),
    ([{"clean": 0.9}], "without 'model'"),
    ([{"model": "pytorch", "clean": 91.0}], "not a fraction"),
    ([{"model": "pytorch", "precision": "fp32"}], "no accuracy"),
])
def test_accuracy_chart_rejects_bad_rows(tmp_path, rows, needle):
    with pytest.raises(ValueError, match=needle):
        accuracy_chart(rows, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- imports stay lazy
def test_importing_plots_and_the_cli_loads_neither_matplotlib_nor_torch():
    code = ("import sys, ciard_deploy.plots, ciard_deploy.cli; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'torch')); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
