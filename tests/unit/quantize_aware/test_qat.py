"""Quantization-aware robust fine-tuning (issue 17): a digits student fake-quantized, fine-tuned with its
method, exported as an INT8 QDQ ONNX that onnxruntime runs and `ciard verify` accepts; bad input refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ciard_deploy.config import find_recipe, load_recipe
from ciard_deploy.errors import RecipeError, UsageError
from ciard_deploy.quantize_aware.fakequant import prepare_qat


def test_qat_finetune_export_runs_in_onnxruntime_and_verify_accepts_it(digits_robust_run: Path, tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    from ciard_deploy import api
    from ciard_deploy.data import create_dataset
    from ciard_deploy.quantize_aware.export import QAT_FILE, export_qat
    from ciard_deploy.quantize_aware.finetune import finetune
    from ciard_deploy.runtime.metadata import decode_metadata

    res = finetune(digits_robust_run, epochs=1, lr=0.01, train_subset=320)
    assert res.history[0]["images"] == 320 and np.isfinite(res.history[0]["loss"])
    assert res.settings["method"] == "pgd_at" and res.settings["epochs"] == 1
    manifest = export_qat(res, tmp_path / "qat", n=200)
    path = tmp_path / "qat" / QAT_FILE
    rec = manifest.artifacts[0]
    assert rec.passed and rec.precision == "int8" and rec.file == QAT_FILE

    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    int8_weights = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    assert ops.count("QuantizeLinear") == 5 and len(int8_weights) == 5  # 4 convs + fc: int8 weights, QDQ inputs
    meta = decode_metadata({p.key: p.value for p in proto.metadata_props})
    assert meta["precision"] == "int8" and meta["calibration"]["source"] == "qat"
    scales = meta["calibration"]["qat"]["scales"]
    assert len(scales) == 5 and all(s["activation_scale"] > 0 for s in scales.values())

    x, _ = create_dataset("digits", "test", n=200, seed=1).tensors()
    logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = res.model(x).numpy()
    assert (logits.argmax(1) == ref.argmax(1)).mean() >= 0.95

    pack = api.pack(digits_robust_run, tmp_path / "pack.npz", n=60, attacks=["fgsm"], artifacts=[path],
                    artifact_attacks=["apgd-ce"], threads=1)
    report = api.verify(path, pack, live=[], threads=1)
    assert report.metrics["clean_acc"] >= 0.9
    assert report.artifact["pack_matches_source"] is True  # the QAT file names the FP32 checkpoint as its source
    assert report.artifact["manifest"]["sha256_matches"] and report.artifact["manifest"]["status"] == "passed"
    provenance = {"artifact_hash_mismatch", "pack_model_mismatch", "manifest_problem", "provenance_unknown",
                  "metadata_mismatch"}
    assert not [w.message for w in report.warnings if w.check in provenance]


@pytest.mark.parametrize("model, needle", [
    (nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 4, 3), nn.Flatten()), "layer '0' (BatchNorm2d)"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.ConvTranspose2d(4, 4, 3), nn.Flatten()), "layer '1' (ConvTranspose2d)"),
])
def test_a_layer_the_quantizer_cannot_handle_is_named(model: nn.Module, needle: str) -> None:
    with pytest.raises(UsageError, match=".*") as e:
        prepare_qat(model)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_conv_bn_is_folded_and_wrapped() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    q = prepare_qat(model.eval())
    kinds = [type(m).__name__ for m in q.modules()]
    assert "BatchNorm2d" not in kinds and kinds.count("FakeQuantLayer") == 2


def test_quantize_section_is_left_out_of_the_hash_and_needs_an_int8_target() -> None:
    path = find_recipe("quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15")
    plain = load_recipe(path)
    qat = load_recipe(path, ["quantize.mode=qat", "quantize.epochs=3", "quantize.lr=0.005"])
    assert plain.quantize is None and "quantize" not in plain.to_dict()
    assert qat.quantize.epochs == 3 and qat.to_dict()["quantize"]["lr"] == 0.005
    assert qat.hash == plain.hash
    with pytest.raises(RecipeError, match="no INT8 target"):
        load_recipe(path, ["quantize.epochs=1", "deploy.formats=[onnx]"])
    with pytest.raises(RecipeError, match="epochs"):
        load_recipe(path, ["quantize.epochs=0"])


def test_cli_refuses_qat_without_an_int8_target(digits_robust_run: Path, tmp_path: Path, invoke,
                                                assert_one_line_error) -> None:
    run = tmp_path / "run"
    shutil.copytree(digits_robust_run, run)
    recipe = load_recipe(digits_robust_run / "recipe.yaml", ["deploy.formats=[onnx]"])
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    res = invoke("qat", run, "--out", tmp_path / "out", "--threads", 1)
    assert_one_line_error(res, 2, "no INT8 target")
    assert not (tmp_path / "out").exists()


def test_cli_names_the_layer_it_cannot_quantize(digits_robust_run: Path, tmp_path: Path, invoke, assert_one_line_error,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from ciard_deploy.model_loader import load_model
    from ciard_deploy.quantize_aware import finetune

    def with_bad_layer(source, *a, **k):
        model, meta = load_model(source, *a, **k)
        return nn.Sequential(model, nn.Unflatten(1, (10, 1)), nn.Conv1d(10, 10, 1)), meta

    monkeypatch.setattr(finetune, "load_model", with_bad_layer)
    res = invoke("qat", digits_robust_run, "--out", tmp_path / "out", "--threads", 1)
    assert_one_line_error(res, 2, "layer '2' (Conv1d)")


def test_learned_activation_scales_move_by_gradient_and_land_in_the_file(digits_robust_run: Path,
                                                                         tmp_path: Path) -> None:
    """activation_scales=learned (LSQ): from the same calibration, the scales end elsewhere than the observed
    ones, the exported QuantizeLinear scales are the learned values, and onnxruntime agrees with the student."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from ciard_deploy.data import create_dataset
    from ciard_deploy.quantize_aware.export import QAT_FILE, export_qat
    from ciard_deploy.quantize_aware.finetune import finetune

    runs = {mode: finetune(digits_robust_run, epochs=1, lr=0.01, train_subset=320, activation_scales=mode)
            for mode in ("observed", "learned")}
    assert runs["learned"].settings["activation_scales"] == "learned"
    observed, learned = (runs[m].describe()["scales"] for m in ("observed", "learned"))
    assert set(observed) == set(learned) and all(v["activation_scale"] > 0 for v in learned.values())
    moved = [abs(learned[k]["activation_scale"] / observed[k]["activation_scale"] - 1) for k in learned]
    assert max(moved) > 0.01  # trained, not the observer's moving average
    assert not any(p.requires_grad and p.dim() == 1 and p.numel() == 1 for p in runs["learned"].model.parameters())

    manifest = export_qat(runs["learned"], tmp_path / "qat", n=200)
    assert manifest.artifacts[0].passed
    proto = onnx.load(str(tmp_path / "qat" / QAT_FILE))
    consts = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node
                   if n.op_type == "Constant"})
    q_scales = sorted(float(consts[n.input[1]]) for n in proto.graph.node
                      if n.op_type == "QuantizeLinear" and n.input[1] in consts and consts[n.input[1]].size == 1)
    expect = sorted(v["activation_scale"] for v in learned.values())
    assert len(q_scales) == len(expect) and np.allclose(q_scales, expect, rtol=1e-6)

    x, _ = create_dataset("digits", "test", n=200, seed=1).tensors()
    logits = ort.InferenceSession(str(tmp_path / "qat" / QAT_FILE),
                                  providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = runs["learned"].model(x).numpy()
    assert (logits.argmax(1) == ref.argmax(1)).mean() >= 0.97
