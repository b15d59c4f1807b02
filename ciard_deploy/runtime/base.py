"""The Backend protocol and the checked base class every runtime builds on.

A backend turns float32 NCHW images in [0, 1] into logits. The public ``predict`` validates
dtype, shape and range once, splits the batch into chunks the runtime accepts (a static
engine batch, a profile's maximum), pads the last chunk of a static batch, calls the
``_predict`` hook per chunk and records the time spent (Polygraphy ``BaseRunner``).

This module imports no torch: it runs on a device that has only numpy and a runtime.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from ciard_deploy.errors import ArtifactError, UsageError

#: What a backend can give an attack (the same strings as ``ciard_deploy.attacks.base``).
SCORES = "scores"
GRADIENTS = "gradients"

Precision = Literal["fp32", "fp16", "int8", "unknown"]
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class InputSpec:
    """What a model takes: ``(batch, C, H, W)`` float32 in [0, 1], batch ``"dynamic"`` or fixed.

    Attributes:
        shape: (C, H, W) of one image.
        batch: ``"dynamic"`` or the fixed batch size of a static graph/engine.
        max_batch: largest batch the runtime accepts at once (a TensorRT profile's max), or None.
        name: the graph's input name.
    """

    shape: tuple[int, int, int]
    batch: int | Literal["dynamic"] = "dynamic"
    max_batch: int | None = None
    name: str = INPUT_NAME
    dtype: str = "float32"
    range: tuple[float, float] = (0.0, 1.0)
    layout: str = "NCHW"

    @property
    def static_batch(self) -> int | None:
        return None if self.batch == "dynamic" else int(self.batch)

    def chunk_size(self, requested: int | None = None) -> int | None:
        """How many images one ``_predict`` call may take (None: any number)."""
        if self.static_batch is not None:
            return self.static_batch
        limits = [v for v in (requested, self.max_batch) if v]
        return min(limits) if limits else None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "shape": [self.batch, *self.shape], "batch": self.batch,
                             "dtype": self.dtype, "range": list(self.range), "layout": self.layout}
        if self.max_batch is not None:
            d["max_batch"] = self.max_batch
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InputSpec":
        shape = tuple(int(v) for v in d["shape"][1:])
        batch = d.get("batch", d["shape"][0])
        batch = "dynamic" if batch in ("dynamic", None, -1) or isinstance(batch, str) else int(batch)
        return cls(shape=shape, batch=batch, max_batch=d.get("max_batch"), name=d.get("name", INPUT_NAME),  # type: ignore[arg-type]
                   dtype=d.get("dtype", "float32"), range=tuple(d.get("range", (0.0, 1.0))),  # type: ignore[arg-type]
                   layout=d.get("layout", "NCHW"))


@dataclass
class InferenceStats:
    """Time spent in the runtime (validation excluded), for reports and benchmarks."""

    images: int = 0
    calls: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "calls": self.calls, "seconds": round(self.seconds, 6),
                "images_per_second": round(self.images_per_second, 1)}


@runtime_checkable
class Backend(Protocol):
    """Anything that maps float32 NCHW images in [0, 1] to logits.

    Attributes:
        name: ``"onnxruntime"``, ``"tensorrt"`` or ``"torch"``.
        precision: ``"fp32"``, ``"fp16"``, ``"int8"`` or ``"unknown"``.
        input_spec: what ``predict`` accepts.
        capabilities: ``{"scores"}`` for exported runtimes, ``{"scores", "gradients"}`` for torch.
        metadata: the artifact's own metadata (ONNX ``metadata_props``, engine sidecar, checkpoint JSON).
    """

    name: str
    precision: str
    input_spec: InputSpec
    capabilities: frozenset[str]
    metadata: dict[str, Any]

    def predict(self, images: np.ndarray) -> np.ndarray: ...


class BaseBackend(abc.ABC):
    """Checked context-manager base: ``with backend: logits = backend.predict(x)``.

    Subclasses implement ``_open`` (create the session/engine and set ``input_spec``),
    ``_predict`` (one chunk, already validated, returns logits) and optionally ``_close``.
    ``predict`` opens the backend on first use, so a plain call works too.
    """

    name: str = "backend"
    capabilities: frozenset[str] = frozenset({SCORES})

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.precision: str = "unknown"
        self.input_spec: InputSpec | None = None  # type: ignore[assignment]
        self.metadata: dict[str, Any] = {}
        self.num_classes: int | None = None
        self.stats = InferenceStats()
        self._active = False

    # -------------------------------------------------------------- lifecycle
    def open(self) -> "BaseBackend":
        if not self._active:
            self._open()
            self._active = True
        return self

    def close(self) -> None:
        if self._active:
            self._close()
            self._active = False

    def __enter__(self) -> "BaseBackend":
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @abc.abstractmethod
    def _open(self) -> None:
        """Creates the session or engine and sets ``input_spec`` (and precision, metadata)."""

    def _close(self) -> None:
        return None

    @abc.abstractmethod
    def _predict(self, images: np.ndarray) -> np.ndarray:
        """Logits for one validated, contiguous chunk the runtime accepts as is."""

    # -------------------------------------------------------------- inference
    def validate(self, images: Any) -> np.ndarray:
        """Checks images once: a float32 NCHW numpy array in [0, 1] of the model's (C, H, W)."""
        spec = self.input_spec
        if not isinstance(images, np.ndarray):
            raise UsageError(f"{self.name}: images must be a numpy array, got {type(images).__name__} "
                             "(convert torch tensors with .cpu().numpy())")
        if images.dtype != np.float32:
            raise UsageError(f"{self.name}: images must be float32 in [0, 1], got {images.dtype}")
        if images.ndim != 4:
            raise UsageError(f"{self.name}: images must be NCHW (4-D), got shape {tuple(images.shape)}")
        if spec is not None and tuple(images.shape[1:]) != tuple(spec.shape):
            raise UsageError(f"{self.name}: the model takes images of shape {tuple(spec.shape)} (C, H, W), "
                             f"got {tuple(images.shape[1:])}")
        if images.size:
            lo, hi = float(images.min()), float(images.max())
            if not (lo >= 0.0 and hi <= 1.0):  # also false for NaN
                raise UsageError(f"{self.name}: images must lie in [0, 1] (normalization lives inside the model), "
                                 f"got values in [{lo:.4g}, {hi:.4g}]")
        return np.ascontiguousarray(images)

    def predict(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Logits (float32, shape (N, classes)) for float32 NCHW ``images`` in [0, 1].

        Args:
            images: the batch; any size (split and padded to what the runtime accepts).
            batch_size: largest chunk to send at once (default: all, or the runtime's limit).
        """
        self.open()
        x = self.validate(images)
        n = len(x)
        if n == 0:
            return np.zeros((0, self.num_classes or 0), dtype=np.float32)
        step = self.input_spec.chunk_size(batch_size) if self.input_spec is not None else batch_size
        step = step or n
        static = self.input_spec.static_batch if self.input_spec is not None else None
        outs = []
        t0 = time.perf_counter()
        for start in range(0, n, step):
            chunk = x[start:start + step]
            k = len(chunk)
            if static is not None and k < static:  # pad a static batch with black images, drop their logits
                chunk = np.concatenate([chunk, np.zeros((static - k, *chunk.shape[1:]), np.float32)])
            out = np.asarray(self._predict(chunk))
            outs.append(out[:k])
            self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - t0
        self.stats.images += n
        logits = np.concatenate(outs).astype(np.float32, copy=False)
        if logits.ndim != 2 or len(logits) != n:
            where = f"{self.path}: " if self.path is not None else ""
            raise ArtifactError(f"{where}not a classifier: {self.name} returned outputs of shape {tuple(logits.shape)} "
                                f"for {n} images (ciard needs logits of shape (N, classes))")
        if self.num_classes is None:
            self.num_classes = int(logits.shape[1])
        return logits

    def describe(self) -> dict[str, Any]:
        """Name, precision, input spec, capabilities and timing: for reports."""
        return {"backend": self.name, "path": str(self.path) if self.path is not None else None,
                "precision": self.precision, "input_spec": self.input_spec.to_dict() if self.input_spec else None,
                "capabilities": sorted(self.capabilities), "stats": self.stats.to_dict()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!s}, precision={self.precision})"
