"""Smaller faults of issue 12, end to end: an artifact whose logits are NaN/inf never passes verify or
export's check; a full disk during the INT8 step is the file's problem (exit 2, one line, nothing left
behind), not a "quantization failure"; a corrupt or hostile ``train_state.pt`` on ``--resume`` is one line
that never suggests ``weights_only=False``, and its pickled code never runs."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from ciard_deploy.errors import GateFailed

pytestmark = pytest.mark.integration


def _nan_onnx(src: Path, dest: Path) -> Path:
    """``src`` with one class's bias set to NaN: every image gets a NaN logit."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    bias = next(i for i in model.graph.initializer if i.name.endswith("fc.bias"))
    values = numpy_helper.to_array(bias).copy()
    values[3] = np.nan
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(model, str(dest))
    return dest


def test_verify_fails_an_artifact_with_nan_logits_whatever_the_flags(untrained_digits_onnx, tmp_path, invoke,
                                                                     assert_one_line_error):
    art = _nan_onnx(untrained_digits_onnx["onnx"], tmp_path / "nan.onnx")
    report = tmp_path / "report.json"
    res = invoke("-q", "verify", art, "--pack", untrained_digits_onnx["pack"], "--live", "none", "--allow-mismatch",
                 "--json", report)
    assert_one_line_error(res, 1, "defect V114", "NaN/inf logits for 128 of 128 images", "no flag accepts it")
    d = json.loads(report.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the report"))
    assert d["status"] == "failed" and d["results"]["clean_acc"] == 0.0  # a NaN row predicts nothing
    v107 = [w for w in d["warnings"] if w["code"] == "V107"]
    assert not v107 and d["parity"]["clean"]["nonfinite"] == 64


def test_export_check_fails_an_artifact_with_nan_logits(untrained_digits_onnx, tmp_path, monkeypatch):
    from ciard_deploy import export
    from ciard_deploy.runtime.ort_backend import OrtBackend

    real = OrtBackend._predict
    monkeypatch.setattr(OrtBackend, "_predict", lambda self, x: real(self, x) * np.float32(np.nan))
    with pytest.raises(GateFailed, match="model.onnx: NaN/inf logits for 16 of 16 clean images") as e:
        export.run(untrained_digits_onnx["run"], tmp_path / "out", ["onnx"], n=16, reference_attack=None, threads=1)
    assert e.value.result.manifest.artifacts[0].status == "failed"  # type: ignore[attr-defined]


def test_a_full_disk_during_int8_names_the_file_and_leaves_nothing(untrained_digits_onnx, tmp_path, monkeypatch,
                                                                   invoke, assert_one_line_error):
    import onnxruntime.quantization as q

    def full_disk(*args, **kwargs):  # what a write of the quantized model raises on a full disk: no file name
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(q, "quantize_static", full_disk)
    out = tmp_path / "exp" / "out"
    res = invoke("-q", "export", untrained_digits_onnx["run"], "--out", out, "--int8", "--n", 16, "--threads", 1)
    assert_one_line_error(res, 2, f"{out / 'model.int8.onnx'}: no space left on the device", "(ENOSPC)")
    assert "quantization" not in res.stderr.lower()
    exp = tmp_path / "exp"
    assert not out.exists() and (not exp.exists() or os.listdir(exp) == [])  # no artifact, no staging folder


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["garbage", "truncated", "code", "plain_pickle", "not_a_state"])
def test_resume_on_a_corrupt_or_hostile_train_state(kind, digits_robust_run, tmp_path, invoke,
                                                    assert_one_line_error):
    import torch

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(digits_robust_run / "recipe.yaml", run / "recipe.yaml")
    state, marker = run / "train_state.pt", tmp_path / "pwned"
    if kind == "garbage":
        state.write_bytes(b"\x00not a torch file" * 8)
    elif kind == "truncated":
        torch.save({"format": "ciard-train-state/1", "w": torch.zeros(64)}, state)
        state.write_bytes(state.read_bytes()[:200])
    elif kind == "code":
        torch.save({"format": "ciard-train-state/1", "x": _Evil(marker)}, state)
    elif kind == "plain_pickle":
        state.write_bytes(pickle.dumps({"x": _Evil(marker)}, protocol=4))
    else:
        torch.save({"format": "something else", "student": {}}, state)
    before = state.read_bytes()
    res = invoke("-q", "train", run / "recipe.yaml", "--out", run, "--resume")
    assert_one_line_error(res, 2, f"{state}: not a ciard training state (corrupt or not made by ciard): ",
                          "; delete it to start over or restore it")
    assert "weights_only" not in res.output and "arbitrary code" not in res.output
    assert not marker.exists() and state.read_bytes() == before
    if kind == "code":
        assert "pickled code or objects" in res.stderr
