"""Export formats and the exporter interface (their options: ``options.export.ExportOptions``).

Every format is a registry entry (``FORMATS``): its CLI flags, file name (and sidecar), precision,
the runtime that checks it, whether it needs a GPU, which other formats it consumes (exporters
chain: the INT8 and TensorRT exporters read ``model.onnx``), which options it uses and how they
change it. The ``ciard export --list`` table, the flag -> format selection and the environment
check before any work (``check_environment``, through the runtime's registry entry) are derived
from it (Ultralytics' ``export_formats``), so nothing outside a format's own modules names it:
a new format is its exporter module plus one entry here (and a runtime entry if it brings a runtime).

Torch-free: importing this module (or the manifest) does not import torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from ciard_deploy.errors import UsageError
from ciard_deploy.options.export import PRECISIONS, ExportOptions, Precision
from ciard_deploy.registry import Registry
from ciard_deploy.runtime import BACKENDS, BackendEntry
from ciard_deploy.runtime.metadata import sidecar_path

if TYPE_CHECKING:  # pragma: no cover
    from ciard_deploy.export.pipeline import ExportContext

#: the CLI flag that chooses each precision; without a family flag it selects that precision's ONNX file
PRECISION_FLAGS = {"fp32": "--onnx", "fp16": "--fp16", "int8": "--int8"}


@dataclass(frozen=True)
class OptionCase:
    """How a format changes when one export option has one value (``trt_int8="calibrator"``).

    Attributes:
        option: the ExportOptions field.
        value: the value that selects this case.
        needs: the formats it consumes instead (None: unchanged).
        calibrated: whether it then builds from the calibration set (None: unchanged).
    """

    option: str
    value: Any
    needs: tuple[str, ...] | None = None
    calibrated: bool | None = None


@dataclass(frozen=True)
class FormatSpec:
    """One export format (a row of the format table): everything the package asks about a format.

    Attributes:
        name: registry key, e.g. ``"onnx-int8"``.
        format: the file format family recorded in the manifest (``"onnx"``, ``"tensorrt"``).
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        filename: file written in the output folder.
        runtime: backend (``runtime.BACKENDS``) that loads it for the check; it says which execution
            providers and thread settings apply and what must be installed (``check_environment``).
        exporter: ``"module:Class"`` of its Exporter, imported on first use.
        family_flag: the CLI flag that adds this family for each chosen precision (``--tensorrt``);
            None for the ONNX files, chosen by the precision flags alone (``PRECISION_FLAGS``).
        gpu: needs an NVIDIA GPU to build and run (shown in the table).
        needs: formats it consumes (built first).
        options: ExportOptions fields it uses (``max_batch`` among them: a dynamic batch is bounded by
            an optimization profile).
        sidecar: the exporter writes a JSON sidecar ``<file>.json`` beside it (metadata the file cannot hold).
        calibrated: builds from the calibration set.
        cases: how ``needs`` and ``calibrated`` change with an option's value.
        description: one line for the table.
    """

    name: str
    format: str
    precision: Precision
    filename: str
    runtime: str
    exporter: str
    family_flag: str | None = None
    gpu: bool = False
    needs: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    sidecar: bool = False
    calibrated: bool = False
    cases: tuple[OptionCase, ...] = ()
    description: str = ""

    @property
    def flags(self) -> str:
        """The CLI flags that select it (``--tensorrt --fp16``)."""
        precision = PRECISION_FLAGS[self.precision]
        if self.family_flag is None:
            return precision
        return self.family_flag if self.precision == "fp32" else f"{self.family_flag} {precision}"

    @property
    def backend(self) -> BackendEntry:
        """The runtime registry entry of its files."""
        return BACKENDS.get(self.runtime)

    def files(self) -> list[str]:
        """The files the exporter writes for it: the artifact and its sidecar, if any."""
        return [self.filename, *([sidecar_path(self.filename).name] if self.sidecar else [])]

    def _case(self, options: Any) -> OptionCase | None:
        return next((c for c in self.cases if getattr(options, c.option) == c.value), None)

    def needs_for(self, options: Any) -> tuple[str, ...]:
        """The formats it consumes under ``options``."""
        case = self._case(options)
        return case.needs if case is not None and case.needs is not None else self.needs

    def calibrated_for(self, options: Any) -> bool:
        """Whether it builds from the calibration set under ``options``."""
        case = self._case(options)
        return case.calibrated if case is not None and case.calibrated is not None else self.calibrated

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
_TRT = dict(format="tensorrt", runtime="tensorrt", exporter="ciard_deploy.export.tensorrt:TensorRTExporter",
            family_flag="--tensorrt", gpu=True, sidecar=True)
_TRT_OPTS = ("workspace_mb", "min_batch", "opt_batch", "max_batch", "timing_cache")
for _spec in (
    FormatSpec("onnx", "onnx", "fp32", "model.onnx", "onnxruntime", "ciard_deploy.export.onnx:OnnxExporter",
               options=("opset", "batch", "simplify"),
               description="ONNX FP32 (torch.export-based exporter, TorchScript fallback), normalization inside"),
    FormatSpec("onnx-fp16", "onnx", "fp16", "model.fp16.onnx", "onnxruntime", "ciard_deploy.export.onnx:Fp16Exporter",
               needs=("onnx",),
               description="ONNX FP16 weights/compute, float32 input and logits (onnxruntime float16 converter)"),
    FormatSpec("onnx-int8", "onnx", "int8", "model.int8.onnx", "onnxruntime",
               "ciard_deploy.export.quantize:Int8Exporter", needs=("onnx",),
               options=("calib", "calib_n", "calib_method", "calib_attack", "int8_symmetric"), calibrated=True,
               description="ONNX INT8 QDQ, per-channel weights, static calibration (onnxruntime.quantization)"),
    FormatSpec("tensorrt-fp32", precision="fp32", filename="model.fp32.engine", needs=("onnx",), options=_TRT_OPTS,
               description="TensorRT engine, FP32", **_TRT),
    FormatSpec("tensorrt-fp16", precision="fp16", filename="model.fp16.engine", needs=("onnx",), options=_TRT_OPTS,
               description="TensorRT engine, FP16 builder flag", **_TRT),
    FormatSpec("tensorrt-int8", precision="int8", filename="model.int8.engine", needs=("onnx-int8",),
               options=(*_TRT_OPTS, "trt_int8", "calib", "calib_n"),
               cases=(OptionCase("trt_int8", "calibrator", needs=("onnx",), calibrated=True),),
               description="TensorRT engine, INT8 from the QDQ ONNX (or an entropy calibrator with --trt-int8 "
                           "calibrator)", **_TRT),
):
    FORMATS.add(_spec.name, _spec)


def _table_order(spec: FormatSpec) -> tuple[bool, int, str]:
    """ONNX files first (the files every family is built from), then each family; by precision within."""
    return spec.family_flag is not None, PRECISIONS.index(spec.precision), spec.family_flag or ""


def formats_from_flags(**flags: bool) -> list[str]:
    """The formats the CLI flags select (``onnx=True, tensorrt=True``: ``--onnx --tensorrt``).

    ``--fp16``/``--int8`` choose precisions, ``--onnx`` chooses FP32 (``PRECISION_FLAGS``); a family
    flag (``--tensorrt``) adds that family's file for each chosen precision (FP32 when no precision flag
    is given). ONNX files are always written for the chosen precisions: every other family is built from one.
    """
    given = {f"--{k.replace('_', '-')}" for k, on in flags.items() if on}
    specs = sorted((s for _, s in FORMATS.items()), key=_table_order)
    families = {s.family_flag for s in specs if s.family_flag is not None}
    unknown = sorted(given - families - set(PRECISION_FLAGS.values()))
    if unknown:
        raise UsageError(f"unknown format flag(s) {', '.join(unknown)}")
    precisions = [p for p in PRECISIONS if PRECISION_FLAGS[p] in given]
    if not precisions and given & families:
        precisions = ["fp32"]
    return [s.name for s in specs if s.precision in precisions and (s.family_flag is None or s.family_flag in given)]


def resolve_formats(names: Sequence[str], options: ExportOptions | None = None) -> list[str]:
    """Validates format names and adds the formats they consume, in build order."""
    if not names:
        raise UsageError("no format chosen: pass --onnx, --fp16, --int8 and/or --tensorrt "
                         f"(formats: {', '.join(FORMATS.names())})")
    options = options or ExportOptions()
    order: list[str] = []

    def visit(name: str) -> None:
        for dep in FORMATS.get(name).needs_for(options):
            visit(dep)
        if name not in order:
            order.append(name)

    for n in names:
        visit(n)
    return order


def check_environment(names: Sequence[str], provider: str | None = None, where: str = "--provider") -> None:
    """BackendUnavailable (exit 3, one line) before any work when a format's runtime cannot run here
    (TensorRT, Polygraphy or a GPU missing for an engine) or lacks the execution provider ``provider``
    (named ``where`` in the message: ``--provider``, ``deploy.provider``)."""
    entries = list({FORMATS.get(n).runtime: FORMATS.get(n).backend for n in names}.values())
    for entry in entries:
        if entry.require is not None:
            entry.require()
    for entry in entries:
        entry.check_provider(provider, where)


def format_table(status: Callable[[str], str] | None = None) -> list[dict[str, Any]]:
    """Rows of the format table: name, flags, file, precision, runtime, GPU, consumes, options, status."""
    if status is None:
        cache: dict[str, str] = {}

        def status(runtime: str) -> str:
            if runtime not in cache:
                cache[runtime] = BACKENDS.get(runtime).status()
            return cache[runtime]

    return [{"name": s.name, "flags": s.flags, "file": s.filename, "format": s.format, "precision": s.precision,
             "runtime": s.runtime, "gpu": s.gpu, "needs": list(s.needs), "options": list(s.options),
             "status": status(s.runtime), "description": s.description}
            for s in sorted((s for _, s in FORMATS.items()), key=_table_order)]
