"""Format table, flag -> format selection, dependency order, option validation."""

from __future__ import annotations

import pytest

from ciard_deploy.errors import UsageError
from ciard_deploy.export import FORMATS, ExportOptions, format_table, formats_from_flags, resolve_formats

pytestmark = pytest.mark.unit


def test_flags_select_formats():
    assert formats_from_flags(onnx=True) == ["onnx"]
    assert formats_from_flags(fp16=True, int8=True) == ["onnx-fp16", "onnx-int8"]
    assert formats_from_flags(tensorrt=True) == ["onnx", "tensorrt-fp32"]
    assert formats_from_flags(tensorrt=True, fp16=True) == ["onnx-fp16", "tensorrt-fp16"]
    assert formats_from_flags() == []


def test_dependencies_come_first():
    assert resolve_formats(["onnx-int8"]) == ["onnx", "onnx-int8"]
    assert resolve_formats(["tensorrt-int8", "onnx-fp16"]) == ["onnx", "onnx-int8", "tensorrt-int8", "onnx-fp16"]
    calibrated = ExportOptions(trt_int8="calibrator")
    assert resolve_formats(["tensorrt-int8"], calibrated) == ["onnx", "tensorrt-int8"]


def test_no_or_unknown_format_is_usage_error():
    with pytest.raises(UsageError, match="no format chosen"):
        resolve_formats([])
    with pytest.raises(UsageError, match="onnx-int8"):
        resolve_formats(["onnx-int4"])


def test_options_validation_lists_every_problem():
    assert ExportOptions().validate().opset == 18
    with pytest.raises(UsageError) as exc:
        ExportOptions(opset=7, min_agreement_int8=97.0, calib="noisy", batch=0).validate()
    msg = str(exc.value)
    for needle in ("--opset", "--min-agreement-int8", "--calib", "--batch"):
        assert needle in msg
    with pytest.raises(UsageError, match="unknown export option"):
        ExportOptions().with_overrides(opsett=17)


def test_format_table_covers_registry_and_says_what_runs_here():
    rows = format_table(status=lambda runtime: "ok" if runtime == "onnxruntime" else "unavailable: no GPU")
    assert {r["name"] for r in rows} == set(FORMATS.names())
    assert [r["name"] for r in rows][:3] == ["onnx", "onnx-fp16", "onnx-int8"]
    trt = [r for r in rows if r["format"] == "tensorrt"]
    assert trt and all(r["gpu"] and r["status"].startswith("unavailable") for r in trt)
    real = format_table()
    assert next(r for r in real if r["name"] == "onnx")["status"] == "ok"
