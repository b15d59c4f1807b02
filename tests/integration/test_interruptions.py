"""Concurrency and faults, with real processes where signals matter (issue 12, items 7 and 8).

- Two trainings into one run folder: the second process is refused (exit 2, one line naming the
  holder's pid) and the first completes with files that are its own alone.
- A state save that fails (a full disk) after an epoch's metrics line was written, and a torn line:
  ``--resume`` lists every epoch once, with the numbers of an uninterrupted run.
- SIGTERM (a CI cancel) of ``ciard pack``: exit 130 and one line saying what was kept; the same
  command completes to the arrays of an uninterrupted build.
- SIGKILL of ``ciard export``: its staging folder stays behind until the same command, which
  succeeds, removes it and writes the same model file as an uninterrupted export.
- SIGTERM of ``ciard verify --state``: exit 130, the state saved; the same command gives the numbers
  of an uninterrupted verify.

Each uses the session's digits fixtures (tests/conftest.py) and tiny settings.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

pytestmark = pytest.mark.integration

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "200"}
TINY = {"kind": "train", "model": {"arch": "tiny_cnn"}, "method": {"name": "natural"},
        "data": {"dataset": "digits", "train_subset": 120, "holdout": 20, "batch_size": 40},
        "train": {"epochs": 2, "device": "cpu", "eval_attack": None, "select_by": "clean", "eval_n": 20,
                  "final_eval_n": 40, "final_attacks": ["fgsm"]},
        "attack": {"eps": 0.1}}
EPS, STEP = 0.15, 0.04


def ciard(*args: object, log: Path) -> subprocess.Popen:
    """``python -m ciard_deploy ARGS`` in its own process, stdout and stderr into ``log``."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "ciard_deploy", *map(str, args)], stdout=f,
                                stderr=subprocess.STDOUT, env=ENV, text=True)


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], log: Path, timeout: float = 120) -> None:
    """Polls ``ready`` until it holds; fails (with the process's output) if the process ended first."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.02)


def one_line(text: str) -> str:
    return " ".join(text.split())


def metric_epochs(run_dir: Path) -> list[int]:
    return [json.loads(ln)["epoch"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def tiny_recipe(tmp_path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text("# ciard train tiny.yaml --out runs/tiny\n" + yaml.safe_dump(TINY))
    return p


# --------------------------------------------------------------------------- one run folder, two processes
def test_a_second_training_into_the_same_folder_is_refused_and_the_first_completes(tiny_recipe, tmp_path):
    """While this process trains into OUT, `ciard train R --out OUT --resume` (which would otherwise continue the
    run and append its own epochs) exits 2 with one line naming this pid; this run completes alone."""
    from ciard_deploy.distill.trainer import run

    out = tmp_path / "run"
    second: dict[str, subprocess.CompletedProcess] = {}

    def start_the_second(ev):
        if ev.kind == "epoch_end" and ev.epoch == 1:
            second["res"] = subprocess.run([sys.executable, "-m", "ciard_deploy", "train", str(tiny_recipe), "--out",
                                            str(out), "--resume"], capture_output=True, text=True, env=ENV,
                                           timeout=120)

    summary = run(tiny_recipe, out, callbacks=[start_the_second], handle_signals=False)
    res = second["res"]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr + res.stdout, res.stderr
    assert lines[0] == (f"error: {out} is in use by another ciard process (pid {os.getpid()}); wait for it or use "
                        "another --out")
    assert summary["status"] == "complete" and metric_epochs(out) == [1, 2]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # the lock is gone with its holder


# --------------------------------------------------------------------------- a full disk, then --resume
def test_resume_after_a_failed_state_save_lists_every_epoch_once(tiny_recipe, tmp_path, monkeypatch):
    """The disk fills up as the first epoch's state is saved (its metrics line is written already) and the line
    of the next epoch is torn: --resume starts over (no state), keeps no stale line, and its metrics.jsonl
    equals an uninterrupted run's."""
    from ciard_deploy.distill import trainer

    whole = tmp_path / "whole"
    trainer.run(tiny_recipe, whole, handle_signals=False)

    real = trainer._Trainer._save_state

    def full_disk(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "run"
    monkeypatch.setattr(trainer._Trainer, "_save_state", full_disk)
    with pytest.raises(OSError):
        trainer.run(tiny_recipe, out, handle_signals=False)
    monkeypatch.setattr(trainer._Trainer, "_save_state", real)
    assert metric_epochs(out) == [1] and not (out / "train_state.pt").exists()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "lr": 0.1, "lo')  # a torn write
    summary = trainer.run(tiny_recipe, out, resume=True, handle_signals=False)
    assert summary["status"] == "complete" and metric_epochs(out) == [1, 2]

    def numbers(run_dir):
        return [{k: v for k, v in json.loads(ln).items() if k not in ("time_s", "images_per_s")}
                for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert numbers(out) == numbers(whole)


# --------------------------------------------------------------------------- SIGTERM of pack
def test_sigterm_during_pack_keeps_the_finished_attack_and_the_same_command_completes(digits_robust_run, tmp_path,
                                                                                      invoke):
    from ciard_deploy.verify import build_pack, load_pack

    out, log = tmp_path / "p.npz", tmp_path / "pack.log"
    partial = tmp_path / "p.npz.partial"
    args = ["pack", digits_robust_run, "--n", 64, "--attacks", "fgsm,pgd200", "--eps", EPS, "--step-size", STEP,
            "--device", "cpu", "--threads", 1, "--out", out]
    proc = ciard(*args, log=log)
    wait_for(proc, lambda: "pack pgd200@0.15: 0/" in log.read_text(), log)  # fgsm saved, pgd200 under way
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 130, log.read_text()
    text = log.read_text()
    assert (f"interrupted (SIGTERM): 1 finished attack (fgsm@0.15) kept in {partial}; run the same command again to "
            "continue") in one_line(text) and "Traceback" not in text, text
    assert not out.exists() and not (partial / ".ciard.lock").exists()

    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert "pack: reusing fgsm@0.15" in res.stderr and not partial.exists()
    whole = build_pack(digits_robust_run, n=64, attacks=["fgsm", "pgd200"], eps=EPS, step_size=STEP, device="cpu")
    got = load_pack(out).arrays()
    for key, arr in whole.arrays().items():
        assert key == "meta" or (arr.dtype == got[key].dtype and arr.tobytes() == got[key].tobytes()), key


# --------------------------------------------------------------------------- SIGKILL of export
def test_sigkill_during_export_leaves_a_staging_folder_that_the_same_command_removes(digits_robust_run,
                                                                                   digits_robust_exports, tmp_path,
                                                                                   invoke):
    from ciard_deploy.io import sha256_file

    out, log = tmp_path / "export", tmp_path / "export.log"
    args = ["export", digits_robust_run, "--out", out, "--n", 64, "--threads", 1]
    proc = ciard(*args, log=log)
    staging = lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".export.export-")]  # noqa: E731
    wait_for(proc, lambda: bool(staging()), log)
    proc.send_signal(signal.SIGKILL)  # no finally runs: the staging folder stays
    proc.wait(60)
    assert staging() and not (out / "manifest.json").exists()

    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert staging() == [] and sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    assert sha256_file(out / "model.onnx") == sha256_file(digits_robust_exports / "model.onnx")


# --------------------------------------------------------------------------- SIGTERM of verify --state
def test_sigterm_of_verify_saves_its_state_and_the_same_command_gives_the_same_numbers(digits_robust_run,
                                                                                     digits_robust_exports, tmp_path,
                                                                                     invoke):
    from ciard_deploy.verify import build_pack, run, save_pack

    pack = save_pack(build_pack(digits_robust_run, n=100, attacks=["fgsm"], eps=EPS, device="cpu"), tmp_path / "p.npz")
    onnx, state, log = digits_robust_exports / "model.onnx", tmp_path / "v.state.json", tmp_path / "verify.log"
    live = ["--live", "square300", "--live-n", 100, "--batch-size", 10, "--seed", 1]
    args = ["verify", onnx, "--pack", pack, *live, "--threads", 1, "--state", state, "--json", tmp_path / "r.json"]
    proc = ciard(*args, log=log)
    wait_for(proc, lambda: re.search(r"verify square300@0\.15: [1-9]\d*/", log.read_text()) is not None, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 130, log.read_text()
    text = log.read_text()
    assert (f"interrupted (SIGTERM): finished work is in {state}; run the same command again to continue"
            in one_line(text)) and "Traceback" not in text, text
    done = json.loads(state.read_text())["attacks"][0]["done"]
    assert done > 0 and not (tmp_path / "r.json").exists()

    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert f"state: resuming square300@0.15 at {done}/" in res.stderr, res.stderr
    whole = run(onnx, pack, live=["square300"], live_n=100, batch_size=10, seed=1, threads=1).to_dict()
    resumed = json.loads((tmp_path / "r.json").read_text())
    for rep in (whole, resumed):
        for a in rep["results"]["attacks"]:
            a.pop("seconds"), a.pop("origin")
    for part in ("results", "metrics", "per_sample"):
        assert resumed[part] == whole[part], part
    assert not any(p.name.endswith(".lock") for p in tmp_path.iterdir())
