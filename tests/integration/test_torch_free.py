"""`ciard verify` on an ONNX file where PyTorch cannot be imported (an edge device with numpy + onnxruntime + ART).

The subprocess hides torch with a meta path finder: every finder on ``sys.meta_path`` is wrapped
so that ``torch`` (and torchvision, functorch, torchgen) is simply *not found*, and ``import
torch`` raises ``ModuleNotFoundError`` (an ``ImportError``), as on a device without it. A finder
that *raises* from ``find_spec`` would not do: ART probes ``importlib.util.find_spec("torch")``,
which returns None on a real torch-free device but would raise there. Setting
``sys.modules["torch"] = None`` breaks scipy. The hook records every attempt to import torch.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

HOOK = textwrap.dedent('''
    import importlib.util, json, sys

    BLOCKED = ("torch", "torchvision", "functorch", "torchgen")
    ATTEMPTS = []

    class HideTorch:
        """Wraps a finder; torch and friends are not found (find_spec -> None), as where not installed."""

        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                ATTEMPTS.append(name)
                return None
            find = getattr(self.inner, "find_spec", None)
            return find(name, path, target) if find else None

        def find_distributions(self, *args, **kwargs):  # importlib.metadata: torch is not installed either
            find = getattr(self.inner, "find_distributions", None)
            dists = find(*args, **kwargs) if find else []
            return [d for d in dists if (d.metadata["Name"] or "").lower() not in BLOCKED]

        def invalidate_caches(self):
            if hasattr(self.inner, "invalidate_caches"):
                self.inner.invalidate_caches()

    sys.meta_path[:] = [HideTorch(f) for f in sys.meta_path]
    try:
        import torch  # noqa: F401
        raise SystemExit("the hook did not hide torch")
    except ImportError as blocked:
        assert "torch" in str(blocked)
    assert importlib.util.find_spec("torch") is None
    ATTEMPTS.clear()

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
''')


def run_torch_free(tmp_path: Path, *args: object) -> tuple[dict, str]:
    script = tmp_path / "no_torch.py"
    script.write_text(HOOK)
    proc = subprocess.run([sys.executable, str(script), json.dumps([str(a) for a in args])], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):]), proc.stderr


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """An untrained small_cnn checkpoint (what it predicts does not matter here), its ONNX export, a pack."""
    import torch

    from ciard_deploy import export
    from ciard_deploy.data import get_dataset_info
    from ciard_deploy.io import CheckpointMeta, save_checkpoint
    from ciard_deploy.models import create_model
    from ciard_deploy.verify import build_pack, save_pack

    d = tmp_path_factory.mktemp("torch_free")
    info = get_dataset_info("digits")
    torch.manual_seed(0)
    model = create_model("small_cnn", 10, 1, info.mean, info.std)
    ckpt = save_checkpoint(d / "run" / "student_best", model,
                           CheckpointMeta("small_cnn", 10, info.input_shape, info.mean, info.std, "digits",
                                          info.classes, eps=0.1))
    export.run(d / "run", d / "export", ["onnx"], n=64, reference_attack=None, check=False)
    pack = save_pack(build_pack(d / "run", n=64, attacks=["fgsm"], eps=0.1, device="cpu"), d / "pack.npz")
    return {"onnx": d / "export" / "model.onnx", "pack": pack, "checkpoint": ckpt, "dir": d}


def test_verify_onnx_without_torch(artifacts, tmp_path):
    res, err = run_torch_free(tmp_path, "verify", artifacts["onnx"], "--pack", artifacts["pack"], "--square-queries", 50,
                              "--square-n", 20, "--min-clean", 0.0, "--json", tmp_path / "r.json", "--junit",
                              tmp_path / "r.xml", "--markdown", tmp_path / "r.md", "--quiet")
    assert res["code"] == 0, err[-2000:]
    assert res["import_attempts"] == [], "importing the CLI tried to import torch"
    assert res["loaded"] == []
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["status"] == "passed" and rep["artifact"]["backend"] == "onnxruntime"
    assert set(rep["results"]["robust_acc"]) == {"fgsm@0.1", "square50@0.1"}
    assert rep["artifact"]["pack_matches_source"] is True
    assert "torch" not in rep["versions"] and "onnxruntime" in rep["versions"]  # this (torch-free) environment
    assert (tmp_path / "r.xml").is_file() and (tmp_path / "r.md").is_file()


def test_torch_only_verbs_exit_3_without_torch(artifacts, tmp_path):
    res, err = run_torch_free(tmp_path, "pack", artifacts["checkpoint"], "--out", tmp_path / "p.npz", "--n", 10,
                              "--attacks", "fgsm", "--eps", 0.1)
    assert res["code"] == 3, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "PyTorch" in lines[0]
    assert not (tmp_path / "p.npz").exists()
    res, err = run_torch_free(tmp_path, "verify", artifacts["checkpoint"], "--pack", artifacts["pack"],
                              "--square-queries", 0)
    assert res["code"] == 3, err
    assert "PyTorch" in err and "Traceback" not in err


def test_no_module_level_torch_imports():
    """What the repository hook greps for, checked here too: verify/, runtime/ and the verify verb."""
    files = [*(REPO / "ciard_deploy" / "verify").glob("*.py"), *(REPO / "ciard_deploy" / "runtime").glob("*.py"),
             REPO / "ciard_deploy" / "cli" / "verify.py"]
    pattern = re.compile(r"^(import torch|from torch)", re.M)
    offenders = [str(f.relative_to(REPO)) for f in files if pattern.search(f.read_text())]
    assert offenders == []
