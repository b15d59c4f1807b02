"""`ciard verify` on an ONNX file where PyTorch cannot be imported (an edge device with numpy + onnxruntime + ART).

The subprocess runs with torch hidden by a meta path finder (``run_torch_hidden`` in tests/conftest.py,
which says why the finder returns None rather than raising); the hook records every attempt to import torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

#: After the conftest prelude (torch hidden and checked so, ATTEMPTS emptied): import the CLI, run it.
RUN_CLI = '''
    import ciard_deploy.cli  # the whole CLI, every verb module
    import_attempts = list(ATTEMPTS)

    code = 0
    sys.argv = ["ciard", *json.loads(sys.argv[1])]
    try:
        ciard_deploy.cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("RESULT " + json.dumps({"code": code, "import_attempts": import_attempts, "loaded": loaded}))
'''


@pytest.fixture
def run_torch_free(run_torch_hidden, tmp_path):
    """``run_torch_free(*args)``: ``ciard ARGS`` with torch hidden, in this test's tmp_path."""
    return lambda *args: run_torch_hidden(RUN_CLI, tmp_path, args)


def test_verify_onnx_without_torch(untrained_digits_onnx, run_torch_free, tmp_path):
    art = untrained_digits_onnx  # an untrained small_cnn: what it predicts does not matter here
    res, err = run_torch_free("verify", art["onnx"], "--pack", art["pack"], "--square-queries", 50, "--square-n", 20,
                              "--min-clean", 0.0, "--json", tmp_path / "r.json", "--junit", tmp_path / "r.xml",
                              "--markdown", tmp_path / "r.md", "--quiet")
    assert res["code"] == 0, err[-2000:]
    assert res["import_attempts"] == [], "importing the CLI tried to import torch"
    assert res["loaded"] == []
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["status"] == "passed" and rep["artifact"]["backend"] == "onnxruntime"
    assert set(rep["results"]["robust_acc"]) == {"fgsm@0.1", "square50@0.1"}
    assert rep["artifact"]["pack_matches_source"] is True
    assert "torch" not in rep["versions"] and "onnxruntime" in rep["versions"]  # this (torch-free) environment
    assert (tmp_path / "r.xml").is_file() and (tmp_path / "r.md").is_file()


def test_torch_only_verbs_exit_3_without_torch(untrained_digits_onnx, run_torch_free, tmp_path):
    art = untrained_digits_onnx
    res, err = run_torch_free("pack", art["checkpoint"], "--out", tmp_path / "p.npz", "--n", 10,
                              "--attacks", "fgsm", "--eps", 0.1)
    assert res["code"] == 3, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "PyTorch" in lines[0]
    assert not (tmp_path / "p.npz").exists()
    res, err = run_torch_free("verify", art["checkpoint"], "--pack", art["pack"], "--square-queries", 0)
    assert res["code"] == 3, err
    assert "PyTorch" in err and "Traceback" not in err


@pytest.mark.parametrize("verb", ["distill", "eval", "quickstart"])
def test_training_verbs_say_what_to_install_without_torch(verb, untrained_digits_onnx, run_torch_free, tmp_path):
    """A device install (`pip install ciard-deploy`, no torch): exit 3, one line naming the verb and
    the `train` extra, no traceback, nothing written; the same guard (cli/common.py) for every verb."""
    out = tmp_path / "out"
    args = {"distill": ["distill", "quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15", "--out", out],
            "eval": ["eval", untrained_digits_onnx["checkpoint"], "--attacks", "fgsm", "--n", 10, "--eps", 0.1],
            "quickstart": ["quickstart", "--out", out]}[verb]
    res, err = run_torch_free(*args)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert res["code"] == 3 and len(lines) == 1, err
    assert lines[0].startswith(f"error: ciard {verb} needs PyTorch, which is not installed here: "
                               "pip install 'ciard-deploy[train]' (CPU-only torch first: pip install torch")
    assert not out.exists()


def test_help_and_doctor_without_torch(run_torch_free, tmp_path):
    for args in (["--help"], ["verify", "--help"]):
        res, err = run_torch_free(*args)
        assert res["code"] == 0 and "Traceback" not in err, err
    res, err = run_torch_free("doctor", "--json", tmp_path / "doctor.json")
    assert res["code"] == 0, err
    assert "unavailable" in json.loads((tmp_path / "doctor.json").read_text())["torch"]


def test_no_module_level_torch_imports():
    """What the repository hook greps for, checked here too: verify/, runtime/ and the verify verb."""
    files = [*(REPO / "ciard_deploy" / "verify").glob("*.py"), *(REPO / "ciard_deploy" / "runtime").glob("*.py"),
             REPO / "ciard_deploy" / "cli" / "verify.py"]
    pattern = re.compile(r"^(import torch|from torch)", re.M)
    offenders = [str(f.relative_to(REPO)) for f in files if pattern.search(f.read_text())]
    assert offenders == []
