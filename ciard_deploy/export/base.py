"""Export formats and the exporter interface (their options: ``options.export.ExportOptions``).

Every format is a registry entry (``FORMATS``): its CLI flag, file name, precision, the
runtime that checks it, whether it needs a GPU, which other formats it consumes (exporters
chain: the INT8 and TensorRT exporters read ``model.onnx``) and which options it uses. The
``ciard export --list`` table is derived from it (Ultralytics' ``export_formats``).

Torch-free: importing this module (or the manifest) does not import torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol, Sequence

from ciard_deploy.errors import UsageError
from ciard_deploy.options.export import PRECISIONS, ExportOptions, Precision
from ciard_deploy.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from ciard_deploy.export.pipeline import ExportContext

@dataclass(frozen=True)
class FormatSpec:
    """One export format (a row of the format table).

    Attributes:
        name: registry key, e.g. ``"onnx-int8"``.
        flags: the CLI flags that select it.
        format: ``"onnx"`` or ``"tensorrt"``.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        filename: file written in the output folder.
        runtime: backend that loads it for the check.
        gpu: needs an NVIDIA GPU (and TensorRT) to build and run.
        needs: formats it consumes (built first).
        options: ExportOptions fields it uses.
        exporter: ``"module:Class"`` of its Exporter, imported on first use.
        description: one line for the table.
    """

    name: str
    flags: str
    format: Literal["onnx", "tensorrt"]
    precision: Precision
    filename: str
    runtime: str
    gpu: bool
    needs: tuple[str, ...]
    options: tuple[str, ...]
    exporter: str
    description: str = ""

    def load(self) -> "Exporter":
        module, _, attr = self.exporter.partition(":")
        return getattr(importlib.import_module(module), attr)(self)


class Exporter(Protocol):
    """Writes one artifact. ``export`` writes ``dest`` (a path in the staging folder) and returns
    what the manifest should record about how it was made (exporter, opset, calibration...).
    The pipeline then loads ``dest`` in its runtime and checks it against PyTorch."""

    spec: FormatSpec

    def export(self, ctx: "ExportContext", dest: Path) -> dict[str, Any]: ...


FORMATS: Registry[FormatSpec] = Registry("export format")
_TRT_OPTS = ("workspace_mb", "min_batch", "opt_batch", "max_batch", "timing_cache")
for _spec in (
    FormatSpec("onnx", "--onnx", "onnx", "fp32", "model.onnx", "onnxruntime", False, (),
               ("opset", "batch", "simplify"), "ciard_deploy.export.onnx:OnnxExporter",
               "ONNX FP32 (torch.export-based exporter, TorchScript fallback), normalization inside"),
    FormatSpec("onnx-fp16", "--fp16", "onnx", "fp16", "model.fp16.onnx", "onnxruntime", False, ("onnx",),
               (), "ciard_deploy.export.onnx:Fp16Exporter",
               "ONNX FP16 weights/compute, float32 input and logits (onnxruntime float16 converter)"),
    FormatSpec("onnx-int8", "--int8", "onnx", "int8", "model.int8.onnx", "onnxruntime", False, ("onnx",),
               ("calib", "calib_n", "calib_method", "calib_attack", "int8_symmetric"),
               "ciard_deploy.export.quantize:Int8Exporter",
               "ONNX INT8 QDQ, per-channel weights, static calibration (onnxruntime.quantization)"),
    FormatSpec("tensorrt-fp32", "--tensorrt", "tensorrt", "fp32", "model.fp32.engine", "tensorrt", True, ("onnx",),
               _TRT_OPTS, "ciard_deploy.export.tensorrt:TensorRTExporter", "TensorRT engine, FP32"),
    FormatSpec("tensorrt-fp16", "--tensorrt --fp16", "tensorrt", "fp16", "model.fp16.engine", "tensorrt", True,
               ("onnx",), _TRT_OPTS, "ciard_deploy.export.tensorrt:TensorRTExporter",
               "TensorRT engine, FP16 builder flag"),
    FormatSpec("tensorrt-int8", "--tensorrt --int8", "tensorrt", "int8", "model.int8.engine", "tensorrt", True,
               ("onnx-int8",), (*_TRT_OPTS, "trt_int8", "calib", "calib_n"),
               "ciard_deploy.export.tensorrt:TensorRTExporter",
               "TensorRT engine, INT8 from the QDQ ONNX (or an entropy calibrator with --trt-int8 calibrator)"),
):
    FORMATS.add(_spec.name, _spec)


def formats_from_flags(onnx: bool = False, fp16: bool = False, int8: bool = False, tensorrt: bool = False) -> list[str]:
    """The formats the CLI flags select.

    ``--fp16``/``--int8`` choose precisions, ``--onnx`` chooses FP32; ``--tensorrt`` adds an
    engine for each chosen precision (FP32 when no precision flag is given). ONNX files are
    always written for the chosen precisions: every engine is built from one.
    """
    precisions = [p for p, on in (("fp32", onnx), ("fp16", fp16), ("int8", int8)) if on]
    if tensorrt and not precisions:
        precisions = ["fp32"]
    out = [{"fp32": "onnx", "fp16": "onnx-fp16", "int8": "onnx-int8"}[p] for p in precisions]
    if tensorrt:
        out += [f"tensorrt-{p}" for p in precisions]
    return out


def resolve_formats(names: Sequence[str], options: ExportOptions | None = None) -> list[str]:
    """Validates format names and adds the formats they consume, in build order."""
    if not names:
        raise UsageError("no format chosen: pass --onnx, --fp16, --int8 and/or --tensorrt "
                         f"(formats: {', '.join(FORMATS.names())})")
    options = options or ExportOptions()
    order: list[str] = []

    def visit(name: str) -> None:
        spec = FORMATS.get(name)
        needs = spec.needs
        if name == "tensorrt-int8" and options.trt_int8 == "calibrator":
            needs = ("onnx",)
        for dep in needs:
            visit(dep)
        if name not in order:
            order.append(name)

    for n in names:
        visit(n)
    return order


def format_table(status: Callable[[str], str] | None = None) -> list[dict[str, Any]]:
    """Rows of the format table: name, flags, file, precision, runtime, GPU, consumes, options, status."""
    if status is None:
        from ciard_deploy.runtime import BACKENDS

        cache: dict[str, str] = {}

        def status(runtime: str) -> str:
            if runtime not in cache:
                cache[runtime] = BACKENDS.get(runtime).status()
            return cache[runtime]

    return [{"name": s.name, "flags": s.flags, "file": s.filename, "format": s.format, "precision": s.precision,
             "runtime": s.runtime, "gpu": s.gpu, "needs": list(s.needs), "options": list(s.options),
             "status": status(s.runtime), "description": s.description}
            for s in sorted((s for _, s in FORMATS.items()), key=lambda s: (s.format != "onnx", PRECISIONS.index(s.precision)))]
