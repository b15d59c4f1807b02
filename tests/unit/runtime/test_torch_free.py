"""ciard_deploy.runtime (and the export manifest reader) work where `import torch` fails.

A subprocess installs a meta path finder that raises ImportError for torch (setting
sys.modules["torch"] = None would break scipy), then opens and runs an exported ONNX file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.unit

SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"import of {name} blocked (torch-free device)")
            return None

    sys.meta_path.insert(0, NoTorch())
    try:
        import torch  # noqa: F401
        raise SystemExit("the import hook did not block torch")
    except ImportError as blocked:
        assert "torch" in str(blocked)

    import numpy as np
    import ciard_deploy.runtime as rt
    from ciard_deploy.export.inspection import inspect_artifact

    with rt.open_backend(sys.argv[1]) as backend:
        x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
        logits = backend.predict(x)
    status = rt.available_backends()
    meta = inspect_artifact(sys.argv[1])["metadata"]
    print(json.dumps({"shape": list(logits.shape), "torch_status": status["torch"], "arch": meta["arch"],
                      "torch_loaded": any(m == "torch" or m.startswith("torch.") for m in sys.modules)}))
""")


def test_runtime_opens_and_predicts_onnx_without_torch(tiny_artifacts, tmp_path):
    script = tmp_path / "no_torch.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tiny_artifacts["onnx"])], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rep["shape"] == [5, 10]
    assert rep["torch_loaded"] is False
    assert rep["torch_status"].startswith("unavailable:") and rep["arch"] == "tiny_cnn"
