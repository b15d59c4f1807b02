"""Loss terms and the training-time PGD shared by every distillation method (one place).

Conventions (all from the methods' reference code):

- ``kl_soft(p_logits, q_logits)`` is ``KL(softmax(p / T_p) || softmax(q / T_q))`` with the first
  argument the *target* (a teacher, or the clean output in TRADES) and the second the model
  being trained; it is computed in float32 whatever the autocast dtype (float64 inputs stay
  float64: ``at_least_float32``, so a float64 reference run is float64 throughout).
- Reductions: ``"elementwise"`` averages the per-element terms ``p_k (log p_k - log q_k)`` over
  batch *and* classes (``nn.KLDivLoss()``'s default ``mean``, and the ``torch.mean(kl_loss(...))``
  of the CIARD/MTARD/RSLAD scripts): it equals ``batchmean / num_classes``. ``"batchmean"`` is
  the true KL averaged over samples (TRADES), ``"sum"`` sums everything, ``"none"`` gives one KL per
  sample.
- Logs use exact ``log_softmax`` (the reference scripts add 1e-5 inside ``log(p)``: a difference
  below 1e-4 of the term at CIFAR scales, chosen away for exactness).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Reduction = Literal["elementwise", "batchmean", "sum", "none"]
AttackLoss = Literal["ce", "kl"]
Start = Literal["normal", "uniform", "none"]


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or kept in float64: loss terms never compute in half precision, nor below the input's."""
    return t if t.dtype == torch.float64 else t.float()


def kl_soft(target_logits: torch.Tensor, student_logits: torch.Tensor, *, teacher_T: float = 1.0,
            student_T: float = 1.0, reduction: Reduction = "elementwise") -> torch.Tensor:
    """Soft-label distillation term ``KL(softmax(target / teacher_T) || softmax(student / student_T))``.

    Gradients flow into both arguments: detach the target where it is a teacher.

    Args:
        target_logits: (N, C) logits of the distribution to match (teacher probabilities p).
        student_logits: (N, C) logits of the model being trained (log-probabilities log q).
        teacher_T: temperature dividing ``target_logits``.
        student_T: temperature dividing ``student_logits``.
        reduction: ``"elementwise"`` (mean over N*C), ``"batchmean"`` (sum / N), ``"sum"``, or
            ``"none"`` (per-sample KL, shape (N,)).

    Returns:
        a scalar float32 tensor (or (N,) for ``"none"``); 0 for an empty batch reduced by mean.
    """
    log_p = F.log_softmax(at_least_float32(target_logits) / teacher_T, dim=1)
    log_q = F.log_softmax(at_least_float32(student_logits) / student_T, dim=1)
    terms = F.kl_div(log_q, log_p, reduction="none", log_target=True)  # p * (log p - log q)
    if reduction == "elementwise":
        return terms.mean() if terms.numel() else terms.sum()
    if reduction == "batchmean":
        return terms.sum() / max(terms.shape[0], 1)
    if reduction == "sum":
        return terms.sum()
    if reduction == "none":
        return terms.sum(dim=1)
    raise ValueError(f"unknown reduction {reduction!r}")


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in float32 (safe under autocast; float64 kept)."""
    return F.cross_entropy(at_least_float32(logits), y, reduction=reduction)


def softmax_entropy(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Mean over the batch of the entropy (nats) of ``softmax(logits / T)``; a float32 scalar."""
    log_p = F.log_softmax(at_least_float32(logits) / T, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def magnitude(value: float) -> int:
    """``floor(log10(|value|))``, the order of magnitude; 0 counts as 1e-7 (as the reference does)."""
    value = abs(float(value))
    if value == 0.0:
        value = 1e-7
    return math.floor(math.log10(value))


def push_weight(loss_rob: float, loss_nat: float, loss_push: float) -> float:
    """CIARD's push weight ``10 ** (min(mag(L_rob), mag(L_nat)) - mag(L_push))``.

    It rescales the push term to the order of magnitude of the smaller distillation term.

    Example:
        >>> push_weight(0.23, 0.045, 0.0031)  # mags -1, -2, -3
        10.0
    """
    return float(10.0 ** (min(magnitude(loss_rob), magnitude(loss_nat)) - magnitude(loss_push)))


def _attack_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel: the attack needs no gradient sync."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def pgd_train_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *, eps: float,
                     steps: int = 10, step_size: float = 2 / 255, loss: AttackLoss = "ce",
                     target_logits: torch.Tensor | None = None, kl_T: float = 1.0, start: Start = "normal",
                     start_std: float = 0.001, generator: torch.Generator | None = None,
                     train_mode: bool = False, clamp_start: bool = True) -> torch.Tensor:
    """L-inf PGD as the distillation methods run it during training (white-box, on the student).

    The model is put in eval mode for the attack (BatchNorm uses running statistics and is not
    updated; ``train_mode=True``: train mode, batch statistics, running ones updated on every step,
    as the ARD script) and its previous mode is restored afterwards. Gradients are taken w.r.t. the input
    only: no parameter ``.grad`` is touched. Each step is ``x' + step_size * sign(grad)``, then
    projection to the eps-ball around ``x``, then to [0, 1] (the reference order).

    Args:
        model: maps float images in [0, 1] to logits.
        x: clean images, float NCHW in [0, 1].
        y: labels (needed for ``loss="ce"``).
        eps: L-inf radius.
        steps: iterations (10 in every method's reference).
        step_size: signed-gradient step (2/255).
        loss: ``"ce"``: maximize cross-entropy(model(x'), y) (PGD-AT, CIARD, MTARD);
            ``"kl"``: maximize ``KL(softmax(target_logits / kl_T) || softmax(model(x') / kl_T))``
            summed over the batch (TRADES, RSLAD, ARD).
        target_logits: the KL target (teacher logits on x, or the model's own clean logits).
        kl_T: temperature of both sides of the KL loss.
        start: ``"normal"``: ``x + start_std * randn`` (TRADES/RSLAD/CIARD, not projected before
            the first step, as in the reference); ``"uniform"``: ``x + U(-eps, eps)`` clipped to
            [0, 1] (Madry PGD-AT, ARD; ``clamp_start=False``: not clipped, as the ARD script);
            ``"none"``: ``x``.
        start_std: std of the ``"normal"`` start (0.001).
        generator: seeds the random start (default: the global RNG).
        train_mode: attack the model in train mode instead of eval mode.
        clamp_start: clip the ``"uniform"`` start to [0, 1].

    Returns:
        the adversarial batch, detached, same dtype as ``x``.
    """
    if loss == "ce" and y is None:
        raise ValueError("loss='ce' needs labels y")
    if loss == "kl" and target_logits is None:
        raise ValueError("loss='kl' needs target_logits")
    net = _attack_model(model)
    was_training = net.training
    x = x.detach()
    if start == "normal":
        x_adv = x + start_std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif start == "uniform":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_adv = x + (2.0 * noise - 1.0) * eps
        if clamp_start:
            x_adv = x_adv.clamp(0.0, 1.0)
    elif start == "none":
        x_adv = x.clone()
    else:
        raise ValueError(f"unknown start {start!r}")
    target = target_logits.detach() if target_logits is not None else None
    net.train(train_mode)
    try:
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                out = net(x_adv)
                if loss == "ce":
                    value = cross_entropy(out, y, reduction="sum")  # type: ignore[arg-type]
                else:
                    assert target is not None
                    value = kl_soft(target, out, teacher_T=kl_T, student_T=kl_T, reduction="sum")
                (grad,) = torch.autograd.grad(value, x_adv)
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    finally:
        net.train(was_training)
    if steps == 0:
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv.detach()
