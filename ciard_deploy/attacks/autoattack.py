"""Adapter to pyautoattack, Croce & Hein's reference AutoAttack (imported lazily, never re-written)."""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator, Literal

import torch
from torch import nn

from ciard_deploy.attacks.base import GRADIENTS, Budget, _check_positive
from ciard_deploy.attacks.common import TorchAttack
from ciard_deploy.errors import EnvironmentMissing, UsageError

Version = Literal["standard", "fast"]

#: pyautoattack attacks run by each version (the reference names).
AA_ATTACKS: dict[str, tuple[str, ...]] = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "fast": ("apgd-ce", "apgd-t"),
}


@contextlib.contextmanager
def _keep_trace() -> Iterator[None]:
    """pyautoattack's dynamic-defense check ends with ``sys.settrace(None)``; put back any tracer
    (coverage, a debugger) that was installed before."""
    previous = sys.gettrace()
    try:
        yield
    finally:
        if sys.gettrace() is not previous:
            sys.settrace(previous)


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


class AutoAttackAdapter(TorchAttack):
    """AutoAttack (Croce & Hein, ICML 2020) through ``pyautoattack``; white-box, L-inf.

    ``aa`` is the standard version: APGD-CE, APGD-T (9 targets), FAB-T (9 targets) and
    Square (5000 queries), run as a cascade on the samples still robust. ``aa-fast`` runs only
    APGD-CE and APGD-T (100 iterations, 1 restart each): cheaper, and still a strong lower
    bound, but not the number to publish. The reference's logging is off (``verbose``), its
    global RNG seeding is undone afterwards, and the seed defaults to 0 for repeatability.
    Fewer than 10 classes lower the number of target classes to ``num_classes - 1``.

    Args:
        eps: L-inf radius.
        version: ``"standard"`` (``aa``) or ``"fast"`` (``aa-fast``).
        seed: seed handed to every reference attack; default 0. ``None`` uses the time.
        batch_size: batch size inside pyautoattack; default 500.

    Example:
        >>> AutoAttackAdapter(8 / 255).label
        'aa@8/255'
    """

    requires = frozenset({GRADIENTS})

    def __init__(self, eps: float, version: Version = "standard", seed: int | None = 0,
                 batch_size: int = 500) -> None:
        if version not in AA_ATTACKS:
            raise ValueError(f"version must be one of {sorted(AA_ATTACKS)}, got {version!r}")
        _check_positive("batch_size", batch_size)
        self.version = version
        self.name = "aa" if version == "standard" else f"aa-{version}"
        self.budget = Budget("Linf", float(eps), 100, None)
        self.seed = seed
        self.batch_size = int(batch_size)

    def options(self) -> dict[str, Any]:
        return {"version": self.version, "attacks": list(AA_ATTACKS[self.version]), "seed": self.seed}

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        try:
            from pyautoattack import AutoAttack
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise EnvironmentMissing(f"attack {self.label} needs pyautoattack ({exc}); "
                                     "install it with: pip install pyautoattack") from None
        with torch.no_grad():
            num_classes = int(model(x[:1]).shape[1])
        if num_classes < 3:
            raise UsageError(f"attack {self.label} needs at least 3 classes (its DLR losses compare "
                             f"the top 3 logits); this model has {num_classes}. Use pgd<K> or cw<K>.")
        kwargs: dict[str, Any] = {"eps": self.budget.eps, "norm": "Linf", "seed": self.seed, "device": x.device}
        if self.version == "standard":
            aa = AutoAttack(model, version="standard", **kwargs)
        else:
            aa = AutoAttack(model, version="custom", attacks=list(AA_ATTACKS[self.version]), **kwargs)
            aa.apgd.n_restarts = 1
        aa.verbose = False
        targets = min(9, num_classes - 1)
        aa.apgd_targeted.n_target_classes = targets
        aa.fab.n_target_classes = targets
        with torch.random.fork_rng(devices=_rng_devices(x.device)), _keep_trace():
            x_adv, _y_adv = aa.run_standard_evaluation(x, y, batch_size=self.batch_size)
        return x_adv
