"""AutoAttack-style evaluation of a torch model: clean, each attack, per-sample worst case."""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ciard_deploy.attacks.base import TORCH_CAPABILITIES, Attack, ensure_capabilities
from ciard_deploy.attacks.common import check_inputs, frozen_eval
from ciard_deploy.attacks.results import AttackResult, EvalResult
from ciard_deploy.errors import UsageError

log = logging.getLogger(__name__)

#: ``progress(done, total, stage)``: samples done out of total in stage ``"clean"`` or an attack label.
ProgressFn = Callable[[int, int, str], None]

#: Slack allowed on the L-inf budget for float32 rounding of ``x +- eps``.
BUDGET_TOLERANCE = 1e-6


def _as_tensor(a: torch.Tensor | np.ndarray) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(dim=1)


def check_budget(x_adv: torch.Tensor, x: torch.Tensor, eps: float, label: str) -> None:
    """Raises RuntimeError if an attack left the eps-ball or [0, 1] (an internal bug, never user error)."""
    if x_adv.shape != x.shape:
        raise RuntimeError(f"{label} returned shape {tuple(x_adv.shape)} for inputs {tuple(x.shape)}")
    if len(x) == 0:
        return
    dist = float((x_adv - x).abs().max())
    lo, hi = float(x_adv.min()), float(x_adv.max())
    if dist > eps + BUDGET_TOLERANCE or lo < 0.0 or hi > 1.0:
        raise RuntimeError(f"{label} broke its budget: max |x_adv - x| = {dist:.3g} (eps {eps:.3g}), "
                           f"range [{lo:.3g}, {hi:.3g}]")


def evaluate(model: nn.Module, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray,
             attacks: Sequence[Attack], batch_size: int = 256, device: str | torch.device = "cpu",
             progress: ProgressFn | None = None) -> EvalResult:
    """Clean accuracy, each attack's robust accuracy and the worst case, with per-sample flags.

    As in AutoAttack/RobustBench: every attack is run on all samples the model classifies
    correctly without attack (so each attack's number stands on its own), each result is
    re-checked by a fresh forward pass, and a sample counts as robust in the worst case only
    if it is correct on clean *and* under every attack.

    Args:
        model: torch classifier taking float32 NCHW in [0, 1]; moved to ``device``, used in eval
            mode, its train/eval mode and ``requires_grad`` flags restored afterwards.
        x: images, float32 NCHW in [0, 1] (kept on the CPU, sent to ``device`` per batch).
        y: int64 labels.
        attacks: from ``create_attack``; checked for capabilities before any work.
        batch_size: images per attack call.
        device: where the model and attacks run (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        progress: optional ``callback(done, total, stage)``; the CLI turns it into a progress bar.

    Returns:
        the ``EvalResult`` (per-sample flags kept).

    Raises:
        UsageError: an attack listed twice, no samples, or a bad batch size.
    """
    attacks = list(attacks)
    ensure_capabilities(attacks, TORCH_CAPABILITIES)
    labels = [a.label for a in attacks]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise UsageError(f"attack(s) listed twice: {', '.join(dupes)}")
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    x = _as_tensor(x).float()
    y = _as_tensor(y).long()
    check_inputs(x, y)
    n = len(x)
    if n == 0:
        raise UsageError("no samples to evaluate")
    dev = torch.device(device)
    model.to(dev)

    def report(done: int, total: int, stage: str) -> None:
        if progress is not None:
            progress(done, total, stage)

    with frozen_eval(model):
        clean_correct = torch.zeros(n, dtype=torch.bool)
        for start in range(0, n, batch_size):
            xb, yb = x[start:start + batch_size].to(dev), y[start:start + batch_size].to(dev)
            clean_correct[start:start + batch_size] = (_predict(model, xb) == yb).cpu()
            report(min(start + batch_size, n), n, "clean")
        idx = clean_correct.nonzero().flatten()
        results: list[AttackResult] = []
        for attack in attacks:
            flags = torch.zeros(n, dtype=torch.bool)
            t0 = time.perf_counter()
            report(0, len(idx), attack.label)
            for start in range(0, len(idx), batch_size):
                b = idx[start:start + batch_size]
                xb, yb = x[b].to(dev), y[b].to(dev)
                x_adv = attack.run(model, xb, yb)
                check_budget(x_adv, xb, attack.eps, attack.label)
                flags[b] = (_predict(model, x_adv) == yb).cpu()
                report(min(start + len(b), len(idx)), len(idx), attack.label)
            seconds = time.perf_counter() - t0
            acc = float(flags.sum()) / n
            log.info("%s: %.2f%% (%.1f s)", attack.label, 100 * acc, seconds)
            results.append(AttackResult(attack.name, attack.label, attack.eps, acc, seconds, flags.numpy()))
    worst = clean_correct.clone()
    for r in results:
        worst &= torch.from_numpy(r.per_sample)
    return EvalResult(n=n, clean_acc=float(clean_correct.sum()) / n, attacks=results,
                      worst_case_acc=float(worst.sum()) / n, clean_correct=clean_correct.numpy())
