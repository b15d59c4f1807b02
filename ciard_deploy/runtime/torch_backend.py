"""TorchBackend: a ciard checkpoint (or run dir) in PyTorch, the reference runtime.

The only backend that gives gradients, so the only one white-box attacks can use. torch is
imported when the backend opens, never at module level: ``ciard_deploy.runtime`` stays
importable on a device without torch.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import numpy as np

from ciard_deploy.devices import resolve_device
from ciard_deploy.errors import TRAIN_EXTRA_HINT, BackendUnavailable
from ciard_deploy.runtime.base import GRADIENTS, SCORES, BaseBackend, InputSpec


def import_torch() -> Any:
    try:
        import torch
    except Exception as e:  # not installed (a device install), or a broken one (OSError of a CUDA library)
        why = ("is not installed here" if isinstance(e, ModuleNotFoundError)
               else f"is not usable here ({type(e).__name__}: {e})")
        raise BackendUnavailable(f"PyTorch {why}: {TRAIN_EXTRA_HINT}, "
                                 "or verify an exported .onnx/.engine file instead") from None
    return torch


def torch_status() -> str:
    """``"ok"`` or ``"unavailable: <reason>"`` for PyTorch (the ``train`` extra)."""
    try:
        importlib.import_module("torch")
    except Exception as e:
        return f"unavailable: {type(e).__name__}: {e} (pip install 'ciard-deploy[train]')"
    return "ok"


class TorchBackend(BaseBackend):
    """A ciard checkpoint evaluated in PyTorch (eval mode, no autograd unless asked).

    Args:
        path: run dir, ciard checkpoint (.safetensors + .json) or ``.pt``/``.pth`` file.
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"``, ``"mps"`` or ``"auto"``.
        model: an already-built model to wrap instead of loading ``path`` (takes [0, 1] input);
            ``input_shape`` is then required.
        input_shape: (C, H, W), when ``model`` is given.

    Attributes:
        model: the torch module (for white-box attacks on the reference).
        meta: the checkpoint's ``CheckpointMeta`` (None when wrapping a model).
    """

    name = "torch"
    capabilities = frozenset({SCORES, GRADIENTS})

    def __init__(self, path: str | os.PathLike | None = None, device: str | None = None, model: Any = None,
                 input_shape: tuple[int, int, int] | None = None) -> None:
        super().__init__(str(path) if path is not None else None)
        self.device_name = device or "cpu"
        self.model = model
        self.meta: Any = None
        self._input_shape = input_shape
        if model is None and path is None:
            raise ValueError("TorchBackend needs a checkpoint path or a model")
        if model is not None and input_shape is None:
            raise ValueError("TorchBackend(model=...) needs input_shape=(C, H, W)")

    def _open(self) -> None:
        import_torch()
        from ciard_deploy.model_loader import load_model  # imports torch (models)

        self.device = resolve_device(self.device_name)
        if self.model is None:
            self.model, self.meta = load_model(self.path)  # type: ignore[arg-type]
            self.metadata = self.meta.to_dict()
            self._input_shape = tuple(self.meta.input_shape)  # type: ignore[assignment]
            self.num_classes = int(self.meta.num_classes)
        self.model = self.model.to(self.device).eval()
        self.precision = "fp32"
        self.input_spec = InputSpec(shape=tuple(int(v) for v in self._input_shape))  # type: ignore[arg-type,union-attr]

    def _close(self) -> None:
        return None

    def _predict(self, images: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(images).to(self.device)
            return self.model(x).float().cpu().numpy()

    def loss_gradient(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Gradient of the summed cross-entropy with respect to the images (float32, NCHW)."""
        import torch
        import torch.nn.functional as F

        self.open()
        x = torch.from_numpy(self.validate(images)).to(self.device).requires_grad_(True)
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)
        with torch.enable_grad():
            loss = F.cross_entropy(self.model(x).float(), y, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
        return grad.detach().cpu().numpy()
