"""`ciard distill`, `ciard train` and `ciard recipe ...` end to end: wiring, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ciard_deploy.cli import app
from ciard_deploy.config import load_recipe

pytestmark = pytest.mark.integration


runner = CliRunner()
CIARD_QUICK = "quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15"

TINY = {"kind": "train", "model": {"arch": "tiny_cnn"}, "method": {"name": "natural"},
        "data": {"dataset": "digits", "train_subset": 120, "holdout": 20, "batch_size": 40},
        "train": {"epochs": 2, "device": "cpu", "eval_attack": None, "select_by": "clean", "eval_n": 20,
                  "final_eval_n": 40, "final_attacks": ["fgsm"]},
        "attack": {"eps": 0.1}}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(res, code: int, *needles: str) -> None:
    out = res.output
    assert res.exit_code == code, out
    assert "Traceback" not in out, out
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    err_lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1, out
    for n in needles:
        assert n in out, out


@pytest.fixture()
def tiny_recipe(tmp_path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text("# ciard train tiny.yaml --out runs/tiny\n" + yaml.safe_dump(TINY))
    return p


def test_train_end_to_end_then_refuses_to_overwrite(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    res = invoke("train", tiny_recipe, "--out", out, "--quiet", "--set", "train.seed=3")
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "complete" and s["seed"] == 3 and set(s["last"]) == {"clean", "fgsm@0.1"}
    assert "fgsm@0.1" in res.output and "epoch 1/2" not in res.output  # the table prints; --quiet hid progress
    curves = sorted(p.name for p in (out / "plots").glob("*.png"))  # drawn at the end of every run
    assert "losses.png" in curves and "accuracy.png" in curves, curves
    res = invoke("train", tiny_recipe, "--out", out, "--set", "train.seed=3")
    assert_user_error(res, 2, "run dir exists", "--resume")
    res = invoke("train", tiny_recipe, "--out", out, "--set", "train.seed=4", "--resume")
    assert_user_error(res, 2, "train.seed: 3 -> 4")
    res = invoke("train", tiny_recipe, "--out", out, "--set", "train.seed=3", "--resume", "--quiet")
    assert res.exit_code == 0, res.output  # already complete: returns its summary


def test_progress_lines_off_a_terminal(tiny_recipe, tmp_path):
    res = invoke("train", tiny_recipe, "--out", tmp_path / "run", "--set", "train.epochs=1")
    assert res.exit_code == 0, res.output
    assert "epoch 1/1  loss" in res.output and "img/s" in res.output


@pytest.mark.parametrize("args, needles", [
    (["--set", "method.bta=3", "--set", "method.name=trades"], ["method.bta: unknown key (did you mean 'beta'?)"]),
    (["--set", "train.epochs"], ["expected KEY=VALUE"]),
    (["--set", "train.amp=fp16", "--device", "cpu"], ["fp16 needs CUDA"]),
    (["--device", "tpu"], ["unknown device 'tpu'"]),
])
def test_bad_inputs_are_one_line_exit_2(tiny_recipe, tmp_path, args, needles):
    res = invoke("train", tiny_recipe, "--out", tmp_path / "r", *args)
    assert_user_error(res, 2, *needles)


def test_wrong_verb_and_missing_recipe(tiny_recipe, tmp_path):
    assert_user_error(invoke("distill", tiny_recipe, "--out", tmp_path / "r"), 2, "kind 'train'", "ciard train")
    assert_user_error(invoke("distill", tmp_path / "nope.yaml", "--out", tmp_path / "r"), 2, "recipe not found")
    assert_user_error(invoke("distill", "digits_ciard_small_cnn", "--out", tmp_path / "r"), 2,
                      "neither a file nor a shipped recipe name")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: distill\nstudent: [\n")
    assert_user_error(invoke("distill", bad, "--out", tmp_path / "r"), 2, "not valid YAML")


def test_recipe_ls_show_validate_cp(tmp_path):
    res = invoke("recipe", "ls")
    assert res.exit_code == 0, res.output
    assert "quick/digits_natural_none_to_tiny_cnn" in res.output and "ciard" in res.output
    res = invoke("recipe", "show", CIARD_QUICK, "--set", "train.epochs=3")
    assert res.exit_code == 0, res.output
    assert "epochs: 3" in res.output and "push_loss" in res.output and "contrastive" in res.output
    res = invoke("recipe", "validate", CIARD_QUICK, "quick/digits_rslad_small_cnn_to_tiny_cnn_linf0.15")
    assert res.exit_code == 0 and res.output.count("ok") == 2, res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "optim": {"lr": 0.1, "momentun": 0.9}}))
    res = invoke("recipe", "validate", CIARD_QUICK, bad)
    assert res.exit_code == 2, res.output
    assert "optim.momentun: unknown key (did you mean 'momentum'?)" in res.output and "Traceback" not in res.output
    dest = tmp_path / "mine.yaml"
    res = invoke("recipe", "cp", CIARD_QUICK, dest)
    assert res.exit_code == 0, res.output
    text = dest.read_text()
    assert text.startswith(f"# ciard distill {dest}") and "\nextends:" not in text
    assert load_recipe(dest).hash == load_recipe(load_recipe_path(CIARD_QUICK)).hash  # self-contained, same recipe
    assert_user_error(invoke("recipe", "cp", CIARD_QUICK, dest), 2, "exists", "--force")
    assert invoke("recipe", "cp", CIARD_QUICK, dest, "--force").exit_code == 0


def load_recipe_path(name: str) -> Path:
    from ciard_deploy.config import find_recipe

    return find_recipe(name)


def test_sigint_saves_and_prints_how_to_resume(tiny_recipe, tmp_path):
    """The real process: SIGINT finishes the step, saves, exits 130 with the resume command."""
    out = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "ciard_deploy", "train", str(tiny_recipe), "--out", str(out),
           "--set", "train.epochs=200"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while not (out / "train_state.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "Traceback" not in output, output
    assert "interrupted (SIGINT)" in output and "--resume" in output and "train.epochs=200" in output
    state = load_state(out)
    assert 1 <= state["epoch"] < 200
    assert not (out / "summary.json").exists()


def load_state(out: Path) -> dict:
    import torch

    return torch.load(out / "train_state.pt", weights_only=True)


def test_sigterm_while_a_teacher_trains_keeps_its_cache_and_the_next_call_resumes_it(tmp_path, monkeypatch):
    """`ciard distill` trains a recipe teacher into the cache first; a SIGTERM there (a preempted job)
    exits 130 with the teacher's state saved in the cache, and the next call resumes the teacher at
    the epoch after the saved one instead of training it again from scratch."""
    from ciard_deploy.distill.events import TrainingInterrupted
    from ciard_deploy.distill.trainer import train_teacher
    from ciard_deploy.lock import folder_lock

    teacher = tmp_path / "teacher.yaml"
    teacher.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "epochs": 200, "final_attacks": []}}))
    student = tmp_path / "student.yaml"
    student.write_text(yaml.safe_dump({
        "kind": "distill", "student": {"arch": "tiny_cnn"}, "method": {"name": "rslad"},
        "teachers": {"robust": {"recipe": str(teacher)}}, "data": TINY["data"], "attack": TINY["attack"],
        "train": {**TINY["train"], "epochs": 1, "final_attacks": []}}))
    cache = tmp_path / "cache"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "CIARD_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, "-m", "ciard_deploy", "distill", str(student), "--out", str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    while not list(cache.glob("teachers/*/train_state.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "interrupted (SIGTERM)" in output and "Traceback" not in output, output

    (run_dir,) = [d for d in (cache / "teachers").iterdir() if d.is_dir()]
    files = set(os.listdir(run_dir))
    assert {"train_state.pt", "metrics.jsonl", "recipe.yaml", "student_last.safetensors"} <= files
    assert "summary.json" not in files  # not mistaken for a finished teacher
    saved = load_state(run_dir)["epoch"]
    assert 1 <= saved < 200
    with folder_lock(run_dir):  # the cache run's lock was released with the process (InUse otherwise)
        pass

    seen: list[int] = []

    def stop_after_one_epoch(ev):
        if ev.kind == "epoch_end":
            seen.append(ev.epoch)
            ev.control.request_stop("test")

    monkeypatch.setenv("CIARD_CACHE", str(cache))
    with pytest.raises(TrainingInterrupted):
        train_teacher(load_recipe(teacher), "robust", "cpu", callbacks=[stop_after_one_epoch])
    assert seen == [saved + 1]  # resumed from the cache, not restarted
    epochs = [json.loads(ln)["epoch"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, saved + 2))
