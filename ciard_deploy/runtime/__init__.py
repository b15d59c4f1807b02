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

from ciard_deploy.errors import ArtifactError, BackendUnavailable, UsageError
from ciard_deploy.registry import Registry
from ciard_deploy.runtime import ort_backend, torch_backend, trt_backend
from ciard_deploy.runtime.base import GRADIENTS, SCORES, Backend, BaseBackend, InferenceStats, InputSpec
from ciard_deploy.runtime.metadata import FileMetadata


@dataclass(frozen=True)
class BackendEntry:
    """One runtime in the registry: everything the rest of the package asks about it.

    Attributes:
        name: ``"onnxruntime"``, ``"tensorrt"``, ``"torch"``.
        suffixes: file suffixes it opens.
        target: ``"module:Class"``, imported on first use.
        status: returns ``"ok"`` or ``"unavailable: <reason>"`` without raising.
        capabilities: what it gives attacks.
        what: its files, in words (``"a TensorRT engine"``), for messages.
        provider_keyword: the keyword of its backend that ``open_backend``'s ``provider`` goes to
            (``"provider"``: an execution provider, ``"device"``: a torch device); None: it takes none.
        providers: its execution providers (``--provider`` values), the default first; empty: none.
        provider_status: ``"ok"`` or ``"unavailable: <reason>"`` for one of ``providers``.
        threads: its backend takes an intra-op thread count (``threads=``).
        require: raises BackendUnavailable (exit 3, one line) when it cannot run here at all; called
            before an export or a workflow that makes its files does any work. None: checked on open.
        read_metadata: reads the ciard metadata one of its files carries, wherever it lives (inside the
            file or in a sidecar), without the runtime itself; None: its files carry none (not inspectable).
    """

    name: str
    suffixes: tuple[str, ...]
    target: str
    status: Callable[[], str]
    capabilities: frozenset[str]
    what: str
    provider_keyword: str | None = None
    providers: tuple[str, ...] = ()
    provider_status: Callable[[str], str] | None = None
    threads: bool = False
    require: Callable[[], None] | None = None
    read_metadata: Callable[[Path], FileMetadata] | None = None

    def load(self) -> type[BaseBackend]:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def provider_for(self, provider: str | None) -> str | None:
        """``provider`` where this runtime has execution providers, else None (an engine runs on its GPU)."""
        return provider if self.providers else None

    def open_options(self, provider: str | None = None, threads: int | None = None) -> dict[str, Any]:
        """The keywords for ``open_backend`` of one of its files: the provider and threads where they apply."""
        return {"provider": self.provider_for(provider), **self.thread_options(threads)}

    def thread_options(self, threads: int | None) -> dict[str, Any]:
        """``{"threads": threads}`` where its backend takes a thread count and one is given, else {}."""
        return {"threads": threads} if threads and self.threads else {}

    def check_provider(self, provider: str | None, where: str = "--provider") -> None:
        """BackendUnavailable (exit 3) when ``provider`` (not the default) is one this machine lacks."""
        if not self.providers or provider in (None, self.providers[0]) or self.provider_status is None:
            return
        status = self.provider_status(provider)
        if status != "ok":
            raise BackendUnavailable(f"{where} {provider}: {status.removeprefix('unavailable: ')}")


BACKENDS: Registry[BackendEntry] = Registry("runtime backend")
BACKENDS.add("onnxruntime", BackendEntry(
    "onnxruntime", (".onnx",), "ciard_deploy.runtime.ort_backend:OrtBackend", ort_backend.runtime_status,
    frozenset({SCORES}), "an ONNX file", provider_keyword="provider", providers=tuple(ort_backend.PROVIDERS),
    provider_status=ort_backend.provider_status, threads=True, read_metadata=ort_backend.file_metadata))
BACKENDS.add("tensorrt", BackendEntry(
    "tensorrt", (".engine", ".plan"), "ciard_deploy.runtime.trt_backend:TrtBackend", trt_backend.tensorrt_status,
    frozenset({SCORES}), "a TensorRT engine", require=trt_backend.require_tensorrt,
    read_metadata=trt_backend.file_metadata))
BACKENDS.add("torch", BackendEntry(
    "torch", (".safetensors", ".pt", ".pth"), "ciard_deploy.runtime.torch_backend:TorchBackend",
    torch_backend.torch_status, frozenset({SCORES, GRADIENTS}), "a PyTorch checkpoint", provider_keyword="device"))


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
    if entry.provider_keyword is not None:
        options = {entry.provider_keyword: provider, **options}
    elif provider not in (None, entry.name):
        raise UsageError(f"--provider {provider} does not apply to {entry.what} ({p.name})")
    return cls(p, **options).open()  # type: ignore[call-arg]


def available_backends() -> dict[str, str]:
    """Runtime name -> ``"ok"`` or ``"unavailable: <reason>"`` (for ``ciard doctor``).

    Besides the backends, reports each runtime's execution providers other than its default
    (``onnxruntime-cuda``, ``onnxruntime-tensorrt``) where the runtime itself is there.
    """
    out = {name: entry.status() for name, entry in BACKENDS.items()}
    for name, entry in BACKENDS.items():
        if out[name] == "ok" and entry.provider_status is not None:
            out.update({f"{name}-{p}": entry.provider_status(p) for p in entry.providers[1:]})
    return out


__all__ = ["BACKENDS", "Backend", "BackendEntry", "BaseBackend", "GRADIENTS", "InferenceStats", "InputSpec", "SCORES",
           "available_backends", "backend_for", "open_backend"]
