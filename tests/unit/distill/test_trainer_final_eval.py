"""The trainer's final evaluation: progress events per phase, one evaluation when best and last are the
same weights, and a stop there (a callback, a real SIGINT through the CLI) that ends it at once with the
checkpoints kept and ``--resume`` running it again; a teacher reused from the cache says so."""

from __future__ import annotations

import json
import os
import signal

import pytest
import yaml

from ciard_deploy.config import recipe_from_dict
from ciard_deploy.distill import summary
from ciard_deploy.distill.events import TrainingInterrupted
from ciard_deploy.distill.trainer import run

pytestmark = pytest.mark.unit

#: one epoch on 100 digits: the best checkpoint is the last one
ONE_EPOCH = {"kind": "train", "model": {"arch": "tiny_cnn"}, "method": {"name": "natural"},
             "data": {"dataset": "digits", "train_subset": 120, "batch_size": 50, "holdout": 20},
             "attack": {"eps": 0.1},
             "train": {"epochs": 1, "device": "cpu", "eval_attack": None, "select_by": "clean", "eval_n": 20,
                       "final_eval_n": 40, "final_attacks": ["fgsm"]}}


@pytest.fixture()
def counted(monkeypatch):
    """Calls of ``accuracy_metrics`` made by the final evaluation (those with a progress callback)."""
    calls: list[int] = []
    real = summary.accuracy_metrics

    def accuracy_metrics(*args, progress=None, **kwargs):
        if progress is not None:
            calls.append(1)
        return real(*args, progress=progress, **kwargs)

    monkeypatch.setattr(summary, "accuracy_metrics", accuracy_metrics)
    return calls


def test_final_eval_runs_once_when_best_is_last_stops_at_once_and_resumes(tmp_path, counted):
    out = tmp_path / "run"
    seen: list[tuple[str, int, int]] = []

    def stop_in_final_eval(ev):
        if ev.kind == "final_eval":
            seen.append((ev.message, ev.step, ev.steps))
            ev.control.request_stop("test")

    with pytest.raises(TrainingInterrupted) as ei:
        run(recipe_from_dict(ONE_EPOCH), out, callbacks=[stop_in_final_eval], handle_signals=False)
    assert len(seen) == 1 and seen[0][0].startswith("best = last ")  # stopped at the first batch, not the end
    assert "final evaluation" in str(ei.value) and "--resume" in str(ei.value) and ei.value.exit_code == 130
    assert (out / "student_best.safetensors").exists() and (out / "student_last.safetensors").exists()
    assert not (out / "summary.json").exists()

    counted.clear()
    events: list = []
    s = run(recipe_from_dict(ONE_EPOCH), out, resume=True, handle_signals=False, callbacks=[events.append])
    assert s["status"] == "complete" and s["selection"]["best_epoch"] == 1
    assert len(counted) == 1  # best and last are the same file: evaluated once, the numbers reused
    assert s["best"] == s["last"] and set(s["last"]) == {"clean", "fgsm@0.1"}
    assert not [e for e in events if e.kind in ("step", "epoch_end")]  # nothing trained again
    phases = [(e.message, e.step, e.steps) for e in events if e.kind == "final_eval"]
    assert {m for m, _, _ in phases} == {"best = last clean", "best = last fgsm@0.1"}
    assert phases[-1][1] == phases[-1][2]  # the last phase reported its end
    meta = json.loads((out / "student_last.json").read_text())
    assert meta["metrics"]["test/fgsm@0.1"] == s["last"]["fgsm@0.1"]


def test_sigint_during_final_eval_exits_130_with_the_resume_command(tmp_path, monkeypatch, invoke):
    """The first SIGINT during the final evaluation stops it at once (not "finishing the current step"):
    exit 130, the resume command, the checkpoints kept; the printed command then finishes the run."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(ONE_EPOCH))
    out = tmp_path / "run"
    real = summary.accuracy_metrics
    batches: list[str] = []

    def accuracy_metrics(*args, progress=None, **kwargs):
        if progress is None:
            return real(*args, **kwargs)

        def with_sigint(done, total, stage=None):
            batches.append(stage)
            progress(done, total, stage)
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, through the trainer's handler

        return real(*args, progress=with_sigint, **kwargs)

    monkeypatch.setattr(summary, "accuracy_metrics", accuracy_metrics)
    res = invoke("train", recipe, "--out", out)
    assert res.exit_code == 130, res.output
    assert len(batches) == 1  # stopped at the first batch
    assert "Traceback" not in res.output and "finishing the current step" not in res.output
    assert "final eval best = last clean: 40/40" in res.stderr  # the progress line of the phase
    assert "before the final evaluation finished" in res.stderr
    assert f"resume with: ciard train {recipe} --out {out} --resume" in " ".join(res.stderr.split())
    assert {"student_best.safetensors", "student_last.safetensors", "train_state.pt"} <= set(os.listdir(out))
    monkeypatch.setattr(summary, "accuracy_metrics", real)
    res = invoke("train", recipe, "--out", out, "--resume")
    assert res.exit_code == 0, res.output
    assert "training finished earlier, running the final evaluation" in res.stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"


def test_a_teacher_reused_from_the_cache_says_which_and_from_where(tmp_path, monkeypatch):
    from ciard_deploy.cli.common import err_console
    from ciard_deploy.cli.distill import TrainProgress
    from ciard_deploy.distill.teachers import cached_run_dir
    from ciard_deploy.distill.trainer import train_teacher

    monkeypatch.setenv("CIARD_CACHE", str(tmp_path / "cache"))
    teacher = recipe_from_dict({**ONE_EPOCH, "model": {"arch": "small_cnn"}})
    cached = cached_run_dir(teacher)
    cached.mkdir(parents=True)  # a finished run, as is_trained sees one
    (cached / "summary.json").write_text(json.dumps({"status": "complete"}))
    (cached / "student_best.safetensors").write_bytes(b"")
    events: list = []
    shown = TrainProgress(quiet=False)
    with err_console.capture() as cap:
        run_dir, trained_now = train_teacher(teacher, "clean", "cpu", callbacks=[events.append, shown])
    assert (run_dir, trained_now) == (cached, False)
    assert [e.kind for e in events] == ["teacher_reused"]
    lines = [ln for ln in cap.get().splitlines() if ln.startswith("reusing")]  # (not the INFO log record)
    assert lines == [f"reusing the clean teacher: natural small_cnn (1 epochs) from the cache {cached}"]


def test_a_second_sigint_mid_epoch_stops_at_once_naming_what_is_kept(tmp_path):
    out = tmp_path / "run"

    def two_sigints(ev):
        if ev.kind == "step" and ev.step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # finish the step, then save...
            os.kill(os.getpid(), signal.SIGINT)  # ...no: stop now

    with pytest.raises(TrainingInterrupted) as ei:
        run(recipe_from_dict(ONE_EPOCH), out, callbacks=[two_sigints])
    assert "interrupted (SIGINT) before any state was saved" in str(ei.value) and ei.value.exit_code == 130
    assert run(recipe_from_dict(ONE_EPOCH), out, resume=True)["status"] == "complete"  # started over
