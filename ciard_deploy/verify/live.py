"""The live phase of ``ciard verify``: query-only attacks run on the runtime itself, torch-free.

Which attacks: any registered attack whose ``requires`` lacks ``gradients`` (today ``square<Q>``),
named by spec on the CLI (``--live square1000,square5000``) or in a recipe
(``deploy.live_attacks: [square1000]``); ``options.live.parse_live`` reads and checks both. A white-box
spec is refused: it needs gradients, which a runtime does not give, so it belongs in the pack.

How they run: ``run_live_attack`` is the one runner for all of them. Every live attack attacks the
same seeded, class-stratified subset of the pack (``live_n`` images; the samples of it the
runtime classifies correctly, in pack order), in batches of ``batch_size``, batch ``i`` seeded
``seed + i`` (so a batch's outcome does not depend on the others). With a ``VerifyState`` each
attack keeps its own record, keyed by its label and checked against its ``describe()``: finished
batches are saved as they go, and a later call continues after the last one, or takes a finished
attack whole. A new query-only attack needs its module and its registry entry
(``attacks.base.QueryAttack`` says what the runner relies on), nothing here.

Nothing here imports torch.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import numpy as np

from ciard_deploy.attacks.base import GRADIENTS, QueryAttack, create_attack, parse_attack_spec
from ciard_deploy.attacks.budget import format_eps
from ciard_deploy.resume import AttackRecord
from ciard_deploy.errors import UsageError
from ciard_deploy.options.live import PACK_HINT
from ciard_deploy.verify.pack import EPS_TOLERANCE, RobustnessPack
from ciard_deploy.attacks.base import ATTACKS

log = logging.getLogger(__name__)


def live_size(n: int, live_n: int | None) -> int:
    """How many pack samples the live attacks' subset holds: ``min(live_n, n)``, all ``n`` if None."""
    return n if live_n is None else min(int(live_n), n)


def create_live_attacks(specs: Sequence[str], eps: float, *, seed: int, batch_size: int) -> list[QueryAttack]:
    """The attacks of ``specs`` at ``eps``, seeded ``seed`` (the runner re-seeds each batch)."""
    attacks = []
    for spec in specs:
        attack = create_attack(spec, eps, seed=seed, batch_size=batch_size)
        if not isinstance(attack, QueryAttack):
            raise UsageError(f"{spec} is not a query-only attack; {PACK_HINT}")
        attacks.append(attack)
    return attacks


def live_families() -> list[str]:
    """Registry families of the query-only attacks (``["square"]``): each gets a ``<family>_acc`` metric."""
    return [name for name, e in ATTACKS.items() if GRADIENTS not in e.requires]


def family_of(name: str) -> str:
    """``"square1000"`` -> ``"square"``."""
    return parse_attack_spec(name)[0].family


Progress = Callable[..., None]


def run_live_attack(backend: Any, pack: RobustnessPack, attack: QueryAttack, targets: np.ndarray, *, seed: int,
                    batch_size: int, num_classes: int, progress: Progress | None, state: Any,
                    announce: Callable[..., None], save: Callable[[], None],
                    save_every: float) -> tuple[np.ndarray, int, float, str]:
    """One query-only attack on the pack positions ``targets``, batch ``i`` seeded ``seed + i``, resumable.

    With a ``state`` (``verify.state.VerifyState``) the attack's record (by its label) is continued
    after its last finished batch, or taken whole when finished; the finished batches are saved at
    most every ``save_every`` seconds, when the attack ends, and when it is interrupted (Ctrl-C or
    an error), so at most the batch in flight is lost. Each adversarial image is checked against the
    budget before it is scored.

    Returns:
        ``(robust flag per target, queries, seconds, origin)``; queries and seconds include the work
        a state file holds; origin is ``"ran"``, ``"resumed"`` or ``"reused"``.

    Raises:
        RuntimeError: the attack returned an image outside its eps-ball or outside [0, 1] (a bug).
    """
    y, total, label = pack.y, len(targets), attack.label
    robust = np.zeros(total, dtype=bool)
    first, queries_before, seconds_before, origin = 0, 0, 0.0, "ran"
    rec = state.record(label) if state is not None else None
    if rec is not None and rec.total != total:  # cannot happen with equal keys and clean flags; never trust it
        announce("discarded", label, 0, rec.total, rec.seconds)
        rec = None
    if rec is not None and rec.done > 0:
        robust[:rec.done] = rec.per_sample[targets[:rec.done]]
        first, queries_before, seconds_before = rec.done, int(rec.queries or 0), rec.seconds
        origin = "reused" if rec.finished else "resumed"
        announce(origin, label, rec.done, total, rec.seconds)
        log.debug("%s: %s at %d/%d from %s", label, origin, rec.done, total, state.path)
        if rec.finished:
            if progress is not None:
                progress(total, total, stage=label)
            return robust, queries_before, seconds_before, origin
    if state is not None:
        per_sample = np.zeros(pack.n, dtype=bool)
        per_sample[targets[:first]] = robust[:first]
        rec = AttackRecord(label, attack.name, attack.eps, attack.describe(), total, first, seconds_before, per_sample,
                           device=str(state.key.provider or state.key.backend), batch_size=batch_size,
                           queries=queries_before)
        state.put(rec)
    queries = [0]

    def predict(batch: np.ndarray) -> np.ndarray:
        queries[0] += len(batch)
        return backend.predict(batch, batch_size=batch_size)

    t0 = last_save = time.perf_counter()
    unsaved = False
    base_seed = attack.seed
    if progress is not None:
        progress(first, total, stage=label)
    try:
        for s in range(first, total, batch_size):
            pos = targets[s:s + batch_size]
            attack.seed = seed + s // batch_size  # each batch its own seeded search: resumable
            xb = pack.x[pos]
            x_adv = np.asarray(attack.run_numpy(predict, xb, y[pos], num_classes=num_classes), dtype=np.float32)
            dist = float(np.abs(x_adv - xb).max()) if len(xb) else 0.0
            if x_adv.shape != xb.shape or dist > pack.eps + EPS_TOLERANCE or \
                    (len(x_adv) and (x_adv.min() < 0 or x_adv.max() > 1)):
                raise RuntimeError(f"{label} broke its budget: max |x_adv - x| = {dist:.3g} (eps {format_eps(pack.eps)})")
            done = s + len(pos)
            out = predict(x_adv)
            robust[s:done] = (out.argmax(1) == y[pos]) & np.isfinite(out).all(axis=1)  # NaN/inf: no prediction
            if rec is not None:
                rec.per_sample[pos] = robust[s:done]
                rec.done, rec.queries = done, queries_before + queries[0]
                rec.seconds = seconds_before + time.perf_counter() - t0
                unsaved = True
                if done < total and time.perf_counter() - last_save >= save_every:
                    save()
                    last_save, unsaved = time.perf_counter(), False
            if progress is not None:
                progress(done, total, stage=label)
    except BaseException:
        if unsaved:  # Ctrl-C or a failure: keep the batches that finished
            save()
        raise
    finally:
        attack.seed = base_seed
    seconds = seconds_before + time.perf_counter() - t0
    if rec is not None:
        rec.done, rec.seconds = total, seconds
        save()
    return robust, queries_before + queries[0], seconds, origin


__all__ = ["create_live_attacks", "family_of", "live_families", "live_size", "run_live_attack"]
