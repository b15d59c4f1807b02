"""OrtBackend: an ONNX file in onnxruntime, on the CPU, CUDA or TensorRT execution provider.

Torch-free. onnxruntime is imported when the backend opens, so a missing install is a
BackendUnavailable (exit 3) naming the package to install, not an ImportError.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ciard_deploy.errors import ArtifactError, BackendUnavailable, UsageError
from ciard_deploy.runtime.base import SCORES, BaseBackend, InputSpec
from ciard_deploy.runtime.metadata import PREFIX, FileMetadata, check_metadata, decode_metadata

log = logging.getLogger(__name__)

#: --provider value -> onnxruntime provider name and the pip package that brings it
PROVIDERS = {
    "cpu": ("CPUExecutionProvider", "onnxruntime"),
    "cuda": ("CUDAExecutionProvider", "onnxruntime-gpu (with CUDA 12 and cuDNN 9)"),
    "tensorrt": ("TensorrtExecutionProvider", "onnxruntime-gpu built with TensorRT, plus TensorRT 10"),
}


def import_onnxruntime() -> Any:
    try:
        import onnxruntime as ort
    except Exception as e:  # ImportError, or OSError from a broken native library
        raise BackendUnavailable(f"onnxruntime is not usable here ({type(e).__name__}: {e}); "
                                 "pip install onnxruntime (or onnxruntime-gpu)") from None
    return ort


def provider_status(provider: str) -> str:
    """``"ok"`` or ``"unavailable: <reason>"`` for a --provider value."""
    try:
        ort = import_onnxruntime()
    except BackendUnavailable as e:
        return f"unavailable: {e}"
    name, package = PROVIDERS[provider]
    have = ort.get_available_providers()
    if name in have:
        return "ok"
    return f"unavailable: onnxruntime {ort.__version__} here has no {name} (has {', '.join(have)}); install {package}"


def runtime_status() -> str:
    """``"ok"`` or ``"unavailable: <reason>"`` for onnxruntime itself (its default, CPU provider)."""
    return provider_status("cpu")


def read_onnx_metadata(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(decoded ciard metadata, all raw metadata_props) of an ONNX file, without loading weights."""
    p = Path(path)
    try:
        import onnx

        model = onnx.load(str(p), load_external_data=False)
        raw = {e.key: e.value for e in model.metadata_props}
    except ImportError:  # a device without the onnx package: onnxruntime reads it too

        ort = import_onnxruntime()
        try:
            sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ArtifactError(f"cannot read {p.name}: {str(e).splitlines()[0]}") from None
        raw = dict(sess.get_modelmeta().custom_metadata_map)
    except Exception as e:  # DecodeError for truncated/corrupt files
        raise ArtifactError(f"cannot read {p.name} as ONNX: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                            " (truncated or corrupt?)") from None
    return decode_metadata(raw), raw


def file_metadata(path: Path) -> FileMetadata:
    """An ONNX file's ciard metadata and its other metadata_props (``ciard inspect``)."""
    meta, raw = read_onnx_metadata(path)
    return FileMetadata("onnx", meta, {k: v for k, v in raw.items() if not k.startswith(PREFIX)}, path)


def cache_dir() -> Path:
    return Path(os.environ.get("CIARD_CACHE", Path.home() / ".cache" / "ciard"))


class OrtBackend(BaseBackend):
    """An ONNX model in an onnxruntime InferenceSession.

    Args:
        path: the .onnx file.
        provider: ``"cpu"`` (default), ``"cuda"`` or ``"tensorrt"`` (TensorRT EP, engines cached
            under ``$CIARD_CACHE/ort-trt``); CUDA/CPU stay as fallbacks for unsupported nodes.
        threads: intra-op threads (default: onnxruntime's choice).

    Example:
        >>> with OrtBackend("model.onnx") as b:  # doctest: +SKIP
        ...     logits = b.predict(images)
    """

    name = "onnxruntime"
    capabilities = frozenset({SCORES})

    def __init__(self, path: str | os.PathLike, provider: str | None = None, threads: int | None = None) -> None:
        super().__init__(str(path))
        self.provider = (provider or "cpu").lower()
        if self.provider not in PROVIDERS:
            raise UsageError(f"unknown --provider {provider!r} for an ONNX file: use {', '.join(PROVIDERS)}")
        self.threads = threads
        self._sess: Any = None

    def _providers(self, precision: str) -> list[Any]:
        if self.provider == "cpu":
            return ["CPUExecutionProvider"]
        if self.provider == "cuda":
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        trt_cache = cache_dir() / "ort-trt"
        trt_cache.mkdir(parents=True, exist_ok=True)
        opts = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(trt_cache),
                "trt_timing_cache_enable": True, "trt_timing_cache_path": str(trt_cache),
                "trt_fp16_enable": precision == "fp16", "trt_int8_enable": precision == "int8"}
        return [("TensorrtExecutionProvider", opts), "CUDAExecutionProvider", "CPUExecutionProvider"]

    def _open(self) -> None:
        ort = import_onnxruntime()
        path = Path(self.path)  # type: ignore[arg-type]
        if not path.is_file():
            raise ArtifactError(f"ONNX file not found: {path}")
        status = provider_status(self.provider)
        if status != "ok":
            raise BackendUnavailable(f"--provider {self.provider}: {status.removeprefix('unavailable: ')}")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
        # a CPU session first: it reads the metadata (the precision sets the TensorRT EP's flags)
        try:
            sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
            self.metadata = decode_metadata(sess.get_modelmeta().custom_metadata_map)
            self.precision = str(self.metadata.get("precision", "unknown"))
            if self.provider != "cpu":
                sess = ort.InferenceSession(str(path), sess_options=so, providers=self._providers(self.precision))
        except BackendUnavailable:
            raise
        except Exception as e:  # InvalidProtobuf, InvalidGraph, NoSuchFile, Fail ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"cannot load {path.name} in onnxruntime: {first} "
                                "(truncated or corrupt file? re-export it)") from None
        self.metadata = check_metadata(self.metadata, path)  # outside the try: its own one line, not "cannot load"
        wanted = PROVIDERS[self.provider][0]
        active = sess.get_providers()
        if not active or active[0] != wanted:
            raise BackendUnavailable(f"--provider {self.provider}: onnxruntime could not start {wanted} "
                                     f"(active: {', '.join(active)}); check the CUDA/TensorRT libraries")
        inputs, outputs = sess.get_inputs(), sess.get_outputs()
        if len(inputs) != 1:
            raise ArtifactError(f"{path.name} has {len(inputs)} inputs; a ciard classifier has one (float32 NCHW)")
        inp = inputs[0]
        if inp.type != "tensor(float)":
            raise ArtifactError(f"{path.name} takes {inp.type}; ciard artifacts take float32 images in [0, 1]")
        dims = list(inp.shape)
        if len(dims) != 4 or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
            raise ArtifactError(f"{path.name} input {inp.name} has shape {dims}; expected (batch, C, H, W)")
        batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else "dynamic"
        self.input_spec = InputSpec(shape=tuple(dims[1:]), batch=batch, name=inp.name)  # type: ignore[arg-type]
        out_dims = outputs[0].shape
        if len(out_dims) == 2 and isinstance(out_dims[1], int):
            self.num_classes = int(out_dims[1])
            declared = self.metadata.get("num_classes")
            if declared is not None and declared != self.num_classes:
                raise ArtifactError(f"{path}: its metadata says ciard.num_classes {declared}, but its output "
                                    f"{outputs[0].name} has {self.num_classes} classes (edited or mislabelled file)")
        self._in_name, self._out_name = inp.name, outputs[0].name
        self._sess = sess
        self.active_providers = active

    def _close(self) -> None:
        self._sess = None

    def _predict(self, images: np.ndarray) -> np.ndarray:
        return self._sess.run([self._out_name], {self._in_name: images})[0]

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["provider"] = self.provider
        d["active_providers"] = getattr(self, "active_providers", None)
        return d
