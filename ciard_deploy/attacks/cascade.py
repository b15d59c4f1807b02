"""AutoAttack-style evaluation of a torch model: clean, each attack, per-sample worst case.

Resumable through an ``EvaluationState`` (``ciard_deploy.resume``): finished attacks are reused, a
partial one continues, and the state is saved as the evaluation goes.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ciard_deploy.attacks.base import Attack, TORCH_CAPABILITIES, ensure_capabilities
from ciard_deploy.attacks.budget import format_eps
from ciard_deploy.attacks.torch_ops import check_inputs, frozen_eval
from ciard_deploy.attacks.results import AttackResult, EvalResult
from ciard_deploy.errors import UsageError
from ciard_deploy.fingerprint import data_hash
from ciard_deploy.resume import SAVE_EVERY_S, AttackRecord, EvaluationState, StateEvent, state_hooks

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
        raise RuntimeError(f"{label} broke its budget: max |x_adv - x| = {dist:.3g} (eps {format_eps(eps)}), "
                           f"range [{lo:.3g}, {hi:.3g}]")


def run_cascade(model: nn.Module, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray,
             attacks: Sequence[Attack], batch_size: int = 256, device: str | torch.device = "cpu",
             progress: ProgressFn | None = None, state: EvaluationState | None = None,
             on_state: Callable[[StateEvent], None] | None = None,
             save_every: float = SAVE_EVERY_S) -> EvalResult:
    """Clean accuracy, each attack's robust accuracy and the worst case, with per-sample flags.

    As in AutoAttack/RobustBench: every attack is run on all samples the model classifies
    correctly without attack (so each attack's number stands on its own), each result is
    re-checked by a fresh forward pass, and a sample counts as robust in the worst case only
    if it is correct on clean *and* under every attack.

    With a ``state`` (see ``ciard_deploy.resume``) the evaluation is resumable: its clean flags and
    finished attacks are reused instead of recomputed, an attack it holds partway continues
    with the samples not yet attacked, and the rest run and are recorded. When the state has a
    ``path`` it is saved there (atomically) after the clean pass, after every finished attack,
    every ``save_every`` seconds inside an attack, and when an attack is interrupted (Ctrl-C or
    an error), so at most the batch in flight is lost. Attacks the state holds but ``attacks``
    does not name are kept in it and left out of the result.

    Args:
        model: torch classifier taking float32 NCHW in [0, 1]; moved to ``device``, used in eval
            mode, its train/eval mode and ``requires_grad`` flags restored afterwards.
        x: images, float32 NCHW in [0, 1] (kept on the CPU, sent to ``device`` per batch).
        y: int64 labels.
        attacks: from ``create_attack``; checked for capabilities before any work.
        batch_size: images per attack call.
        device: where the model and attacks run (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        progress: optional ``callback(done, total, stage)``; the CLI turns it into a progress bar.
        state: optional ``EvaluationState`` for exactly these ``x``/``y`` (its key's ``n`` and data
            hash are checked) and these attacks' eps; updated in place.
        on_state: optional ``callback(StateEvent)`` for each stage taken from ``state``
            (``"reused"``, ``"resumed"``); the CLI prints one line each.
        save_every: seconds between saves of a running attack's finished batches (0: every batch).

    Returns:
        the ``EvalResult`` (per-sample flags kept); ``AttackResult.origin`` says which attacks ran,
        were reused or resumed.

    Raises:
        UsageError: an attack listed twice, no samples, a bad batch size, or a state made for other
            data or another eps.
        StateMismatch: the state holds one of ``attacks`` with other settings.
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
    if state is not None:
        _check_state(state, x, y, attacks)
    dev = torch.device(device)
    model.to(dev)

    def report(done: int, total: int, stage: str) -> None:
        if progress is not None:
            progress(done, total, stage)

    announce, save = state_hooks(state, on_state, log)

    with frozen_eval(model):
        if state is not None and state.clean_correct is not None:
            clean_correct = torch.from_numpy(state.clean_correct.copy())
            announce("reused", "clean", n, n, 0.0)
        else:
            clean_correct = torch.zeros(n, dtype=torch.bool)
            for start in range(0, n, batch_size):
                xb, yb = x[start:start + batch_size].to(dev), y[start:start + batch_size].to(dev)
                clean_correct[start:start + batch_size] = (_predict(model, xb) == yb).cpu()
                report(min(start + batch_size, n), n, "clean")
            if state is not None:
                state.clean_correct = clean_correct.numpy().copy()
                save()
        idx = clean_correct.nonzero().flatten()
        results: list[AttackResult] = []
        for attack in attacks:
            rec = state.record(attack.label) if state is not None else None
            if rec is not None and rec.finished:
                announce("reused", attack.label, rec.done, rec.total, rec.seconds)
                log.debug("%s: %.2f%% (reused, %.1f s when it ran)", attack.label,
                          100 * rec.per_sample.mean(), rec.seconds)
                results.append(rec.to_result("reused"))
                continue
            results.append(_run_attack(model, x, y, idx, attack, batch_size, dev, report, announce, save, state,
                                       rec, save_every))
    worst = clean_correct.clone()
    for r in results:
        worst &= torch.from_numpy(r.per_sample)
    return EvalResult(n=n, clean_acc=float(clean_correct.sum()) / n, attacks=results,
                      worst_case_acc=float(worst.sum()) / n, clean_correct=clean_correct.numpy())


def _check_state(state: EvaluationState, x: torch.Tensor, y: torch.Tensor, attacks: list[Attack]) -> None:
    """The state must be for these very samples and this eps, and hold these attacks (if any) with equal settings."""
    if state.key.n != len(x):
        raise UsageError(f"the evaluation state is for {state.key.n} samples, not {len(x)}")
    if state.key.data_sha256 != data_hash(x, y):
        raise UsageError("the evaluation state is for other images or labels (data_sha256 differs)")
    other_eps = sorted({a.label for a in attacks if a.eps != state.key.eps})
    if other_eps:
        raise UsageError(f"the evaluation state is for eps {format_eps(state.key.eps)}; {', '.join(other_eps)} "
                         "has another budget")
    state.check(state.key, attacks)


def _run_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, attack: Attack,
                batch_size: int, dev: torch.device, report: ProgressFn, announce: Callable[..., None],
                save: Callable[[], None], state: EvaluationState | None, rec: AttackRecord | None,
                save_every: float) -> AttackResult:
    """Runs one attack on the clean-correct samples ``idx``, continuing ``rec`` if it is a partial record."""
    n, total = len(x), len(idx)
    if rec is not None:  # partway in the state (settings checked equal): continue after its last batch
        flags, first, seconds_before, origin = torch.from_numpy(rec.per_sample.copy()), rec.done, rec.seconds, "resumed"
        announce("resumed", attack.label, rec.done, total, rec.seconds)
        log.info("%s: resuming at %d/%d", attack.label, rec.done, total)
    else:
        flags, first, seconds_before, origin = torch.zeros(n, dtype=torch.bool), 0, 0.0, "ran"
    if state is not None:
        rec = AttackRecord(attack.label, attack.name, attack.eps, attack.describe(), total, first, seconds_before,
                           flags.numpy().copy(), device=str(dev), batch_size=batch_size)
        state.put(rec)
    t0 = last_save = time.perf_counter()
    unsaved = False
    report(first, total, attack.label)
    try:
        for start in range(first, total, batch_size):
            b = idx[start:start + batch_size]
            xb, yb = x[b].to(dev), y[b].to(dev)
            x_adv = attack.run(model, xb, yb)
            check_budget(x_adv, xb, attack.eps, attack.label)
            flags[b] = (_predict(model, x_adv) == yb).cpu()
            done = start + len(b)
            report(done, total, attack.label)
            if rec is not None:
                rec.per_sample[b.numpy()] = flags[b].numpy()
                rec.done, rec.seconds = done, seconds_before + time.perf_counter() - t0
                unsaved = True
                if done < total and time.perf_counter() - last_save >= save_every:
                    save()
                    last_save, unsaved = time.perf_counter(), False
    except BaseException:
        if unsaved:  # Ctrl-C or a failure: keep the batches that finished
            save()
        raise
    seconds = seconds_before + time.perf_counter() - t0
    if rec is not None:
        rec.done, rec.seconds = total, seconds
        save()
    acc = float(flags.sum()) / n
    log.info("%s: %.2f%% (%.1f s)", attack.label, 100 * acc, seconds)
    return AttackResult(attack.name, attack.label, attack.eps, acc, seconds, flags.numpy(), origin=origin)
