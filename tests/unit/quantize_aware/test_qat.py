"""Quantization-aware robust fine-tuning (issue 17): a digits student fake-quantized, fine-tuned with its
method, exported as an INT8 QDQ ONNX that onnxruntime runs, its twin reproduces and `ciard verify` accepts;
bad input refused."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ciard_deploy.config import find_recipe, load_recipe
from ciard_deploy.errors import RecipeError, UsageError
from ciard_deploy.quantize_aware.export import QAT_FILE, export_qat
from ciard_deploy.quantize_aware.fakequant import calibrate, fake_quant_layers, freeze, prepare_qat, quantize_bias
from ciard_deploy.quantize_aware.finetune import QatResult, finetune


@pytest.fixture(scope="module")
def qat_export(digits_robust_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[QatResult, Any, Path]:
    """The robust digits run fine-tuned with QAT (1 epoch on 320 images) and exported: (result, manifest, file)."""
    res = finetune(digits_robust_run, epochs=1, lr=0.01, train_subset=320)
    out = tmp_path_factory.mktemp("qat")
    manifest = export_qat(res, out, n=200)
    return res, manifest, out / QAT_FILE


def test_qat_finetune_export_runs_in_onnxruntime_and_verify_accepts_it(qat_export, digits_robust_run: Path,
                                                                       tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    from ciard_deploy import api
    from ciard_deploy.data import create_dataset
    from ciard_deploy.runtime.metadata import decode_metadata

    res, manifest, path = qat_export
    assert res.history[0]["images"] == 320 and np.isfinite(res.history[0]["loss"])
    assert res.settings["method"] == "pgd_at" and res.settings["epochs"] == 1
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


def test_the_twin_of_the_qat_artifact_is_faithful_to_onnxruntime(qat_export) -> None:
    """The twin (what white-box attacks on the artifact run through) against onnxruntime on clean images,
    PGD images crafted on the twin and random images in the eps ball: the trust bar on every set, and
    nearly every row bit-exact (before the biases were put on the int32 grid, onnxruntime rewrote some of
    them itself and about 40 % of the rows of this model differed)."""
    assert_faithful_qdq(qat_export[2])


def assert_faithful_qdq(path: Path) -> None:
    """Biases on their int32 grid, int8 zero points 0, and a twin onnxruntime agrees with (see above)."""
    import onnx

    from ciard_deploy.attacks import create_attack
    from ciard_deploy.data import create_dataset
    from ciard_deploy.quantize_aware.export import _value
    from ciard_deploy.runtime import open_backend
    from ciard_deploy.twin import TRUST_THRESHOLD, build_twin, measure_fidelity, random_in_ball

    proto = onnx.load(str(path))
    producer = {o: n for n in proto.graph.node for o in n.output}
    inits = {t.name for t in proto.graph.initializer}
    layers = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(layers) == 5 and "Round" not in {n.op_type for n in proto.graph.node}
    for n in layers:  # float bias initializer on the int32 grid of scale activation x weight scale
        assert n.input[2] in inits
        b = _value(proto, n.input[2])
        s = _value(proto, producer[n.input[0]].input[1]) * _value(proto, producer[n.input[1]].input[1])
        assert b.dtype == np.float32 and np.array_equal(np.rint(b / s) * s, b)
    for n in proto.graph.node:  # the layout TensorRT takes: int8, zero point 0, on activations and weights
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            z = _value(proto, n.input[2])
            assert z.dtype == np.int8 and not z.any()

    x, y = create_dataset("digits", "test", n=200, seed=2).tensors()
    twin = build_twin(path)
    torch.manual_seed(0)
    x_adv = create_attack("pgd20", 0.15).run(twin, x, y).numpy()
    clean = x.numpy()
    sets = {"clean": clean, "adversarial": x_adv,
            "random_in_ball": np.concatenate([random_in_ball(clean, 0.15, seed=k) for k in range(3)])}
    with open_backend(path, threads=1) as rt:
        fid = measure_fidelity(twin, rt.predict, sets)
    assert fid.trusted and all(s.agreement >= TRUST_THRESHOLD for s in fid.per_set.values()), fid.line()
    assert min(s.bit_exact for s in fid.per_set.values()) >= 0.95, fid.line()


def test_the_bias_is_rounded_to_the_int32_grid_with_a_straight_through_gradient() -> None:
    torch.manual_seed(0)
    q = prepare_qat(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)))
    calibrate(q, [torch.rand(8, 1, 8, 8)])
    freeze(q)
    layers = list(fake_quant_layers(q).values())
    assert len(layers) == 2
    for layer in layers:
        b = layer.layer.bias
        s = layer.act_fq.scale * layer.weight_fq.scale
        bq = quantize_bias(b, layer.act_fq.scale, layer.weight_fq.scale)
        assert torch.equal(bq, torch.round(b / s) * s) and not torch.equal(bq, b)
        (grad,) = torch.autograd.grad(bq.sum(), b)
        assert torch.equal(grad, torch.ones_like(b))
    x = torch.rand(2, 1, 8, 8)
    layer = layers[0]
    w = torch.fake_quantize_per_channel_affine(layer.layer.weight, layer.weight_fq.scale,
                                               layer.weight_fq.zero_point.to(torch.int32), 0, -128, 127)
    xq = torch.fake_quantize_per_tensor_affine(x, float(layer.act_fq.scale), 0, -128, 127)
    expected = torch.nn.functional.conv2d(xq, w, quantize_bias(layer.layer.bias, layer.act_fq.scale,
                                                               layer.weight_fq.scale))
    assert torch.equal(layer(x), expected)  # the layer adds the rounded bias


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


def test_learned_activation_scales_move_by_gradient_and_land_in_the_file(qat_export, digits_robust_run: Path,
                                                                         tmp_path: Path) -> None:
    """activation_scales=learned (LSQ): from the same calibration, the scales end elsewhere than the observed
    ones, the exported QuantizeLinear scales are the learned values, the biases sit on the learned grid and
    the artifact's twin is as faithful as the observed one's."""
    import onnx
    from onnx import numpy_helper

    observed_run, _, _ = qat_export
    learned_run = finetune(digits_robust_run, epochs=1, lr=0.01, train_subset=320, activation_scales="learned")
    assert learned_run.settings["activation_scales"] == "learned"
    assert observed_run.settings["activation_scales"] == "observed"
    observed, learned = observed_run.describe()["scales"], learned_run.describe()["scales"]
    assert set(observed) == set(learned) and all(v["activation_scale"] > 0 for v in learned.values())
    moved = [abs(learned[k]["activation_scale"] / observed[k]["activation_scale"] - 1) for k in learned]
    assert max(moved) > 0.01  # trained, not the observer's moving average
    assert not any(p.dim() == 1 and p.numel() == 1 for p in learned_run.model.parameters())  # frozen: no scale params

    manifest = export_qat(learned_run, tmp_path / "qat", n=200)
    assert manifest.artifacts[0].passed and manifest.artifacts[0].parity["clean"]["top1_agreement"] >= 0.99
    path = tmp_path / "qat" / QAT_FILE
    proto = onnx.load(str(path))
    consts = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node
                   if n.op_type == "Constant"})
    q_scales = sorted(float(consts[n.input[1]]) for n in proto.graph.node
                      if n.op_type == "QuantizeLinear" and n.input[1] in consts and consts[n.input[1]].size == 1)
    expect = sorted(v["activation_scale"] for v in learned.values())
    assert len(q_scales) == len(expect) and np.allclose(q_scales, expect, rtol=1e-6)
    assert_faithful_qdq(path)


def test_the_same_fine_tuning_exports_the_same_bytes(qat_export, tmp_path: Path) -> None:
    """The artifact carries no wall-clock seconds and no absolute path: a re-made QAT stage whose weights
    are the same writes the same file (so pack and verify need not run again), the manifest keeps both."""
    import dataclasses
    import json

    result, manifest, path = qat_export
    later = dataclasses.replace(result, history=[{**line, "time_s": line["time_s"] + 12.5} for line in result.history])
    again = export_qat(later, tmp_path / "again", n=200)
    assert (tmp_path / "again" / QAT_FILE).read_bytes() == path.read_bytes()
    recorded = json.loads((tmp_path / "again" / "manifest.json").read_text())["artifacts"][0]["calibration"]["qat"]
    assert recorded["history"][0]["time_s"] == result.history[0]["time_s"] + 12.5
    assert Path(recorded["source_checkpoint"]).is_absolute() and again.artifacts[0].passed


def _hashes(folder: Path) -> dict[str, str]:
    from ciard_deploy.fingerprint import sha256_file

    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the student fails the test: a refusal must come before any work (minutes of fine-tuning)."""
    from ciard_deploy.quantize_aware import finetune as module

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the student was loaded: the refusal came too late")

    monkeypatch.setattr(module, "load_model", fail)


@pytest.mark.parametrize("flags, needle", [
    (["--activation-scales", "bogus"], "--activation-scales 'bogus': Input should be 'observed' or 'learned'"),
    (["--epochs", "0"], "--epochs 0: Input should be greater than 0"),
    (["--epochs", "-3"], "--epochs -3: Input should be greater than 0"),
    (["--lr", "0"], "--lr 0.0: Input should be greater than 0"),
    (["--lr", "-0.1"], "--lr -0.1: Input should be greater than 0"),
    (["--lr", "nan"], "--lr nan: Input should be a finite number"),
    (["--lr", "inf"], "--lr inf: Input should be a finite number"),
    (["--train-subset", "0"], "--train-subset 0: Input should be greater than 0"),
    (["--n", "0"], "--n 0: the check needs at least 1 test image"),
])
def test_cli_refuses_a_bad_setting_before_any_work(digits_robust_run: Path, tmp_path: Path, invoke,
                                                   assert_one_line_error, no_work, flags: list[str],
                                                   needle: str) -> None:
    """Each refused in one line naming the flag, before the student is loaded (a bad --lr used to fine-tune for
    minutes and fail the export check with a NaN model (exit 1); --lr -0.1 was a traceback; --epochs 0 named
    neither the flag nor the option)."""
    before = _hashes(digits_robust_run)
    res = invoke("qat", digits_robust_run, "--out", tmp_path / "out", "--threads", 1, *flags)
    assert_one_line_error(res, 2, needle)
    assert not (tmp_path / "out").exists() and _hashes(digits_robust_run) == before


def test_cli_refuses_a_bad_out_before_any_work(digits_robust_run: Path, tmp_path: Path, invoke,
                                               assert_one_line_error, no_work) -> None:
    """--out a file, under a file, holding the files without --force, or the run dir itself: refused before the
    fine-tuning (they were refused only after it), every file as it was."""
    run = tmp_path / "run"
    shutil.copytree(digits_robust_run, run)
    (tmp_path / "file").write_text("mine")
    held = tmp_path / "held"
    held.mkdir()
    (held / "manifest.json").write_text("{\"mine\": 1}")
    before = _hashes(tmp_path)
    cases = [(tmp_path / "file", ["--out", str(tmp_path / "file"), "exists and is not a folder"]),
             (tmp_path / "file" / "sub", ["cannot write to --out", "is not a folder"]),
             (held, [str(held), "already holds manifest.json; pass --force to overwrite"]),
             (run, [f"--out {run} is the run dir being fine-tuned"])]
    for out, needles in cases:
        res = invoke("qat", run, "--out", out, "--threads", 1)
        assert_one_line_error(res, 2, *needles)
    assert _hashes(tmp_path) == before


def test_a_train_subset_larger_than_the_training_split_is_refused(digits_robust_run: Path, tmp_path: Path, invoke,
                                                                  assert_one_line_error,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """It used to fine-tune on all images and record the number asked for nowhere; now refused before any step,
    naming the flag's keyword or the recipe file's key."""
    from ciard_deploy.quantize_aware import finetune as module

    monkeypatch.setattr(module, "train_step", lambda *a, **k: pytest.fail("fine-tuned"))
    res = invoke("qat", digits_robust_run, "--out", tmp_path / "out", "--threads", 1, "--train-subset", 100000)
    assert_one_line_error(res, 2, "train_subset 100000 is more than the", "training images of the run")
    run = tmp_path / "run"
    shutil.copytree(digits_robust_run, run)
    recipe = load_recipe(digits_robust_run / "recipe.yaml", ["quantize.train_subset=100000"])
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    res = invoke("qat", run, "--out", tmp_path / "out", "--threads", 1)
    assert_one_line_error(res, 2, f"{run / 'recipe.yaml'}: quantize.train_subset 100000 is more than the")
    assert not (tmp_path / "out").exists()


def test_a_recipe_quantize_section_with_an_unknown_key_is_refused(digits_robust_run: Path, tmp_path: Path, invoke,
                                                                  assert_one_line_error, no_work) -> None:
    run = tmp_path / "run"
    shutil.copytree(digits_robust_run, run)
    (run / "recipe.yaml").write_text((digits_robust_run / "recipe.yaml").read_text()
                                     + "quantize:\n  mode: qat\n  epocs: 2\n")
    res = invoke("qat", run, "--out", tmp_path / "out", "--threads", 1)
    assert_one_line_error(res, 2, f"{run / 'recipe.yaml'}: quantize.epocs: unknown key (did you mean 'epochs'?)")
    assert not (tmp_path / "out").exists()


def test_ctrl_c_during_the_fine_tuning_exits_130_and_writes_nothing(digits_robust_run: Path, tmp_path: Path, invoke,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from ciard_deploy.quantize_aware import finetune as module

    def ctrl_c(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "train_step", ctrl_c)
    res = invoke("qat", digits_robust_run, "--out", tmp_path / "out", "--threads", 1, "--train-subset", 64)
    assert res.exit_code == 130 and "interrupted" in res.stderr and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []  # no --out, no staging folder beside it


def test_cli_takes_a_ciard_run_folder_as_its_run_dir(digits_robust_run: Path, tmp_path: Path, invoke,
                                                     assert_one_line_error, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ciard qat DIR` on a `ciard run` folder fine-tunes DIR/run (as export, pack and verify read it); it used to
    say the folder had no checkpoint."""
    from ciard_deploy.errors import CiardError
    from ciard_deploy.quantize_aware import finetune as module
    from ciard_deploy.workflow import STATE_FORMAT

    folder = tmp_path / "wf"
    shutil.copytree(digits_robust_run, folder / "run")
    (folder / "workflow.json").write_text(f'{{"format": "{STATE_FORMAT}", "stages": {{}}}}')

    def seen(run_dir: Path, **kwargs: Any) -> None:
        raise CiardError(f"finetune called on {run_dir}")

    monkeypatch.setattr(module, "finetune", seen)
    res = invoke("qat", folder, "--out", tmp_path / "out", "--threads", 1)
    assert_one_line_error(res, 2, f"finetune called on {folder / 'run'}")
