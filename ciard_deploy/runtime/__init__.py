"""Runtime backends: one protocol, chosen by file type.

    with open_backend("export/model.int8.onnx") as backend:     # onnxruntime, CPU
        logits = backend.predict(images)                        # float32 NCHW in [0, 1]
    open_backend("model.fp16.engine")                           # TensorRT (GPU)
    open_backend("runs/digits", provider="cuda")                # the PyTorch reference

Nothing here imports torch at module level: opening an ONNX file or an engine works on a
device that has only numpy and the runtime. A runtime that is not installed shows as
``"unavailable: <reason>"`` in ``available_backends()`` and opening it is a
BackendUnavailable (exit 3) with one line.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ciard_deploy.errors import ArtifactError, UsageError
from ciard_deploy.registry import Registry
from ciard_deploy.runtime.base import GRADIENTS, SCORES, Backend, BaseBackend, InferenceStats, InputSpec


@dataclass(frozen=True)
class BackendEntry:
    """One runtime in the registry.

    Attributes:
        name: ``"onnxruntime"``, ``"tensorrt"``, ``"torch"``.
        suffixes: file suffixes it opens.
        target: ``"module:Class"``, imported on first use.
        status: returns ``"ok"`` or ``"unavailable: <reason>"`` without raising.
        capabilities: what it gives attacks.
    """

    name: str
    suffixes: tuple[str, ...]
    target: str
    status: Callable[[], str]
    capabilities: frozenset[str]

    def load(self) -> type[BaseBackend]:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


def _torch_status() -> str:
    try:
        import torch  # noqa: F401
    except Exception as e:
        return f"unavailable: {type(e).__name__}: {e} (pip install 'ciard-deploy[train]')"
    return "ok"


def _ort_status() -> str:
    from ciard_deploy.runtime.ort_backend import provider_status

    return provider_status("cpu")


def _trt_status() -> str:
    from ciard_deploy.runtime.trt_backend import tensorrt_status

    return tensorrt_status()


BACKENDS: Registry[BackendEntry] = Registry("runtime backend")
BACKENDS.add("onnxruntime", BackendEntry("onnxruntime", (".onnx",), "ciard_deploy.runtime.ort_backend:OrtBackend",
                                         _ort_status, frozenset({SCORES})))
BACKENDS.add("tensorrt", BackendEntry("tensorrt", (".engine", ".plan"), "ciard_deploy.runtime.trt_backend:TrtBackend",
                                      _trt_status, frozenset({SCORES})))
BACKENDS.add("torch", BackendEntry("torch", (".safetensors", ".pt", ".pth"),
                                   "ciard_deploy.runtime.torch_backend:TorchBackend", _torch_status,
                                   frozenset({SCORES, GRADIENTS})))


def backend_for(path: str | os.PathLike) -> BackendEntry:
    """The registry entry that opens ``path``, chosen by suffix (a folder is a run dir: torch)."""
    p = Path(path)
    if p.is_dir():
        return BACKENDS.get("torch")
    suffix = p.suffix.lower()
    for _, entry in BACKENDS.items():
        if suffix in entry.suffixes:
            return entry
    known = ", ".join(s for _, e in BACKENDS.items() for s in e.suffixes)
    raise UsageError(f"cannot tell which runtime opens {p.name!r}: expected one of {known} or a run dir")


def open_backend(path: str | os.PathLike, provider: str | None = None, **options: Any) -> BaseBackend:
    """Opens an artifact in its runtime and returns the (already open) backend.

    Args:
        path: ``.onnx`` (onnxruntime), ``.engine``/``.plan`` (TensorRT), ``.safetensors``/``.pt``/
            ``.pth`` or a run dir (PyTorch).
        provider: for ONNX files ``cpu`` (default), ``cuda`` or ``tensorrt`` (execution provider);
            for PyTorch the device (``cpu``, ``cuda``, ``auto``); not used by engines.
        **options: passed to the backend (``threads`` for onnxruntime).

    Raises:
        ArtifactError: the file is missing or corrupt (exit 2).
        UsageError: unknown suffix or provider (exit 2).
        BackendUnavailable: the runtime is not installed or has no device (exit 3).
    """
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"artifact not found: {p}")
    entry = backend_for(p)
    cls = entry.load()
    if entry.name == "onnxruntime":
        backend = cls(p, provider=provider, **options)  # type: ignore[call-arg]
    elif entry.name == "torch":
        backend = cls(p, device=provider, **options)  # type: ignore[call-arg]
    else:
        if provider not in (None, "tensorrt"):
            raise UsageError(f"--provider {provider} does not apply to a TensorRT engine ({p.name})")
        backend = cls(p, **options)  # type: ignore[call-arg]
    return backend.open()


def available_backends() -> dict[str, str]:
    """Runtime name -> ``"ok"`` or ``"unavailable: <reason>"`` (for ``ciard doctor``).

    Besides the three backends, reports onnxruntime's CUDA and TensorRT execution providers.
    """
    from ciard_deploy.runtime.ort_backend import provider_status

    out = {name: entry.status() for name, entry in BACKENDS.items()}
    if out["onnxruntime"] == "ok":
        out["onnxruntime-cuda"] = provider_status("cuda")
        out["onnxruntime-tensorrt"] = provider_status("tensorrt")
    return out


__all__ = ["BACKENDS", "Backend", "BackendEntry", "BaseBackend", "GRADIENTS", "InferenceStats", "InputSpec", "SCORES",
           "available_backends", "backend_for", "open_backend"]
