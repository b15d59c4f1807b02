"""Adapter to pyautoattack, Croce & Hein's reference AutoAttack (imported lazily, never re-written)."""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator, Literal

import torch
from torch import nn

from ciard_deploy.attacks.base import GRADIENTS, check_positive
from ciard_deploy.attacks.budget import Budget
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


def _import_autoattack(label: str) -> Any:
    try:
        from pyautoattack import AutoAttack
    except ImportError as exc:  # pragma: no cover - in the train extra
        raise EnvironmentMissing(f"attack {label} needs pyautoattack ({exc}); "
                                 "install it with: pip install 'ciard-deploy[train]'") from None
    return AutoAttack


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


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
        check_positive("batch_size", batch_size)
        self.version = version
        self.name = "aa" if version == "standard" else f"aa-{version}"
        self.budget = Budget("Linf", float(eps), 100, None)
        self.seed = seed
        self.batch_size = int(batch_size)

    def options(self) -> dict[str, Any]:
        return {"version": self.version, "attacks": list(AA_ATTACKS[self.version]), "seed": self.seed}

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        AutoAttack = _import_autoattack(self.label)
        num_classes = _num_classes(model, x)
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


#: One AutoAttack component by its reference name: (pyautoattack attribute, restarts, uses target classes).
COMPONENTS: dict[str, tuple[str, int, bool]] = {
    "apgd-ce": ("apgd", 1, False),
    "apgd-t": ("apgd_targeted", 1, True),
    "fab-t": ("fab", 1, True),
}


class AutoAttackComponent(TorchAttack):
    """One attack of AutoAttack's standard cascade, run alone through ``pyautoattack``; white-box, L-inf.

    ``apgd-ce`` (APGD on cross-entropy, 1 restart), ``apgd-t`` (APGD on the targeted DLR loss, 9
    target classes) and ``fab-t`` (targeted FAB, 9 target classes), each with the reference's
    100 iterations unless the spec says otherwise (``apgd-ce50``). These are the settings the
    standard version uses (Croce & Hein, ICML 2020); running them one by one gives a per-attack
    record and lets a pack or a cascade skip the samples an earlier attack already broke.
    Fewer than 10 classes lower the target classes to ``num_classes - 1``.

    The reference checks its own success with the model's forward pass, so an ``nn.Module`` whose
    forward returns another runtime's logits (``attacks.artifact.RuntimeScored``) makes every
    iterate count only when that runtime misclassifies it.

    Args:
        eps: L-inf radius.
        component: ``"apgd-ce"``, ``"apgd-t"`` or ``"fab-t"``.
        steps: iterations per restart/target; default 100 (the reference's).
        seed: seed handed to the reference; default 0.
        batch_size: batch size inside pyautoattack; default 500.

    Example:
        >>> AutoAttackComponent(8 / 255, "apgd-t").label
        'apgd-t@8/255'
    """

    requires = frozenset({GRADIENTS})

    def __init__(self, eps: float, component: str = "apgd-ce", steps: int = 100, seed: int | None = 0,
                 batch_size: int = 500) -> None:
        if component not in COMPONENTS:
            raise ValueError(f"component must be one of {sorted(COMPONENTS)}, got {component!r}")
        check_positive("steps", steps)
        check_positive("batch_size", batch_size)
        self.component = component
        self.name = component if int(steps) == 100 else f"{component}{int(steps)}"
        self.budget = Budget("Linf", float(eps), int(steps), None)
        self.seed = seed
        self.batch_size = int(batch_size)

    def options(self) -> dict[str, Any]:
        attr, restarts, targeted = COMPONENTS[self.component]
        return {"reference": f"pyautoattack {self.component}", "restarts": restarts,
                "target_classes": "min(9, classes - 1)" if targeted else None, "seed": self.seed}

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        AutoAttack = _import_autoattack(self.label)
        num_classes = _num_classes(model, x)
        attr, restarts, targeted = COMPONENTS[self.component]
        if targeted and num_classes < 3:
            raise UsageError(f"attack {self.label} needs at least 3 classes; this model has {num_classes}. "
                             "Use apgd-ce, pgd<K> or cw<K>.")
        aa = AutoAttack(model, version="custom", attacks=[self.component], eps=self.budget.eps, norm="Linf",
                        seed=self.seed, device=x.device)
        aa.verbose = False
        sub = getattr(aa, attr)
        sub.n_iter = self.budget.steps
        sub.n_restarts = restarts
        if targeted:
            sub.n_target_classes = min(9, num_classes - 1)
        if hasattr(sub, "n_iter_2"):  # APGD derived its step-size checkpoints from the default 100 iterations
            n = self.budget.steps
            sub.n_iter_orig = n
            sub.n_iter_2, sub.n_iter_min, sub.size_decr = max(int(0.22 * n), 1), max(int(0.06 * n), 1), \
                max(int(0.03 * n), 1)
        with torch.random.fork_rng(devices=_rng_devices(x.device)), _keep_trace():
            x_adv, _y_adv = aa.run_standard_evaluation(x, y, batch_size=self.batch_size)
        return x_adv
