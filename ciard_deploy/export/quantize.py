"""INT8 QDQ ONNX with onnxruntime's static quantization, and the calibration set it needs.

QDQ is also TensorRT's explicit-quantization format, so ``model.int8.onnx`` feeds the INT8
engine. Weights are quantized per channel; activations use symmetric ranges by default
(zero point 0, which TensorRT requires). The calibration images come from the training
split: ``clean``, ``adversarial`` (PGD against the FP32 student) or ``mixed`` (every other
image adversarial). Whether a robust model should be calibrated on adversarial inputs is
an open question, so it is a choice, recorded in the manifest with the sha256 of the set,
and measured by ``tools/bench_export.py``.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ciard_deploy.attacks.base import create_attack
from ciard_deploy.errors import ArtifactError, UsageError
from ciard_deploy.export.base import FormatSpec
from ciard_deploy.export.onnx import first_line, save_onnx
from ciard_deploy.fingerprint import float32_sha256
from ciard_deploy.runtime.base import INPUT_NAME

if TYPE_CHECKING:  # pragma: no cover
    from ciard_deploy.export.pipeline import ExportContext

log = logging.getLogger(__name__)


def build_calibration_set(model: Any, dataset: str, source: str = "clean", n: int = 512, seed: int = 0,
                          eps: float | None = None, attack: str = "pgd20", data_root: str | None = None,
                          batch_size: int = 256) -> tuple[np.ndarray, dict[str, Any]]:
    """Calibration images (float32 NCHW in [0, 1]) from the training split, and their description.

    Args:
        model: the FP32 PyTorch student (the adversarial images are crafted against it).
        dataset: registered dataset name.
        source: ``clean``, ``adversarial`` or ``mixed`` (odd positions adversarial).
        n: images (seeded, class-stratified sample).
        seed: sample and attack seed.
        eps: L-inf budget of the attack (required unless ``source == "clean"``).
        attack: attack spec, e.g. ``pgd20``.
        data_root: the dataset's folder.
    """
    from ciard_deploy.data import create_dataset  # imports torch: `import export` stays torch-free

    ds = create_dataset(dataset, "train", root=data_root, n=n, seed=seed)
    x, y = ds.tensors()
    x = x.clone()
    info: dict[str, Any] = {"source": source, "dataset": dataset, "split": "train", "n": len(x), "seed": seed,
                            "sampling": "class-stratified", "attack": None, "adversarial_fraction": 0.0}
    if source in ("adversarial", "mixed"):
        if eps is None:
            raise UsageError(f"--calib {source} needs an eps: the checkpoint has none, pass --eps")
        atk = create_attack(attack, eps, seed=seed)
        idx = np.arange(len(x)) if source == "adversarial" else np.arange(1, len(x), 2)
        for start in range(0, len(idx), batch_size):
            sel = idx[start:start + batch_size]
            x[sel] = atk.run(model, x[sel], y[sel])
        info.update(attack=atk.label, attack_settings=atk.describe(), adversarial_fraction=len(idx) / max(len(x), 1))
    arr = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    info["sha256"] = float32_sha256(arr)
    info["sha256_of"] = "float32 NCHW image array bytes, C order"
    return arr, info


class ArrayReader:
    """onnxruntime CalibrationDataReader over an in-memory array, in batches."""

    def __init__(self, images: np.ndarray, input_name: str = INPUT_NAME, batch_size: int = 64) -> None:
        self.images, self.input_name, self.batch_size = images, input_name, batch_size
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self.images):
            return None
        batch = self.images[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._pos = 0


def quantize_qdq(src: Path, dest: Path, images: np.ndarray, method: str = "minmax", symmetric: bool = True,
                 batch_size: int = 64) -> dict[str, Any]:
    """Static INT8 QDQ quantization of ``src`` into ``dest`` (pre-processing first); returns settings."""
    from onnxruntime import __version__ as ort_version
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}

    class _Reader(ArrayReader, CalibrationDataReader):
        pass

    pre = dest.parent / f".{dest.name}.pre.onnx"
    settings: dict[str, Any] = {"tool": f"onnxruntime.quantization (onnxruntime {ort_version})", "format": "QDQ",
                                "weights": "int8 per-channel, symmetric", "activations": "int8 " +
                                ("symmetric" if symmetric else "asymmetric"), "method": method,
                                "pre_processed": True}
    try:
        quant_pre_process(str(src), str(pre))
        model_in = pre
    except OSError:  # a full disk, a read-only folder: not a graph problem (exit 2 naming the file)
        pre.unlink(missing_ok=True)
        raise
    except Exception as e:  # pre-processing is an optimization: quantize the raw graph if it fails
        log.warning("onnxruntime quant_pre_process failed (%s); quantizing the graph as exported", first_line(e))
        settings["pre_processed"] = False
        model_in = src
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print progress lines
            quantize_static(str(model_in), str(dest), _Reader(images, batch_size=batch_size),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                            weight_type=QuantType.QInt8, calibrate_method=methods[method],
                            extra_options={"ActivationSymmetric": bool(symmetric), "WeightSymmetric": True})
    except OSError:  # ENOSPC, EACCES, ...: the file system's failure, not quantization's (exit 2 naming the file)
        raise
    except Exception as e:
        raise ArtifactError(f"INT8 quantization failed: {first_line(e)}") from None
    finally:
        pre.unlink(missing_ok=True)
    return settings


class Int8Exporter:
    """INT8 QDQ ONNX from the FP32 ONNX, calibrated on the chosen calibration set."""

    def __init__(self, spec: FormatSpec) -> None:
        self.spec = spec

    def export(self, ctx: "ExportContext", dest: Path) -> dict[str, Any]:
        import onnx

        o = ctx.options
        src = ctx.path_of("onnx")
        images, calib = ctx.calibration()
        raw = dest.parent / f".{dest.name}.raw.onnx"
        settings = quantize_qdq(src, raw, images, o.calib_method, o.int8_symmetric)
        calibration = {**calib, "method": o.calib_method, "symmetric_activations": o.int8_symmetric}
        proto = onnx.load(str(raw))
        raw.unlink(missing_ok=True)
        meta = ctx.artifact_metadata(self.spec, o.opset, calibration=calibration)
        info = save_onnx(proto, dest, meta, o.opset)
        return {"exporter": settings, "derived_from": src.name, "calibration": calibration, **info}
