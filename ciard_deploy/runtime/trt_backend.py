"""TrtBackend: a serialized TensorRT engine (.engine / .plan), run with Polygraphy's TrtRunner.

TensorRT, Polygraphy and a CUDA device are checked when the backend opens; any of them
missing is a BackendUnavailable (exit 3) with one line saying what to install. Polygraphy's
runner owns the device buffers and stream (no hand-made CUDA buffers here). Torch-free.

Engines are tied to the GPU and the TensorRT version that built them; the JSON sidecar
written by ``ciard export`` records both, and a failed deserialization names them.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ciard_deploy.errors import ArtifactError, BackendUnavailable
from ciard_deploy.runtime.base import SCORES, BaseBackend, InputSpec
from ciard_deploy.runtime.metadata import FileMetadata, check_metadata, read_sidecar, sidecar_path

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'ciard-deploy[tensorrt]' (TensorRT 10 + Polygraphy) on a machine with an NVIDIA GPU"


def import_tensorrt() -> Any:
    """``import tensorrt``, or BackendUnavailable naming what to install."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except Exception as e:  # ImportError, or OSError when libnvinfer is missing
        raise BackendUnavailable(f"TensorRT is not installed here ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    return trt


def import_polygraphy_trt() -> Any:
    try:
        from polygraphy.backend import trt as poly_trt  # type: ignore[import-not-found]
    except Exception as e:
        raise BackendUnavailable(f"Polygraphy is not installed here ({type(e).__name__}: {e}); "
                                 "pip install polygraphy (or 'ciard-deploy[tensorrt]')") from None
    return poly_trt


def cuda_device_count() -> int:
    """CUDA devices visible through the driver API (0 when there is no driver); no torch needed."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll", "libcuda.dylib"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return int(count.value)
    return 0


def cuda_device_info(index: int = 0) -> dict[str, Any] | None:
    """Name and compute capability of a CUDA device via the driver API, or None without one."""
    if cuda_device_count() <= index:
        return None
    lib = next((ctypes.CDLL(n) for n in ("libcuda.so.1", "libcuda.so", "nvcuda.dll") if _loadable(n)), None)
    if lib is None:
        return None
    dev, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    name = ctypes.create_string_buffer(256)
    if lib.cuDeviceGet(ctypes.byref(dev), index) != 0 or lib.cuDeviceGetName(name, 256, dev) != 0:
        return None
    lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
    return {"gpu": name.value.decode(errors="replace"), "compute_capability": f"{major.value}.{minor.value}"}


def _loadable(name: str) -> bool:
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def ensure_tensorrt(need_gpu: bool = True) -> Any:
    """Returns the tensorrt module after checking it, Polygraphy and (optionally) a CUDA device."""
    trt = import_tensorrt()
    if need_gpu and cuda_device_count() == 0:
        raise BackendUnavailable(f"TensorRT {trt.__version__} is installed but no CUDA device is visible "
                                 "(TensorRT engines build and run only on NVIDIA GPUs)")
    return trt


def require_tensorrt() -> None:
    """BackendUnavailable (exit 3, one line) unless TensorRT, Polygraphy and a CUDA device are all here:
    what building or running an engine needs (checked before an export or a workflow does any work)."""
    ensure_tensorrt()
    import_polygraphy_trt()


def tensorrt_status() -> str:
    """``"ok"`` or ``"unavailable: <reason>"``: TensorRT, Polygraphy and a GPU."""
    try:
        require_tensorrt()
    except BackendUnavailable as e:
        return f"unavailable: {e}"
    return "ok"


def file_metadata(path: Path) -> FileMetadata:
    """An engine's ciard metadata, from its JSON sidecar (an engine cannot hold it; ``ciard inspect``)."""
    return FileMetadata("engine", read_sidecar(path), {}, sidecar_path(path))


class TrtBackend(BaseBackend):
    """A TensorRT engine file behind the checked Backend interface.

    Batches larger than the engine's static batch or its optimization profile's maximum are
    split; a short last chunk of a static engine is padded.

    Args:
        path: the ``.engine`` / ``.plan`` file (its ``<file>.json`` sidecar, if present, gives
            precision and metadata).
    """

    name = "tensorrt"
    capabilities = frozenset({SCORES})

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(str(path))
        self._runner: Any = None
        self._engine: Any = None
        self._trt_runtime: Any = None

    def _open(self) -> None:
        path = Path(self.path)  # type: ignore[arg-type]
        if not path.is_file():
            raise ArtifactError(f"engine file not found: {path}")
        trt = ensure_tensorrt()
        poly_trt = import_polygraphy_trt()
        self.metadata = check_metadata(read_sidecar(path), sidecar_path(path))
        self.precision = str(self.metadata.get("precision", "unknown"))
        built = self.metadata.get("engine") or {}
        here = cuda_device_info() or {}
        if built.get("gpu") and here.get("gpu") and built["gpu"] != here["gpu"]:
            log.warning("%s was built on %s, this is %s: engines are tuned per GPU model (rebuild it here)",
                        path.name, built["gpu"], here["gpu"])
        self._trt_runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = self._trt_runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            built = self.metadata.get("engine") or {}
            raise ArtifactError(
                f"TensorRT {trt.__version__} cannot load {path.name} (built with TensorRT "
                f"{built.get('tensorrt_version', '?')} on {built.get('gpu', 'an unknown GPU')}); engines are tied to "
                "their GPU and TensorRT version: rebuild it here with ciard export --tensorrt")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise ArtifactError(f"{path.name} has inputs {inputs} and outputs {outputs}; a ciard classifier has one "
                                "float32 NCHW input and a logits output")
        inp = inputs[0]
        if engine.get_tensor_dtype(inp) != trt.DataType.FLOAT:
            raise ArtifactError(f"{path.name} takes {engine.get_tensor_dtype(inp)}; ciard engines take float32 in [0, 1]")
        shape = tuple(int(v) for v in engine.get_tensor_shape(inp))
        if len(shape) != 4 or min(shape[1:]) <= 0:
            raise ArtifactError(f"{path.name} input {inp} has shape {shape}; expected (batch, C, H, W)")
        if shape[0] < 0:
            _, _, max_shape = engine.get_tensor_profile_shape(inp, 0)
            spec = InputSpec(shape=shape[1:], batch="dynamic", max_batch=int(max_shape[0]), name=inp)  # type: ignore[arg-type]
        else:
            spec = InputSpec(shape=shape[1:], batch=shape[0], name=inp)  # type: ignore[arg-type]
        out_shape = tuple(int(v) for v in engine.get_tensor_shape(outputs[0]))
        if len(out_shape) == 2 and out_shape[1] > 0:
            self.num_classes = out_shape[1]
        self.input_spec = spec
        self._in_name, self._out_name = inp, ("logits" if "logits" in outputs else outputs[0])
        self._engine = engine
        self._runner = poly_trt.TrtRunner(engine)
        self._runner.activate()

    def _close(self) -> None:
        if self._runner is not None:
            self._runner.deactivate()
        self._runner = self._engine = self._trt_runtime = None

    def _predict(self, images: np.ndarray) -> np.ndarray:
        out = self._runner.infer(feed_dict={self._in_name: images})
        return np.array(out[self._out_name], dtype=np.float32, copy=True)
