"""Export a student to ONNX (FP32, FP16, INT8 QDQ) and TensorRT engines, each checked by running it.

    from ciard_deploy import export
    result = export.run("runs/digits", "exports/digits", ["onnx", "onnx-fp16", "onnx-int8"], calib="mixed")
    result.manifest.artifact("model.int8.onnx").parity["clean"]["top1_agreement"]

Importing this package does not import torch (the manifest and format table are read on
devices); ``run`` imports it when called.
"""

from __future__ import annotations

from ciard_deploy._lazy import callable_package
from ciard_deploy.export.base import FORMATS, Exporter, FormatSpec, format_table, formats_from_flags, resolve_formats
from ciard_deploy.export.manifest import MANIFEST_NAME, ArtifactRecord, Manifest, check_files, load_manifest
from ciard_deploy.export.parity_gate import ParityResult, compare_logits
from ciard_deploy.export.pipeline import ExportResult, run
from ciard_deploy.options.export import ExportOptions


__all__ = ["FORMATS", "MANIFEST_NAME", "ArtifactRecord", "ExportOptions", "ExportResult", "Exporter", "FormatSpec", "Manifest",
           "ParityResult", "check_files", "compare_logits", "format_table", "formats_from_flags", "load_manifest",
           "resolve_formats", "run"]

# `ciard_deploy.export(...)` runs the Python API verb `ciard_deploy.api.export` (loaded on the first call)
callable_package(__name__, "ciard_deploy.api:export")
