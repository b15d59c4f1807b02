"""Resume and interruption on digits: an interrupted CIARD run, resumed, ends bit-identical to an
uninterrupted one (student, retrained robust teacher, optimizer, temperatures, metrics); teachers
given by recipe are trained once and then reused from the cache."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from ciard_deploy.config import recipe_from_dict
from ciard_deploy.data import get_dataset_info
from ciard_deploy.distill.events import TrainingInterrupted
from ciard_deploy.distill.trainer import run
from ciard_deploy.checkpoints import CheckpointMeta, read_meta, save_checkpoint
from ciard_deploy.model_loader import load_model
from ciard_deploy.models import create_model

pytestmark = pytest.mark.integration


INFO = get_dataset_info("digits")


@pytest.fixture(scope="module")
def tiny_teachers(tmp_path_factory) -> dict[str, Path]:
    """Two untrained tiny_cnn teachers saved as ciard checkpoints (the mechanics need no accuracy)."""
    d = tmp_path_factory.mktemp("teachers")
    out = {}
    for i, role in enumerate(("clean", "robust")):
        torch.manual_seed(100 + i)
        m = create_model("tiny_cnn", 10, 1, INFO.mean, INFO.std)
        out[role] = save_checkpoint(d / role, m, CheckpointMeta("tiny_cnn", 10, INFO.input_shape, INFO.mean,
                                                                   INFO.std, "digits"))
    return out


def ciard_recipe(teachers: dict[str, Path], **extra):
    data = {
        "kind": "distill", "student": {"arch": "tiny_cnn"},
        "teachers": {r: {"checkpoint": str(p)} for r, p in teachers.items()},
        # the robust teacher is retrained from the first epoch so its resume is exercised too
        "method": {"name": "ciard", "teacher_start_fraction": 0.0, "adaptive_weights": True},
        "data": {"dataset": "digits", "train_subset": 240, "holdout": 40, "batch_size": 48},
        "attack": {"eps": 0.2, "steps": 2, "step_size": 0.1},
        "optim": {"lr": 0.05, "schedule": "cosine"},
        "train": {"epochs": 3, "seed": 7, "device": "cpu", "eval_every": 2, "eval_n": 40, "final_eval_n": 40,
                  "eval_step_size": 0.05},
    }
    return recipe_from_dict(data, [f"{k}={v}" for k, v in extra.items()])


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "train_state.pt", weights_only=True)


def metrics_lines(run_dir: Path) -> list[dict]:
    drop = {"time_s", "images_per_s"}
    return [{k: v for k, v in json.loads(ln).items() if k not in drop}
            for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_equal_tree(a, b, path="method") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_equal_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = final_state(a), final_state(b)
    for part in ("student",):
        for k in sa[part]:
            assert torch.equal(sa[part][k], sb[part][k]), f"{part}.{k} differs"
    for k in sa["teachers"]["robust"]:
        assert torch.equal(sa["teachers"]["robust"][k], sb["teachers"]["robust"][k]), f"robust teacher {k} differs"
    assert_equal_tree(sa["method"], sb["method"])  # temperatures, weights, step sizes, teacher optimizer
    for ga, gb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(ga["momentum_buffer"], gb["momentum_buffer"])
    assert metrics_lines(a) == metrics_lines(b)
    sum_a, sum_b = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sum_a["best"] == sum_b["best"] and sum_a["last"] == sum_b["last"]


@pytest.fixture(scope="module")
def reference_run(tiny_teachers, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    s = run(ciard_recipe(tiny_teachers), out)
    assert s["status"] == "complete"
    return out


def test_run_dir_layout_and_metrics(reference_run, tiny_teachers):
    d = reference_run
    for name in ("recipe.yaml", "student_best.safetensors", "student_best.json", "student_last.safetensors",
                 "student_last.json", "teachers.json", "train_state.pt", "metrics.jsonl", "summary.json",
                 "train.log"):
        assert (d / name).exists(), name
    lines = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [1, 2, 3]
    for key in ("loss_rob", "loss_nat", "loss_push", "tau_robust", "tau_clean", "w_rob", "w_nat", "teacher_lr",
                "lr", "images_per_s"):
        assert key in lines[-1], key
    assert "eval" in lines[1] and "eval" in lines[2] and "eval" not in lines[0]  # every 2 epochs and the last
    assert set(lines[1]["eval"]) == {"clean", "pgd20@0.2", "score"}
    s = json.loads((d / "summary.json").read_text())
    assert set(s["best"]) == {"clean", "pgd20@0.2"} and "robust" not in json.dumps(s["best"])
    assert s["selection"]["attack"] == "pgd20@0.2" and s["eps_label"] == "0.2"
    refs = json.loads((d / "teachers.json").read_text())
    assert refs["robust"]["path"] == str(tiny_teachers["robust"]) and len(refs["clean"]["sha256"]) == 64
    meta = json.loads((d / "student_best.json").read_text())
    assert meta["arch"] == "tiny_cnn" and meta["eps"] == pytest.approx(0.2) and meta["recipe_hash"] == s["recipe_hash"]
    assert "test/pgd20@0.2" in meta["metrics"] and list(meta["mean"]) == list(INFO.mean)
    assert "epoch 3/3" in (d / "train.log").read_text()


def test_stop_after_an_epoch_then_resume_is_bit_identical(reference_run, tiny_teachers, tmp_path):
    out = tmp_path / "run"
    s = run(ciard_recipe(tiny_teachers), out, stop_after_epoch=1)
    assert s["status"] == "partial" and s["epochs_done"] == 1
    assert not (out / "summary.json").exists()
    steps = []
    s = run(ciard_recipe(tiny_teachers), out, resume=True,
            callbacks=[lambda ev: steps.append((ev.epoch, ev.step)) if ev.kind == "step" else None])
    assert s["status"] == "complete"
    assert steps[0] == (2, 1)  # continued, not restarted
    assert_same_run(reference_run, out)


def test_sigint_mid_epoch_saves_and_resumes_bit_identical(reference_run, tiny_teachers, tmp_path):
    out = tmp_path / "run"
    steps_seen = []
    handler_before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job

    def send_sigint(ev):
        if ev.kind == "step":
            steps_seen.append((ev.epoch, ev.step))
            if (ev.epoch, ev.step) == (2, 2):
                os.kill(os.getpid(), signal.SIGINT)  # the real signal path: finish the step, save, stop

    with pytest.raises(TrainingInterrupted) as ei:
        run(ciard_recipe(tiny_teachers), out, callbacks=[send_sigint])
    assert (ei.value.epoch, ei.value.step) == (2, 2) and ei.value.exit_code == 130
    assert steps_seen[-1] == (2, 2)  # stopped right after the step that saw the signal
    state = final_state(out)
    assert (state["epoch"], state["step"]) == (1, 2)  # one epoch done, two steps into the next
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored
    steps = []
    s = run(ciard_recipe(tiny_teachers), out, resume=True,
            callbacks=[lambda ev: steps.append((ev.epoch, ev.step)) if ev.kind == "step" else None])
    assert s["status"] == "complete"
    assert steps[0] == (2, 3)  # continued after the saved step, not restarted
    assert_same_run(reference_run, out)
    # resuming a finished run returns its summary without training again
    again = run(ciard_recipe(tiny_teachers), out, resume=True)
    assert again == json.loads((out / "summary.json").read_text())


def test_teacher_recipes_are_trained_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CIARD_CACHE", str(tmp_path / "cache"))
    base = {"data": {"dataset": "digits", "train_subset": 150, "holdout": 30, "batch_size": 50},
            "train": {"epochs": 1, "device": "cpu", "eval_n": 30, "final_eval_n": 30, "eval_attack": None,
                      "select_by": "clean"}, "model": {"arch": "tiny_cnn"}, "kind": "train"}
    import yaml

    (tmp_path / "clean.yaml").write_text(yaml.safe_dump({**base, "method": {"name": "natural"}}))
    (tmp_path / "robust.yaml").write_text(yaml.safe_dump(
        {**base, "method": {"name": "pgd_at"}, "attack": {"eps": 0.2, "steps": 1, "step_size": 0.2}}))
    student = {**{k: v for k, v in base.items() if k != "model"}, "kind": "distill", "student": {"arch": "tiny_cnn"},
               "teachers": {"clean": {"recipe": str(tmp_path / "clean.yaml")},
                            "robust": {"recipe": str(tmp_path / "robust.yaml")}},
               "method": {"name": "mtard"}, "attack": {"eps": 0.2, "steps": 1, "step_size": 0.2}}
    events = []
    s1 = run(recipe_from_dict(student), tmp_path / "s1", callbacks=[lambda ev: events.append(ev.kind)])
    assert events.count("teacher") == 2
    assert s1["teachers"]["clean"]["trained_now"] and s1["teachers"]["robust"]["trained_now"]
    cached = Path(s1["teachers"]["robust"]["run_dir"])
    assert cached.parent == tmp_path / "cache" / "teachers"
    stamp = (cached / "student_best.safetensors").stat().st_mtime_ns
    events.clear()
    s2 = run(recipe_from_dict(student), tmp_path / "s2", callbacks=[lambda ev: events.append(ev.kind)])
    assert "teacher" not in events
    assert not s2["teachers"]["clean"]["trained_now"] and not s2["teachers"]["robust"]["trained_now"]
    assert (cached / "student_best.safetensors").stat().st_mtime_ns == stamp
    assert s2["teachers"]["robust"]["sha256"] == s1["teachers"]["robust"]["sha256"]
    # same seed, same cached teachers: the two students are the same
    assert s1["last"] == s2["last"]


def test_resume_refuses_a_teacher_checkpoint_replaced_at_the_same_path(tiny_teachers, tmp_path):
    """Checkpoint teachers enter the recipe hash by path; their sha256 in teachers.json is what a
    resume compares: another file at the same path is refused (exit 2) and the run dir is left alone."""
    from ciard_deploy.errors import ArtifactError

    teachers = {}
    for role, src in tiny_teachers.items():  # own copies: this test replaces one
        teachers[role] = save_checkpoint(tmp_path / "teachers" / role, load_model(src)[0], read_meta(src))
    out = tmp_path / "run"
    assert run(ciard_recipe(teachers), out, stop_after_epoch=1)["status"] == "partial"
    def files():  # train.log aside: it records the refused attempt too
        return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "train.log"}

    before = files()
    torch.manual_seed(999)
    other = create_model("tiny_cnn", 10, 1, INFO.mean, INFO.std)
    save_checkpoint(tmp_path / "teachers" / "robust", other, read_meta(teachers["robust"]))
    with pytest.raises(ArtifactError, match=r"--resume: the robust teacher .* is not the file this run started with"):
        run(ciard_recipe(teachers), out, resume=True)
    assert files() == before
