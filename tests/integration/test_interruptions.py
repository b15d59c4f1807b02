"""Concurrency, faults and interruptions, with real processes where signals matter (issue 12).

- Two trainings into one run folder: the second process is refused (exit 2, one line naming the
  holder's pid) and the first completes with files that are its own alone.
- A state save that fails (a full disk) after an epoch's metrics line was written, and a torn line:
  ``--resume`` lists every epoch once, with the numbers of an uninterrupted run.
- SIGKILL of ``ciard train`` mid-epoch, then of its ``--resume`` as the state is half written:
  ``--resume`` ends bit-identical to an uninterrupted run (metrics, checkpoints, final numbers).
- SIGTERM (a CI cancel), SIGINT and SIGKILL of ``ciard pack``: exit 130 and one line saying what was
  kept (SIGKILL: a torn temp file, never read); the same command completes to the arrays of an
  uninterrupted build.
- SIGKILL and SIGINT of ``ciard export``: the same command writes the same model file as an
  uninterrupted export (a SIGKILL's staging folder stays behind until then).
- SIGTERM and SIGKILL of ``ciard verify --state``: the same command resumes from the saved state and
  gives the numbers of an uninterrupted verify.
- SIGINT, then SIGKILL, of ``ciard run`` in its pack stage: the same command skips distill and
  export, reuses the kept attacks and gives the pack and verify numbers of an uninterrupted run.

Each process is the real CLI, stopped at a chosen moment by ``_paused_ciard.py`` (it prints
``PAUSED`` there and waits for the test's signal), so no test races the work it interrupts. Each
uses the session's digits fixtures (tests/conftest.py) and tiny settings, and shares one
uninterrupted baseline per command.
"""

from __future__ import annotations

import copy
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


PAUSED_CIARD = Path(__file__).with_name("_paused_ciard.py")


def paused_ciard(*args: object, log: Path, **pause: str) -> subprocess.Popen:
    """``ciard ARGS`` in its own process that stops where ``pause`` says (``_paused_ciard.py``: PAUSE_AFTER_LINE,
    PAUSE_AT_REPLACE or PAUSE_AT_TRAIN_STEP) and prints ``PAUSED`` there; one torch thread, as the in-process calls
    it is compared with."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, str(PAUSED_CIARD), *map(str, args)], stdout=f,
                                stderr=subprocess.STDOUT, env={**ENV, "OMP_NUM_THREADS": "1", **pause}, text=True)


def signal_when_paused(proc: subprocess.Popen, log: Path, sig: int) -> int:
    """Waits for the process to pause, sends ``sig`` and returns its exit code (-9 for SIGKILL)."""
    wait_for(proc, lambda: "PAUSED" in log.read_text(), log)
    proc.send_signal(sig)
    return proc.wait(60)


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
    from ciard_deploy.distill import loop, trainer

    whole = tmp_path / "whole"
    trainer.run(tiny_recipe, whole, handle_signals=False)

    real = loop.TrainingLoop._save_state

    def full_disk(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "run"
    monkeypatch.setattr(loop.TrainingLoop, "_save_state", full_disk)
    with pytest.raises(OSError):
        trainer.run(tiny_recipe, out, handle_signals=False)
    monkeypatch.setattr(loop.TrainingLoop, "_save_state", real)
    assert metric_epochs(out) == [1] and not (out / "train_state.pt").exists()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "lr": 0.1, "lo')  # a torn write
    summary = trainer.run(tiny_recipe, out, resume=True, handle_signals=False)
    assert summary["status"] == "complete" and metric_epochs(out) == [1, 2]

    def numbers(run_dir):
        return [{k: v for k, v in json.loads(ln).items() if k not in ("time_s", "images_per_s")}
                for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert numbers(out) == numbers(whole)


# --------------------------------------------------------------------------- SIGKILL of training, twice
def test_training_killed_mid_epoch_then_in_a_state_save_resumes_to_an_uninterrupted_run(tiny_recipe, tmp_path,
                                                                                        invoke):
    """`ciard train` killed (SIGKILL) mid-epoch 2 (2 epochs of 3 steps): the saved state holds epoch 1 and
    metrics.jsonl its line. `--resume` (README: the same command with --resume) killed again as it saves epoch 2's
    state, its temp file half written: epoch 2's line and checkpoints are written by then, the state still holds
    epoch 1. `--resume` once more drops epoch 2's line, trains it again and ends bit-identical to an uninterrupted
    run: the same metrics.jsonl numbers, checkpoints and final metrics; the torn temp file is never read."""
    import torch

    from ciard_deploy.distill import trainer
    from ciard_deploy.fingerprint import sha256_file

    whole, out = tmp_path / "whole", tmp_path / "run"
    trainer.run(tiny_recipe, whole, handle_signals=False)
    args = ["train", tiny_recipe, "--out", out]

    def saved_epoch() -> tuple[int, int]:
        state = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True)
        return state["epoch"], state["step"]

    log = tmp_path / "train-1.log"
    assert signal_when_paused(paused_ciard(*args, log=log, PAUSE_AT_TRAIN_STEP="5"), log, signal.SIGKILL) == -9
    assert metric_epochs(out) == [1] and saved_epoch() == (1, 0), log.read_text()

    log = tmp_path / "train-2.log"
    proc = paused_ciard(*args, "--resume", log=log, PAUSE_AT_REPLACE="train_state.pt:1")
    assert signal_when_paused(proc, log, signal.SIGKILL) == -9
    assert "resuming at epoch 2 step 0" in log.read_text() and "Traceback" not in log.read_text(), log.read_text()
    assert metric_epochs(out) == [1, 2] and saved_epoch() == (1, 0)
    assert [p.name for p in out.iterdir() if p.name.startswith(".train_state.pt.")], "no torn write"

    res = invoke(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert "resuming at epoch 2 step 0" in res.stderr, res.stderr

    def numbers(run_dir: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(ln).items() if k not in ("time_s", "images_per_s")}
                for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert metric_epochs(out) == [1, 2] and numbers(out) == numbers(whole)
    for name in ("student_best.safetensors", "student_last.safetensors"):
        assert sha256_file(out / name) == sha256_file(whole / name), name
    got, want = (json.loads((d / "summary.json").read_text()) for d in (out, whole))
    assert got["status"] == "complete" and [got["best"], got["last"]] == [want["best"], want["last"]]


# --------------------------------------------------------------------------- SIGTERM, SIGINT and SIGKILL of pack
PACK_ATTACKS = ["fgsm", "pgd20"]


@pytest.fixture(scope="module")
def whole_pack(digits_robust_run) -> dict:
    """The arrays of the uninterrupted build the interrupted ones are compared with."""
    from ciard_deploy.verify import build_pack

    return build_pack(digits_robust_run, n=64, attacks=PACK_ATTACKS, eps=EPS, step_size=STEP, device="cpu").arrays()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_an_interrupted_pack_keeps_the_finished_attack_and_the_same_command_completes(sig, digits_robust_run,
                                                                                      whole_pack, tmp_path, invoke):
    """SIGTERM (a CI cancel) or SIGINT as pgd20 starts: exit 130, one line saying what was kept. SIGKILL as pgd20's
    arrays are half written: the torn temp file stays in the partial folder, untrusted. Either way the same command
    reuses fgsm, runs pgd20, removes the folder and writes the arrays of an uninterrupted build."""
    from ciard_deploy.verify import load_pack
    from ciard_deploy.verify.pack_partial import _attack_file

    out, log = tmp_path / "p.npz", tmp_path / "pack.log"
    partial = tmp_path / "p.npz.partial"
    args = ["pack", digits_robust_run, "--n", 64, "--attacks", ",".join(PACK_ATTACKS), "--eps", EPS,
            "--step-size", STEP, "--device", "cpu", "--threads", 1, "--out", out]
    if sig == signal.SIGKILL:
        proc = paused_ciard(*args, log=log, PAUSE_AT_REPLACE=f"{_attack_file('pgd20@0.15')}:1")
    else:
        proc = paused_ciard(*args, log=log, PAUSE_AFTER_LINE=r"pack pgd20@0\.15: 0/")  # fgsm saved, pgd20 under way
    code = signal_when_paused(proc, log, sig)
    text = log.read_text()
    assert "Traceback" not in text, text
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL, text
        assert [p.name for p in partial.iterdir() if p.name.endswith(".tmp")], "no torn write"
    else:
        how = "interrupted (SIGTERM)" if sig == signal.SIGTERM else "interrupted"
        assert code == 130, text
        assert (f"{how}: 1 finished attack (fgsm@0.15) kept in {partial}; run the same command again to "
                "continue") in one_line(text), text
        assert not (partial / ".ciard.lock").exists()
    assert [a["label"] for a in json.loads((partial / "state.json").read_text())["attacks"]] == ["fgsm@0.15"]
    assert not out.exists()

    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert "pack: reusing fgsm@0.15" in res.stderr and "pack: reusing pgd20" not in res.stderr
    assert not partial.exists()  # the torn temp file went with it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.npz", "pack.log"]
    got = load_pack(out).arrays()
    for key, arr in whole_pack.items():
        assert key == "meta" or (arr.dtype == got[key].dtype and arr.tobytes() == got[key].tobytes()), key


# --------------------------------------------------------------------------- SIGKILL and SIGINT of export
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=lambda s: s.name)
def test_an_interrupted_export_then_the_same_command_writes_the_same_model(sig, digits_robust_run,
                                                                          digits_robust_exports, tmp_path, invoke):
    """Stopped in its staging folder as the PyTorch reference is measured, before the model is written. SIGINT:
    exit 130, the staging folder is removed at once. SIGKILL: no ``finally`` runs, the staging folder stays until
    the same command, which removes it. Then the same command writes the model file of an uninterrupted export
    (same sha256)."""
    from ciard_deploy.fingerprint import sha256_file

    out, log = tmp_path / "export", tmp_path / "export.log"
    args = ["export", digits_robust_run, "--out", out, "--n", 64, "--threads", 1]
    proc = paused_ciard(*args, log=log, PAUSE_AFTER_LINE=r"export reference: ")
    staging = lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".export.export-")]  # noqa: E731
    code = signal_when_paused(proc, log, sig)
    text = log.read_text()
    assert "Traceback" not in text, text
    assert not out.exists() or [p.name for p in out.iterdir()] == [".ciard.lock"]  # the lock's file alone
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL and staging(), text
    else:
        assert code == 130 and "interrupted" in text.splitlines()[-1] and staging() == [], text

    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert staging() == [] and sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    assert sha256_file(out / "model.onnx") == sha256_file(digits_robust_exports / "model.onnx")


# --------------------------------------------------------------------------- SIGTERM and SIGKILL of verify --state
@pytest.fixture(scope="module")
def verify_case(digits_robust_run, digits_robust_exports, tmp_path_factory) -> dict:
    """A pack, the verify arguments (a live Square on 100 images, batches of 10) and the uninterrupted report."""
    from ciard_deploy.verify import build_pack, run, save_pack

    pack = save_pack(build_pack(digits_robust_run, n=100, attacks=["fgsm"], eps=EPS, device="cpu"),
                     tmp_path_factory.mktemp("verify") / "p.npz")
    onnx = digits_robust_exports / "model.onnx"
    whole = run(onnx, pack, live=["square300"], live_n=100, batch_size=10, seed=1, threads=1).to_dict()
    return {"onnx": onnx, "pack": pack, "whole": whole,
            "args": ["verify", onnx, "--pack", pack, "--live", "square300", "--live-n", 100, "--batch-size", 10,
                     "--seed", 1, "--threads", 1]}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_an_interrupted_verify_keeps_its_state_and_the_same_command_gives_the_same_numbers(sig, verify_case,
                                                                                         tmp_path, invoke):
    """SIGTERM (a CI cancel) once Square has finished batches: exit 130, the state saved. SIGKILL as the state is
    saved for the third time (saves after each batch here: SAVE_EVERY_S), its temp file half written: the second
    save (Square's first batch) stays and the torn file is not read. The same command resumes from the saved
    batches and its report has the numbers of an uninterrupted verify."""
    state, log = tmp_path / "v.state.json", tmp_path / "verify.log"
    args = [*verify_case["args"], "--state", state, "--json", tmp_path / "r.json"]
    if sig == signal.SIGKILL:
        proc = paused_ciard(*args, log=log, PAUSE_AT_REPLACE="v.state.json:3", SAVE_EVERY_S="0")
    else:
        proc = paused_ciard(*args, log=log, PAUSE_AFTER_LINE=r"verify square300@0\.15: [1-9]\d*/")
    code = signal_when_paused(proc, log, sig)
    text = log.read_text()
    assert "Traceback" not in text, text
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL, text
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".v.state.json.")], "no torn write"
    else:
        assert code == 130, text
        assert (f"interrupted (SIGTERM): finished work is in {state}; run the same command again to continue"
                in one_line(text)), text
    done = json.loads(state.read_text())["attacks"][0]["done"]
    assert done > 0 and not (tmp_path / "r.json").exists()

    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert f"state: resuming square300@0.15 at {done}/" in res.stderr, res.stderr
    whole, resumed = copy.deepcopy(verify_case["whole"]), json.loads((tmp_path / "r.json").read_text())
    for rep in (whole, resumed):
        for a in rep["results"]["attacks"]:
            a.pop("seconds"), a.pop("origin")
    for part in ("results", "metrics", "per_sample"):
        assert resumed[part] == whole[part], part
    assert not any(p.name.endswith(".lock") for p in tmp_path.iterdir())


# --------------------------------------------------------------------------- SIGINT, then SIGKILL, of `ciard run`
RUN_RECIPE = "quick/digits_pgd_at_none_to_tiny_cnn_linf0.15"  # kind train: no teachers to train
RUN_SETS = ["deploy.formats=[onnx]", "train.epochs=1", "train.eval_every=1", "train.final_attacks=[]",
            "deploy.pack.attacks=[fgsm,pgd20,pgd10]", "deploy.pack.artifact_attacks=[]", "deploy.pack.n=64",
            "deploy.parity_n=64", "deploy.square_queries=50", "deploy.square_n=20", "deploy.gates={min_clean: 0.5}"]


def test_ciard_run_interrupted_in_its_pack_stage_twice_then_finished_gives_the_uninterrupted_numbers(tmp_path,
                                                                                                    invoke):
    """An uninterrupted `ciard run` is the reference. A copy of it without its pack and verify outputs (as if
    training and export had just finished) is run with the same command: SIGINT as pgd20 starts (exit 130, the
    stage marked interrupted, fgsm kept in DIR/pack.npz.partial/); the same command again, SIGKILL as pgd10
    starts (the stage left `running`, fgsm reused and pgd20 kept); the same command once more skips distill and
    export, reuses both attacks, and its pack arrays and verify numbers equal the uninterrupted run's."""
    import shutil

    from ciard_deploy.verify import load_pack

    whole, out = tmp_path / "whole", tmp_path / "digits"
    flags = [a for s in RUN_SETS for a in ("--set", s)]
    res = invoke("run", RUN_RECIPE, "--out", whole, "--threads", 1, *flags)
    assert res.exit_code == 0, res.output
    shutil.copytree(whole, out)
    (out / "pack.npz").unlink()
    shutil.rmtree(out / "verify")
    args = ["run", RUN_RECIPE, "--out", out, "--threads", 1, *flags]
    partial = out / "pack.npz.partial"

    def kept() -> list[str]:
        return [a["label"] for a in json.loads((partial / "state.json").read_text())["attacks"]]

    def pack_status() -> str:
        return json.loads((out / "workflow.json").read_text())["stages"]["pack"]["status"]

    log = tmp_path / "run-1.log"
    proc = paused_ciard(*args, log=log, PAUSE_AFTER_LINE=r"pack pgd20@0\.15: 0/")
    assert signal_when_paused(proc, log, signal.SIGINT) == 130, log.read_text()
    text = log.read_text()
    assert f"interrupted: finished work is kept in {out}" in one_line(text) and "Traceback" not in text, text
    assert "distill: skipped" in text and "export: skipped" in text, text
    assert kept() == ["fgsm@0.15"] and pack_status() == "interrupted" and not (out / "pack.npz").exists()

    log = tmp_path / "run-2.log"
    proc = paused_ciard(*args, log=log, PAUSE_AFTER_LINE=r"pack pgd10@0\.15: 0/")
    assert signal_when_paused(proc, log, signal.SIGKILL) == -9, log.read_text()
    assert "pack fgsm@0.15" not in log.read_text() and "pack pgd20@0.15: 64/64" in log.read_text()  # fgsm reused
    assert kept() == ["fgsm@0.15", "pgd20@0.15"] and pack_status() == "running"

    summary = tmp_path / "summary.json"
    res = invoke(*args, "--json", summary)
    assert res.exit_code == 0, res.output
    actions = {k: v["action"] for k, v in json.loads(summary.read_text())["stages"].items()}
    assert actions == {"distill": "skipped", "export": "skipped", "pack": "ran", "verify": "ran"}, res.stderr
    ran = re.findall(r"run pack (\S+): 0/", res.stderr)
    assert ran == ["pgd10@0.15"], res.stderr  # fgsm and pgd20 (and the clean pass) taken from the partial folder
    assert not partial.exists()
    want, got = load_pack(whole / "pack.npz").arrays(), load_pack(out / "pack.npz").arrays()
    for key, arr in want.items():
        assert key == "meta" or (arr.dtype == got[key].dtype and arr.tobytes() == got[key].tobytes()), key

    def measured(report: Path) -> dict:
        rep = json.loads(report.read_text())
        for a in rep["results"]["attacks"]:
            a.pop("seconds"), a.pop("origin", None)
        return {k: rep[k] for k in ("results", "metrics", "parity", "per_sample")}

    assert measured(out / "verify" / "onnx.json") == measured(whole / "verify" / "onnx.json")
