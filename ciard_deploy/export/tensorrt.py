"""TensorRT engines built from the exported ONNX files with TensorRT's Python API (TensorRT 10).

- FP32: the FP32 ONNX, no precision flag.
- FP16: the FP32 ONNX with ``BuilderFlag.FP16`` (TensorRT picks FP16 kernels where they are faster).
- INT8: by default the INT8 QDQ ONNX (explicit quantization: the scales come from onnxruntime's
  calibration, so the ONNX and the engine are quantized alike); with ``trt_int8="calibrator"``
  the FP32 ONNX and an ``IInt8EntropyCalibrator2`` (Polygraphy's ``Calibrator``, which owns the
  device buffers) fed the same calibration set, with a calibration cache beside the engine.

A dynamic batch gets one optimization profile (min/opt/max batch). The builder gets a
workspace limit and a timing cache (reused across builds on the same GPU and TensorRT
version). Engines only run on the GPU model and TensorRT version that built them: both go
into the JSON sidecar (``model.fp16.engine.json``) and the manifest.

Everything here needs ``tensorrt`` (and a CUDA device); without them the exporter raises
BackendUnavailable (exit 3) before anything is written. This path is not exercised on
machines without a GPU: see tests/gpu/test_tensorrt.py.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ciard_deploy.errors import ArtifactError
from ciard_deploy.export.base import FormatSpec
from ciard_deploy.io import atomic_path
from ciard_deploy.runtime.metadata import sidecar_path
from ciard_deploy.runtime.trt_backend import cuda_device_info, ensure_tensorrt, import_polygraphy_trt

if TYPE_CHECKING:  # pragma: no cover
    from ciard_deploy.export.pipeline import ExportContext

log = logging.getLogger(__name__)


def default_timing_cache(trt_version: str, gpu: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in f"{gpu}-trt{trt_version}")
    return Path(os.environ.get("CIARD_CACHE", Path.home() / ".cache" / "ciard")) / "tensorrt" / f"timing-{safe}.cache"


def _calibration_batches(images: np.ndarray, batch: int | str, opt_batch: int, input_name: str) -> list[dict[str, Any]]:
    """Feed dicts for the calibrator: fixed-size chunks (the static batch, or the profile's opt batch)."""
    size = int(batch) if batch != "dynamic" else opt_batch
    usable = len(images) - len(images) % size if len(images) >= size else 0
    if usable == 0:
        raise ArtifactError(f"the calibration set ({len(images)} images) is smaller than one calibration batch "
                            f"({size}); raise --calib-n")
    return [{input_name: np.ascontiguousarray(images[i:i + size])} for i in range(0, usable, size)]


def build_engine(onnx_path: Path, precision: str, input_shape: tuple[int, int, int], batch: int | str = "dynamic",
                 workspace_mb: int = 1024, min_batch: int = 1, opt_batch: int = 32, max_batch: int = 256,
                 timing_cache: Path | None = None, calib_images: np.ndarray | None = None,
                 calib_cache: Path | None = None,
                 warn: Callable[[str], None] = log.warning) -> tuple[bytes, dict[str, Any]]:
    """Builds a serialized engine from an ONNX file.

    Args:
        onnx_path: the ONNX file (FP32, or INT8 QDQ for explicit quantization).
        precision: ``fp32``, ``fp16`` or ``int8``.
        input_shape: (C, H, W).
        batch: ``"dynamic"`` (one optimization profile) or the fixed batch of the ONNX graph.
        workspace_mb: builder workspace memory pool limit.
        min_batch, opt_batch, max_batch: the profile for a dynamic batch.
        timing_cache: file to read/update (None: the default under $CIARD_CACHE).
        calib_images: for INT8 without QDQ: implicit quantization with an entropy calibrator.
        calib_cache: the calibrator's cache file.

    Returns:
        (engine bytes, engine details for the sidecar and manifest).
    """
    trt = ensure_tensorrt()
    device = cuda_device_info() or {"gpu": "unknown", "compute_capability": "unknown"}
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    flags = []
    if precision == "fp16":
        if not builder.platform_has_fast_fp16:
            warn(f"{device['gpu']} has no fast FP16: the FP16 engine may be no faster than FP32")
        config.set_flag(trt.BuilderFlag.FP16)
        flags.append("FP16")
    if precision == "int8":
        if not builder.platform_has_fast_int8:
            warn(f"{device['gpu']} has no fast INT8: the INT8 engine may be no faster than FP32")
        config.set_flag(trt.BuilderFlag.INT8)
        flags.append("INT8")

    inp = network.get_input(0)
    profile_info = None
    profile = None
    if batch == "dynamic":
        profile = builder.create_optimization_profile()
        shapes = [(b, *input_shape) for b in (min_batch, opt_batch, max_batch)]
        profile.set_shape(inp.name, *shapes)
        config.add_optimization_profile(profile)
        profile_info = {"input": inp.name, "min": list(shapes[0]), "opt": list(shapes[1]), "max": list(shapes[2])}

    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(trt.__version__, device["gpu"])
    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)

    calibrator = None
    int8_mode = None
    if precision == "int8":
        int8_mode = "explicit (QDQ)" if calib_images is None else "implicit (IInt8EntropyCalibrator2)"
        if calib_images is not None:
            poly_trt = import_polygraphy_trt()
            calibrator = poly_trt.Calibrator(_calibration_batches(calib_images, batch, opt_batch, inp.name),
                                             cache=str(calib_cache) if calib_cache else None,
                                             BaseClass=trt.IInt8EntropyCalibrator2)
            config.int8_calibrator = calibrator
            if profile is not None:
                config.set_calibration_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if calibrator is not None:
        calibrator.free()
    if serialized is None:
        raise ArtifactError(f"TensorRT {trt.__version__} could not build a {precision} engine from {onnx_path.name} "
                            "(see the TensorRT log above)")
    try:
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    except OSError as e:
        warn(f"could not update the TensorRT timing cache {cache_path}: {e}")
    info = {"tensorrt_version": trt.__version__, **device, "precision": precision, "builder_flags": flags,
            "int8": int8_mode, "profile": profile_info, "static_batch": None if batch == "dynamic" else int(batch),
            "workspace_mb": int(workspace_mb), "timing_cache": str(cache_path),
            "calibration_cache": Path(calib_cache).name if calib_cache and calibrator is not None else None,
            "built_from": onnx_path.name}
    return bytes(serialized), info


class TensorRTExporter:
    """One TensorRT engine (precision from the format) from an exported ONNX file, plus its sidecar."""

    def __init__(self, spec: FormatSpec) -> None:
        self.spec = spec

    def export(self, ctx: "ExportContext", dest: Path) -> dict[str, Any]:
        o = ctx.options
        precision = self.spec.precision
        (source,) = self.spec.needs_for(o)  # the ONNX file it is built from (the table says which)
        src = ctx.path_of(source)
        calib_images = calibration = calib_cache = None
        if self.spec.calibrated_for(o):  # INT8 from the FP32 ONNX with an entropy calibrator
            calib_images, calibration = ctx.calibration()
            calibration = {**calibration, "method": "tensorrt entropy (IInt8EntropyCalibrator2)"}
            calib_cache = dest.with_name(dest.name + ".calib.cache")
        elif precision == "int8":  # explicit quantization: the QDQ ONNX's scales
            calibration = ctx.record_of(source).get("calibration")
        data, engine = build_engine(src, precision, ctx.input_shape, o.batch, o.workspace_mb, o.min_batch, o.opt_batch,
                                    o.max_batch, Path(o.timing_cache) if o.timing_cache else None, calib_images,
                                    calib_cache, ctx.warn)
        dest.write_bytes(data)
        meta = ctx.artifact_metadata(self.spec, None, calibration=calibration, engine=engine)
        side = sidecar_path(dest)
        side.write_text(json.dumps(meta, indent=2) + "\n")
        extra = [side.name] + ([calib_cache.name] if calib_cache is not None and calib_cache.exists() else [])
        return {"exporter": {"tool": f"tensorrt {engine['tensorrt_version']} Python API"}, "derived_from": src.name,
                "engine": engine, "sidecar": side.name, "calibration": calibration, "extra_files": extra}
