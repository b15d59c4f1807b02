"""How the trainer measures a student and picks its best checkpoint: clean and per-attack accuracy on a
fixed set of images under a fixed seed (:func:`accuracy_metrics`, used every ``train.eval_every`` epochs
on the selection subset and once at the end on the test split), and the score the best checkpoint is
chosen by (:func:`selection_score`).

Not to be confused with ``ciard eval`` (``ciard_deploy/checkpoint_eval.py``), verify's evaluation of a deployed
artifact, or the attack cascade itself (``attacks.run_cascade``), which this module calls.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ciard_deploy.attacks import create_attack, parse_attack_spec, run_cascade


def make_attacks(specs: Sequence[str], eps: float, step_size: float | None = None) -> list[Any]:
    """Evaluation attacks; ``step_size`` (if given) replaces the default of the attacks that take one."""
    out = []
    for spec in specs:
        kw = {}
        if step_size is not None and "step_size" in inspect.signature(parse_attack_spec(spec)[0].load()).parameters:
            kw["step_size"] = step_size
        out.append(create_attack(spec, eps, **kw))
    return out


def accuracy_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack_specs: Sequence[str], eps: float,
                     batch_size: int, device: torch.device, seed: int,
                     step_size: float | None = None,
                     progress: Callable[[int, int, str], None] | None = None) -> dict[str, float]:
    """``{"clean": acc, "<attack>@<eps>": acc, ...}`` with a fixed seed that leaves the caller's RNG alone
    (the worst case over the attacks too when there are several); ``progress(done, total, stage)`` as in
    ``attacks.run_cascade``."""
    attacks = make_attacks(attack_specs, eps, step_size)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        res = run_cascade(model, x, y, attacks, batch_size=batch_size, device=device, progress=progress)
    out = {"clean": res.clean_acc}
    for a in res.attacks:
        out[a.label] = a.robust_acc
    if len(res.attacks) > 1:
        out[res.worst_case_label] = res.worst_case_acc
    return out


def selection_score(metrics: dict[str, float], select_by: str, robust_label: str | None) -> float:
    """The number the best checkpoint is chosen by (``train.select_by``): clean accuracy, robust accuracy
    under ``robust_label``, or their mean (``mean``, the default)."""
    if select_by == "clean" or robust_label is None:
        return metrics["clean"]
    if select_by == "robust":
        return metrics[robust_label]
    return 0.5 * (metrics["clean"] + metrics[robust_label])


__all__ = ["accuracy_metrics", "make_attacks", "selection_score"]
