"""The QAT student as an INT8 QDQ ONNX (``model.qat.int8.onnx``) with ciard metadata and its manifest.

The frozen fake-quantized student is exported with the TorchScript exporter (the torch.export-based one
does not lower ``fake_quantize_*``): every fake quantization becomes a QuantizeLinear/DequantizeLinear
pair with the scale learned in fine-tuning. The weights' pairs are then folded into int8 initializers
read by a DequantizeLinear (per output channel), the layout onnxruntime's ``quantize_static`` writes,
so the file holds int8 weights. Each bias, which the student rounds to the int32 grid of activation
scale x weight scale (``fakequant.quantize_bias``), is folded into one float32 initializer: the
float-bias layout TensorRT's explicit quantization takes, holding the values onnxruntime's graph
optimizer adds when it rewrites such a bias to int32 itself, so student, file, onnxruntime and the
twin (``ciard_deploy.twin``) add the same bias. The artifact carries the metadata ``export`` writes into
every artifact (precision int8, the FP32 checkpoint as its source, the QAT settings as its
``calibration``) and is checked like an export: re-opened in onnxruntime and compared with the PyTorch
fake-quantized student (its reference) on the test images, at the INT8 agreement threshold.
``manifest.json`` lists it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ciard_deploy import __version__
from ciard_deploy.data import create_dataset
from ciard_deploy.errors import GateFailed, UsageError
from ciard_deploy.export.base import FORMATS
from ciard_deploy.export.manifest import MANIFEST_NAME, ArtifactRecord, Manifest
from ciard_deploy.export.onnx import save_onnx
from ciard_deploy.export.pipeline import (ExportContext, source_info_of, check_artifact, check_output, export_versions,
                                          measure_reference)
from ciard_deploy.options.export import ExportOptions
from ciard_deploy.quantize_aware.finetune import QatResult
from ciard_deploy.runtime.base import INPUT_NAME, OUTPUT_NAME

QAT_FILE = "model.qat.int8.onnx"


#: the elementwise arithmetic the exporter leaves on constants (the bias of ``fakequant.quantize_bias``), in
#: numpy float32: the same IEEE operations, rounding half to even, as the student's torch ops
_ARITHMETIC = {"Round": np.rint, "Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Div": np.divide}


def _value(proto: Any, name: str) -> np.ndarray | None:
    """An initializer's or a Constant's value by tensor name, through Identity, Cast and elementwise arithmetic
    on constants (None: computed from the input)."""
    from onnx import numpy_helper

    for t in proto.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in proto.graph.node:
        if n.output and n.output[0] == name:
            if n.op_type == "Constant":
                return numpy_helper.to_array(n.attribute[0].t)
            if n.op_type == "Identity":  # the exporter aliases shared constants
                return _value(proto, n.input[0])
            if n.op_type == "Cast":  # the exporter casts the zero point to int8
                v = _value(proto, n.input[0])
                return None if v is None else v.astype(numpy_helper.helper.tensor_dtype_to_np_dtype(
                    next(a.i for a in n.attribute if a.name == "to")))
            if n.op_type in _ARITHMETIC:
                args = [_value(proto, i) for i in n.input]
                if any(a is None for a in args):
                    return None
                out = _ARITHMETIC[n.op_type](*args)
                return out.astype(args[0].dtype) if isinstance(out, np.ndarray) else np.asarray(out, args[0].dtype)
    return None


def _drop_dead_nodes(proto: Any) -> None:
    """Removes the nodes and initializers nothing reads any more (the graph output excepted)."""
    outputs = {o.name for o in proto.graph.output}
    while True:
        used = {i for n in proto.graph.node for i in n.input} | outputs
        dead = [n for n in proto.graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            proto.graph.node.remove(n)
    keep = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def fold_bias(proto: Any) -> int:
    """Replaces each Conv/Gemm bias computed from constants (the int32-grid rounding of
    ``fakequant.quantize_bias``, which the TorchScript exporter leaves as Round/Mul/Add nodes) by one float32
    initializer holding its value; returns how many. The file then has the float bias a QAT export for
    TensorRT carries, and onnxruntime's own int32 rewrite of it gives back the same values."""
    from onnx import numpy_helper

    inits = {t.name for t in proto.graph.initializer}
    folded = 0
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2] or node.input[2] in inits:
            continue
        b = _value(proto, node.input[2])
        if b is None or b.dtype != np.float32:
            continue
        name = f"{node.name.strip('/').replace('/', '.') or node.output[0]}.bias_int32_grid"
        proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(b), name))
        inits.add(name)
        node.input[2] = name
        folded += 1
    _drop_dead_nodes(proto)
    return folded


def fold_weight_quantization(proto: Any) -> int:
    """Replaces each QuantizeLinear of a constant (a weight) by its int8 result; returns how many."""
    from onnx import numpy_helper

    folded = 0
    for node in list(proto.graph.node):
        if node.op_type != "QuantizeLinear":
            continue
        w = _value(proto, node.input[0])
        if w is None or w.dtype != np.float32:
            continue
        scale, zp = _value(proto, node.input[1]), _value(proto, node.input[2])
        if scale is None or zp is None:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if np.ndim(scale) == 1 and w.ndim > 1:
            shape[axis] = -1
        q = np.rint(w / np.reshape(scale, shape)) + np.reshape(zp, shape).astype(np.float32)
        q = np.clip(q, -128, 127).astype(np.int8)
        name = f"{node.input[0]}_int8"
        proto.graph.initializer.append(numpy_helper.from_array(q, name))
        for other in proto.graph.node:
            for i, inp in enumerate(other.input):
                if inp == node.output[0]:
                    other.input[i] = name
        proto.graph.node.remove(node)
        folded += 1
    _drop_dead_nodes(proto)
    return folded


def export_qat(result: QatResult, out_dir: str | Path, *, n: int = 512, force: bool = False,
               threads: int | None = 1, check: bool = True) -> Manifest:
    """Writes ``model.qat.int8.onnx`` and ``manifest.json`` into ``out_dir``; returns the manifest.

    Raises:
        UsageError: ``out_dir`` holds them without ``force``, or cannot be written.
        GateFailed: onnxruntime agrees with the fake-quantized student on fewer test images than the INT8
            threshold (files written, the artifact marked failed).
    """
    import onnx
    import torch

    out = Path(out_dir)
    check_output(out, [QAT_FILE, MANIFEST_NAME], force)
    opts = ExportOptions(threads=threads, n=n)
    meta, model = result.meta, result.model.eval()
    spec = FORMATS.get("onnx-int8")
    test = create_dataset(meta.dataset, "test", root=result.recipe.data.data_root, n=n, seed=opts.seed)
    x, y = test.tensors()
    ref = measure_reference(model, x, y)
    ref.record.update(dataset=meta.dataset, precision="int8 fake-quantized",
                      origin=f"measured by ciard qat {__version__} on the fake-quantized PyTorch student (CPU)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.qat-", dir=out.parent))
    try:
        ctx = ExportContext(model, meta, opts, staging, meta.dataset, meta.eps, source_info_of(result.source, meta))
        raw = staging / "raw.onnx"
        t0 = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
            torch.onnx.export(model, (x[:2],), str(raw), dynamo=False, opset_version=opts.opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        proto = onnx.load(str(raw))
        n_weights = fold_weight_quantization(proto)
        fold_bias(proto)
        calibration = {"source": "qat", "split": "train", "n": result.settings["train_images"], "sha256": None,
                       "qat": result.describe()}
        dest = staging / QAT_FILE
        in_file = {**calibration, "qat": result.describe(reproducible=True)}  # same run, same bytes
        info = save_onnx(proto, dest, ctx.artifact_metadata(spec, opts.opset, calibration=in_file), opts.opset)
        exporter = {"tool": f"torch.onnx TorchScript exporter (torch {torch.__version__}) of the fake-quantized "
                            "student", "format": "QDQ", "weights": "int8 per-channel, symmetric (learned in QAT)",
                    "activations": "int8 per-tensor symmetric (learned in QAT)",
                    "bias": "float32 on the int32 grid of scale activation x weight scale",
                    "int8_weight_tensors": n_weights}
        ispec = ctx.input_spec(spec)
        rec = ArtifactRecord(name="onnx-int8", file=QAT_FILE, format="onnx", precision="int8",
                             runtime="onnxruntime", opset=info["opset"], ir_version=info["ir_version"],
                             input_spec=ispec.to_dict(),
                             output={"name": OUTPUT_NAME, "shape": [ispec.batch, int(meta.num_classes)],
                                     "dtype": "float32"},
                             classes=list(meta.classes),
                             normalization={"mean": list(meta.mean), "std": list(meta.std), "inside_model": True},
                             exporter=exporter, derived_from=Path(result.source).name, calibration=calibration,
                             seconds=round(time.perf_counter() - t0, 3))
        check_artifact(rec, dest, ref, opts)
        manifest = Manifest(source=ctx.source,
                            model={"arch": meta.arch, "num_classes": int(meta.num_classes),
                                   "classes": list(meta.classes), "input_shape": list(meta.input_shape),
                                   "normalization": {"mean": list(meta.mean), "std": list(meta.std),
                                                     "inside_model": True},
                                   "dataset": meta.dataset, "eps": meta.eps},
                            reference=ref.record, thresholds={p: opts.threshold(p) for p in ("fp32", "fp16", "int8")},
                            options=opts.to_dict(), artifacts=[rec], calibration=calibration,
                            versions=export_versions(), warnings=[], tool=f"ciard-deploy {__version__}")
        out.mkdir(parents=True, exist_ok=True)
        shutil.move(str(dest), str(out / QAT_FILE))
        manifest.write(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if check and not rec.passed:
        raise GateFailed(f"{QAT_FILE}: {rec.parity['clean']['summary']} (kept, marked failed in "
                         f"{out / MANIFEST_NAME})")
    return manifest


def check_qat_output(out_dir: str | Path, force: bool, run_dir: str | Path | None = None) -> None:
    """What ``export_qat`` will refuse, checked before the fine-tuning: ``out_dir`` a file, unwritable, holding
    the files without ``force``, or the run dir itself (its manifest.json would make the training run dir
    read as an export folder by ``ciard verify``/``inspect``).

    Raises:
        UsageError: one line naming --out and the problem.
    """
    out = Path(out_dir)
    if run_dir is not None and out.resolve() == Path(run_dir).resolve():
        raise UsageError(f"--out {out} is the run dir being fine-tuned: write the QAT artifact into a folder of its "
                         "own (a manifest.json there would make the run dir read as an export folder)")
    check_output(out, [QAT_FILE, MANIFEST_NAME], force)


def refuse_without_int8(formats: list[str]) -> None:
    """QAT makes an INT8 artifact: a request whose targets hold none is refused (exit 2)."""
    if "onnx-int8" not in formats:
        raise UsageError("QAT exports an INT8 QDQ ONNX but no INT8 target was asked for: add onnx-int8 "
                         f"(asked: {', '.join(formats) or 'none'})")
