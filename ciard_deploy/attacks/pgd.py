"""FGSM and L-inf PGD, as attacks and as one functional ``pgd_linf`` the trainers reuse."""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ciard_deploy.attacks.base import GRADIENTS, check_positive
from ciard_deploy.attacks.budget import Budget, format_eps
from ciard_deploy.attacks.common import TorchAttack
from ciard_deploy.attacks.torch_ops import make_generator, project_linf

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ce_loss_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy: per-sample gradients independent of the batch size."""
    return F.cross_entropy(logits.float(), y, reduction="sum")


def default_step_size(eps: float) -> float:
    """max(2/255, eps/4): the standard 2/255 at eps 8/255, scaled up with larger budgets (digits'
    0.1-0.3) so that 20 steps still cross the whole ball instead of silently weakening the attack."""
    return max(2.0 / 255.0, float(eps) / 4.0)


def warn_if_short(label: str, eps: float, steps: int, step_size: float) -> None:
    """Logs a warning when the steps cannot reach the eps boundary (e.g. ``pgd10`` at eps 0.1 with step 2/255)."""
    reach = steps * step_size
    if eps > 0 and reach < eps:
        log.warning("%s: %d steps of %s reach at most %s < eps %s; the attack is weaker than it "
                    "looks (raise the steps or step_size)", label, steps, format_eps(step_size), format_eps(reach),
                    format_eps(eps))


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
             random_start: bool = True, loss_fn: LossFn | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """L-inf projected gradient ascent on ``loss_fn(model(x_adv), y)`` (Madry et al. 2018).

    The functional core of FGSM, PGD and CW-inf. It does not change the model's mode or
    ``requires_grad`` flags (training code decides those; the ``Attack`` classes freeze the
    model) and never accumulates parameter gradients: it differentiates w.r.t. the input only.

    Args:
        model: maps float images in [0, 1] to logits.
        x: clean images, float NCHW in [0, 1].
        y: labels, or any target ``loss_fn`` understands (e.g. teacher logits for ARD's KL).
        eps: L-inf radius.
        step_size: signed-gradient step per iteration.
        steps: number of iterations (1 with ``step_size=eps`` and no random start is FGSM).
        random_start: start from a uniform sample of the eps-ball (else from ``x``).
        loss_fn: loss to maximize, summed over the batch; default cross-entropy.
        generator: seeds the random start.

    Returns:
        adversarial images (detached) within eps of ``x`` and in [0, 1].
    """
    loss_fn = loss_fn or ce_loss_sum
    x = x.detach()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_adv = (x + (2.0 * noise - 1.0) * eps).clamp_(0.0, 1.0)
    else:
        x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(model(x_adv), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = project_linf(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


class PGD(TorchAttack):
    """L-inf PGD on the cross-entropy loss (Madry et al., ICLR 2018); white-box.

    Threat model: L-inf ball of radius eps around each image, pixels in [0, 1], full gradient
    access. Defaults follow the CIARD evaluation protocol: ``pgd20`` is 20 steps of 2/255 from
    a uniform random start; ``pgdt20`` ("PGD-TRADES") is the same with step 0.003.

    Args:
        eps: L-inf radius.
        steps: iterations (the ``K`` of ``pgd<K>``); default 20.
        step_size: step per iteration; default ``default_step_size(eps)`` = max(2/255, eps/4).
        random_start: start from a uniform point of the eps-ball; default True.
        restarts: independent runs; a sample counts as broken if any run breaks it; default 1.
        seed: seeds the random start (per ``run`` call); default None (global RNG).
        prefix: name prefix, ``"pgd"`` or ``"pgdt"``.

    Example:
        >>> attack = PGD(8 / 255, steps=20)
        >>> attack.label
        'pgd20@8/255'
        >>> x_adv = attack.run(model, x, y)  # doctest: +SKIP
    """

    requires = frozenset({GRADIENTS})

    def __init__(self, eps: float, steps: int = 20, step_size: float | None = None, random_start: bool = True,
                 restarts: int = 1, seed: int | None = None, prefix: str = "pgd") -> None:
        step_size = default_step_size(eps) if step_size is None else step_size
        check_positive("steps", steps)
        check_positive("step_size", step_size)
        check_positive("restarts", restarts)
        self.name = f"{prefix}{int(steps)}"
        self.budget = Budget("Linf", float(eps), int(steps), float(step_size))
        self.random_start = bool(random_start)
        self.restarts = int(restarts)
        self.seed = seed
        warn_if_short(self.label, self.budget.eps, self.budget.steps, float(step_size))

    def options(self) -> dict[str, Any]:
        return {"random_start": self.random_start, "restarts": self.restarts, "seed": self.seed}

    def _loss_fn(self) -> LossFn:
        return ce_loss_sum

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = self.budget
        gen = make_generator(self.seed, x.device)
        if self.restarts == 1:
            return pgd_linf(model, x, y, b.eps, b.step_size, b.steps, self.random_start, self._loss_fn(), gen)
        best = x.clone()
        broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            x_adv = pgd_linf(model, x, y, b.eps, b.step_size, b.steps, self.random_start, self._loss_fn(), gen)
            with torch.no_grad():
                now = model(x_adv).argmax(1) != y
            keep = ~broken
            best[keep] = x_adv[keep]
            broken |= now
            if bool(broken.all()):
                break
        return best


class FGSM(TorchAttack):
    """Fast Gradient Sign Method (Goodfellow et al., ICLR 2015); white-box, L-inf.

    One step of size eps along the sign of the cross-entropy gradient, from the clean image.

    Args:
        eps: L-inf radius (also the step size).
        seed: accepted so every attack takes ``seed``; FGSM is deterministic and ignores it.

    Example:
        >>> FGSM(8 / 255).label
        'fgsm@8/255'
    """

    requires = frozenset({GRADIENTS})

    def __init__(self, eps: float, seed: int | None = None) -> None:
        self.name = "fgsm"
        self.budget = Budget("Linf", float(eps), 1, float(eps))
        self.seed = seed

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pgd_linf(model, x, y, self.budget.eps, self.budget.eps, 1, random_start=False)


class MultiTargetPGD(TorchAttack):
    """Multi-targeted PGD on the margin loss (Gowal et al. 2019, "An alternative surrogate loss for
    PGD-based adversarial testing"); white-box, L-inf.

    For each of the ``targets`` classes ranked highest by the model on the clean image (other than
    the label), ``steps`` signed-gradient steps that maximise ``z_t - z_y``, from the clean image,
    with a step that decays from eps/2 to eps/20 (cosine). A sample is broken as soon as one
    iterate is misclassified *by the model's forward pass*, and that iterate is kept; the model's
    forward may be another runtime's logits (``attacks.artifact.RuntimeScored``), so every
    iterate is scored there. Samples already broken are not attacked further.

    Args:
        eps: L-inf radius.
        steps: iterations per target class (the ``K`` of ``mtpgd<K>``); default 100.
        targets: target classes per image, at most ``classes - 1``; default 9.
        seed: accepted so every attack takes ``seed``; the attack is deterministic.

    Example:
        >>> MultiTargetPGD(8 / 255, steps=50).label
        'mtpgd50@8/255'
    """

    requires = frozenset({GRADIENTS})

    def __init__(self, eps: float, steps: int = 100, targets: int = 9, seed: int | None = None) -> None:
        check_positive("steps", steps)
        check_positive("targets", targets)
        self.name = f"mtpgd{int(steps)}"
        self.budget = Budget("Linf", float(eps), int(steps), None)
        self.targets = int(targets)
        self.seed = seed

    def options(self) -> dict[str, Any]:
        return {"targets": self.targets, "loss": "margin z_t - z_y", "step": "cosine eps/2 -> eps/20",
                "start": "clean image", "keeps": "the first misclassified iterate"}

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import math

        eps, steps = self.budget.eps, self.budget.steps
        with torch.no_grad():
            logits = model(x)
        best = x.clone()
        broken = logits.argmax(1) != y
        ranked = logits.detach().clone()
        ranked[torch.arange(len(y)), y] = -torch.inf
        order = ranked.argsort(dim=1, descending=True)
        n_targets = min(self.targets, logits.shape[1] - 1)
        sizes = [eps / 20 + (eps / 2 - eps / 20) * 0.5 * (1 + math.cos(math.pi * i / max(steps - 1, 1)))
                 for i in range(steps)]
        for t in range(n_targets):
            active = torch.nonzero(~broken).flatten()
            if len(active) == 0:
                break
            xa, xc, ya, target = x[active].clone(), x[active], y[active], order[active, t]
            alive = torch.ones(len(active), dtype=torch.bool, device=x.device)
            for step in sizes:
                xa.requires_grad_(True)
                with torch.enable_grad():
                    z = model(xa)
                    margin = z.gather(1, target[:, None]).squeeze(1) - z.gather(1, ya[:, None]).squeeze(1)
                    (grad,) = torch.autograd.grad(margin.sum(), xa)
                with torch.no_grad():
                    now = (z.argmax(1) != ya) & alive  # the iterate just scored, before the step
                    _keep(best, broken, active, now, xa.detach())
                    alive &= ~now
                    if not bool(alive.any()):  # the one host read per step: stops when all are broken
                        break
                    xa = project_linf(xa.detach() + step * grad.sign(), xc, eps)
            else:
                with torch.no_grad():
                    now = (model(xa).argmax(1) != ya) & alive
                    _keep(best, broken, active, now, xa)
        return best


def _keep(best: torch.Tensor, broken: torch.Tensor, active: torch.Tensor, now: torch.Tensor,
          xa: torch.Tensor) -> None:
    """Stores the iterates ``xa`` of the rows ``active[now]`` into ``best`` and marks them broken, without a
    boolean-mask index (which would wait for the GPU to count the rows)."""
    best[active] = torch.where(now[:, None, None, None], xa, best[active])
    broken[active] = broken[active] | now
