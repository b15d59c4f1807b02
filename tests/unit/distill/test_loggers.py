"""train.loggers: a real tiny CIARD run on digits, stopped, resumed and rolled back, writes to TensorBoard
(read back with its EventAccumulator) and MLflow (a local file store, read back with MlflowClient) the same
numbers as metrics.jsonl, one value per epoch; a missing tracker is exit 3 before training, an unknown one
a recipe error with a near match."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ciard_deploy.config import recipe_from_dict
from ciard_deploy.data import get_dataset_info
from ciard_deploy.distill import loggers
from ciard_deploy.distill.loggers import MLFLOW_RECORD, TB_DIR, check_installed, scalars
from ciard_deploy.distill.trainer import run
from ciard_deploy.checkpoints import CheckpointMeta, save_checkpoint
from ciard_deploy.errors import EXIT_ENVIRONMENT, EnvironmentMissing, RecipeError
from ciard_deploy.models import create_model

pytestmark = pytest.mark.unit

INFO = get_dataset_info("digits")
HAS_MLFLOW = loggers.importlib.util.find_spec("mlflow") is not None
TIMING = {"train/time_s", "train/images_per_s"}  # measured again when an epoch is trained again


def ciard_recipe(teachers: dict[str, Path], names: list[str], epochs: int = 3):
    return recipe_from_dict({
        "kind": "distill", "student": {"arch": "tiny_cnn"},
        "teachers": {r: {"checkpoint": str(p)} for r, p in teachers.items()},
        "method": {"name": "ciard", "teacher_start_fraction": 0.0},
        "data": {"dataset": "digits", "train_subset": 120, "holdout": 20, "batch_size": 40},
        "attack": {"eps": 0.2, "steps": 1, "step_size": 0.2},
        "train": {"epochs": epochs, "seed": 3, "device": "cpu", "eval_attack": "pgd2", "eval_n": 20,
                  "final_eval_n": 20, "final_attacks": [], "eval_step_size": 0.1, "loggers": names},
    })


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("teachers")
    out = {}
    for i, role in enumerate(("clean", "robust")):
        torch.manual_seed(50 + i)
        m = create_model("tiny_cnn", 10, 1, INFO.mean, INFO.std)
        out[role] = save_checkpoint(d / role, m, CheckpointMeta("tiny_cnn", 10, INFO.input_shape, INFO.mean,
                                                                   INFO.std, "digits"))
    return out


@pytest.fixture(scope="module")
def logged_run(teachers, tmp_path_factory) -> Path:
    """Epoch 1, stop; resume through epoch 2, stop; then the state of epoch 1 put back (as if the run had died
    between epoch 2's metrics line and its state) and resumed to the end: epoch 2 is trained twice."""
    names = ["tensorboard", "mlflow"] if HAS_MLFLOW else ["tensorboard"]
    out = tmp_path_factory.mktemp("logged") / "run"
    recipe = ciard_recipe(teachers, names)
    assert run(recipe, out, stop_after_epoch=1)["status"] == "partial"
    shutil.copy(out / "train_state.pt", out.parent / "epoch1.pt")
    assert run(recipe, out, resume=True, stop_after_epoch=2)["status"] == "partial"
    shutil.copy(out.parent / "epoch1.pt", out / "train_state.pt")
    assert run(recipe, out, resume=True)["status"] == "complete"
    return out


def jsonl_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as tag -> [(epoch, value)], through the same naming the trackers get."""
    out: dict[str, list[tuple[int, float]]] = {}
    for ln in (run_dir / "metrics.jsonl").read_text().splitlines():
        line = json.loads(ln)
        for tag, v in scalars(line).items():
            out.setdefault(tag, []).append((line["epoch"], v))
    return out


def test_scalars_name_every_number_of_a_line():
    line = {"epoch": 2, "lr": 0.1, "loss": 1.5, "tau_clean": 4.0, "w_rob": 0.3, "images": 100, "time_s": 1.2,
            "eval": {"clean": 0.5, "pgd20@8/255": 0.25, "score": 0.375}}
    assert scalars(line) == {"train/lr": 0.1, "train/loss": 1.5, "train/tau_clean": 4.0, "train/w_rob": 0.3,
                             "train/images": 100.0, "train/time_s": 1.2, "eval/clean": 0.5,
                             "eval/pgd20@8/255": 0.25, "eval/score": 0.375}
    assert loggers._mlflow_key("eval/pgd20@8/255") == "eval/pgd20_at_8/255"


def test_tensorboard_holds_metrics_jsonl_once_per_epoch(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    expected = jsonl_scalars(logged_run)
    assert [e for e, _ in expected["train/loss"]] == [1, 2, 3]
    for key in ("train/lr", "train/tau_clean", "train/tau_robust", "train/w_rob", "train/teacher_lr",
                "eval/clean", "eval/pgd2@0.2", "eval/score"):
        assert key in expected, key  # losses, temperatures, push weight, lrs, clean/robust selection
    acc = EventAccumulator(str(logged_run / TB_DIR), size_guidance={"scalars": 0}).Reload()
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(ev.step, ev.value) for ev in acc.Scalars(tag)]
        assert [s for s, _ in got] == [e for e, _ in points], tag  # epoch 2's first events were purged
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32 events


@pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow (the `mlflow` extra) is not installed here")
def test_mlflow_holds_metrics_jsonl_once_per_epoch(logged_run):
    from mlflow import MlflowClient

    rec = json.loads((logged_run / MLFLOW_RECORD).read_text())
    assert rec["tracking_uri"] == f"file:{(logged_run / 'mlruns').resolve()}"
    client = MlflowClient(tracking_uri=rec["tracking_uri"])
    mrun = client.get_run(rec["run_id"])
    assert mrun.info.status == "FINISHED" and mrun.info.run_name == "run"
    assert mrun.data.params["train.epochs"] == "3" and mrun.data.params["method.name"] == "ciard"
    expected = jsonl_scalars(logged_run)
    assert set(mrun.data.metrics) == {loggers._mlflow_key(t) for t in expected}
    for tag, points in expected.items():
        got = sorted((m.step, m.value) for m in client.get_metric_history(rec["run_id"], loggers._mlflow_key(tag)))
        assert [s for s, _ in got] == [1, 2, 3], tag  # the resumed run reopened it; epoch 2 is not there twice
        if tag not in TIMING:  # epoch 2 trained again from the same state: the same numbers (CPU is bit-exact)
            assert [v for _, v in got] == [v for _, v in points], tag


def test_unknown_logger_is_a_recipe_error_with_a_near_match(teachers):
    with pytest.raises(RecipeError, match=r"train\.loggers.*Did you mean 'tensorboard'"):
        ciard_recipe(teachers, ["tensorbord"])
    with pytest.raises(RecipeError, match="named twice"):
        ciard_recipe(teachers, ["tensorboard", "tensorboard"])


def test_loggers_leave_the_recipe_hash_alone(teachers):
    assert ciard_recipe(teachers, ["tensorboard"]).hash == ciard_recipe(teachers, []).hash
    assert ciard_recipe(teachers, ["tensorboard"]).to_dict()["train"]["loggers"] == ["tensorboard"]


def test_a_missing_tracker_is_exit_3_before_training(teachers, tmp_path, monkeypatch):
    monkeypatch.setitem(loggers.REQUIREMENTS, "mlflow", ("ciard_no_such_module", "mlflow"))
    with pytest.raises(EnvironmentMissing) as e:
        check_installed(["tensorboard", "mlflow"])
    assert e.value.exit_code == EXIT_ENVIRONMENT
    assert str(e.value) == "train.loggers: mlflow is not installed here: pip install 'ciard-deploy[mlflow]'"
    out = tmp_path / "run"
    with pytest.raises(EnvironmentMissing, match=r"ciard-deploy\[mlflow\]"):
        run(ciard_recipe(teachers, ["mlflow"]), out)
    assert not out.exists()  # nothing written, nothing trained
