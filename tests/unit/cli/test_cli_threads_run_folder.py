"""`--threads` of eval, export, pack, verify and run (checked, applied to torch and onnxruntime, the machine's
CPUs by default) and the one-line errors of a folder that is not a `ciard run` folder.

A real run folder given to each verb is tested in tests/integration/test_workflow.py (it reuses the
module's workflow run). conftest.py pins the verbs' default to one thread for the in-process tests, so
the default is checked here through ``apply_threads`` with ``available_cpus`` patched.
"""

import json
import os

import pytest
import torch

from ciard_deploy.cli import common
from ciard_deploy.cli.common import available_cpus as real_available_cpus  # before conftest pins it
from ciard_deploy.errors import UsageError
from ciard_deploy.runtime.ort_backend import OrtBackend
from ciard_deploy.workflow import STATE_FORMAT

pytestmark = pytest.mark.unit


def one_error_line(res, code, *needles):
    assert res.exit_code == code, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.output, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_the_default_is_the_cpus_this_process_may_use(monkeypatch):
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert real_available_cpus() == expected >= 1
    monkeypatch.setattr(common, "available_cpus", lambda: 3)
    assert common.apply_threads(None) == 3 and torch.get_num_threads() == 3
    assert common.apply_threads(1, torch=False) == 1 and torch.get_num_threads() == 3  # torch left alone
    assert common.apply_threads(2) == 2 and torch.get_num_threads() == 2
    with pytest.raises(UsageError, match="--threads must be >= 1, got 0"):
        common.apply_threads(0)


@pytest.mark.parametrize("verb", ["eval", "export", "pack", "verify", "run"])
def test_threads_below_one_exit_2_before_any_work(verb, invoke, ckpt, tmp_path):
    args = {"eval": ["eval", ckpt], "export": ["export", ckpt, "--out", tmp_path / "e"],
            "pack": ["pack", ckpt, "--out", tmp_path / "p.npz"],
            "verify": ["verify", tmp_path / "m.onnx", "--pack", tmp_path / "p.npz"],
            "run": ["run", "quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15", "--out", tmp_path / "wf"]}[verb]
    one_error_line(invoke(*args, "--threads", 0), 2, "--threads must be >= 1, got 0")
    assert list(tmp_path.iterdir()) == []


def test_eval_applies_threads_to_torch(invoke, ckpt):
    res = invoke("-q", "eval", ckpt, "--attacks", "fgsm", "--n", 20, "--threads", 2)
    assert res.exit_code == 0, res.output
    assert torch.get_num_threads() == 2  # conftest sets it back to 1 before the next test


def test_verify_gives_threads_to_the_onnxruntime_session(invoke, untrained_digits_onnx, monkeypatch):
    seen = []
    opened = OrtBackend._open

    def spy(self):
        opened(self)
        seen.append(self._sess.get_session_options().intra_op_num_threads)

    monkeypatch.setattr(OrtBackend, "_open", spy)
    art = untrained_digits_onnx
    assert invoke("-q", "verify", art["onnx"], "--pack", art["pack"], "--live", "none", "--threads", 1).exit_code == 0
    monkeypatch.setattr(common, "available_cpus", lambda: 2)
    assert invoke("-q", "verify", art["onnx"], "--pack", art["pack"], "--live", "none").exit_code == 0
    assert seen == [1, 2]


@pytest.mark.parametrize("verb, needle", [
    ("plot", "neither a training run dir (metrics.jsonl) nor a `ciard run` folder (workflow.json)"),
    ("eval", "neither a run dir with a checkpoint (student_best.safetensors) nor a `ciard run` folder"),
    ("inspect", "neither an export folder (manifest.json) nor a `ciard run` folder (workflow.json)"),
    ("verify", "neither a run dir with a checkpoint (student_best.safetensors) nor a `ciard run` folder"),
    ("pack", "neither a run dir with a checkpoint"),
    ("export", "neither a run dir with a checkpoint"),
])
def test_a_folder_that_is_not_a_run_folder_is_one_line_naming_what_it_lacks(verb, needle, invoke, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a run")
    extra = {"pack": ["--out", tmp_path / "p.npz"], "export": ["--out", tmp_path / "e"],
             "verify": ["--pack", tmp_path / "p.npz"]}.get(verb, [])
    one_error_line(invoke(verb, folder, *extra), 2, str(folder), needle)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["mine", "notes.txt"]  # nothing written


def test_a_run_folder_without_the_part_and_verify_without_a_pack(invoke, tmp_path):
    root = tmp_path / "wf"
    root.mkdir()
    (root / "workflow.json").write_text(json.dumps({"format": STATE_FORMAT, "stages": {"distill": {"status": "running"}}}))
    one_error_line(invoke("eval", root), 2, "`ciard run` folder without a trained student",
                   "its distill stage is running")
    one_error_line(invoke("verify", root), 2, "without exported artifacts (export/manifest.json)")
    one_error_line(invoke("verify", tmp_path / "model.onnx"), 2, "missing --pack PACK")
