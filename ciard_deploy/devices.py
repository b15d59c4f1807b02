"""Device choice: ``auto`` picks cuda, then mps, then cpu; asking for a missing one is exit 3."""

from __future__ import annotations

from ciard_deploy.errors import EnvironmentMissing, UsageError


def resolve_device(name: str = "auto"):
    """Returns a ``torch.device`` for ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EnvironmentMissing(f"--device {name}: no CUDA device is visible here "
                                     f"(torch {torch.__version__}); use --device cpu or auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EnvironmentMissing(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return dev
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise EnvironmentMissing("--device mps: Apple MPS is not available here; use --device cpu or auto")
        return torch.device("mps")
    raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
