"""What ``ciard verify`` measures on the runtime: the attack tiers with per-sample flags, the worst case
and its coverage, parity with the pack's reference logits, and the flat metrics gates judge.

``evaluate_runtime`` runs, on any ``Backend`` (onnxruntime, TensorRT, PyTorch):

1. clean: the runtime's predictions on the pack's clean images;
2. transfer: its predictions on each attack's adversarial images from the pack (crafted on the
   PyTorch model), so a sample is robust under an attack if it is correct on clean *and* on
   that attack's image (AutoAttack's per-sample flags);
3. live (query-only): each of the ``live`` attacks (``square1000``; any registered attack that
   needs no gradients) run against the runtime (scores only, no torch) on one seeded
   class-stratified subset, started from the clean images of the samples the runtime classifies
   correctly, batched across images, batch ``i`` seeded ``seed + i`` (``verify.live``);
4. the per-sample worst case over all of them, and parity with the pack's reference logits.

Resumable (``verify.state``): with a ``VerifyState`` each live attack's finished batches are saved
as it goes and a later call continues after the last one (or takes a finished attack whole);
steps 1-2 are cheap and always measured again (the state module's docstring says why). Per-batch
seeds make a resumed report's numbers equal an uninterrupted run's.

The whole verification (inputs checked, the runtime opened, sanity checks, gates, the report) is
``verify.verification.run``. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np

from ciard_deploy.attacks.budget import format_eps
from ciard_deploy.attacks.results import worst_case_label
from ciard_deploy.errors import UsageError
from ciard_deploy.options.live import resolve_live
from ciard_deploy.resume import SAVE_EVERY_S, StateEvent, settings_differences, state_hooks
from ciard_deploy.runtime.parity_metrics import Parity, compare
from ciard_deploy.verify.live import create_live_attacks, family_of, live_families, live_size, run_live_attack
from ciard_deploy.verify.pack import ArtifactSection, RobustnessPack
from ciard_deploy.verify.parity_report import ParityReport
from ciard_deploy.verify.state import VerifyState

log = logging.getLogger(__name__)

#: ``progress(done, total, stage=...)``: stage ``"inference"`` (clean + transferred images) or a live attack's label
Progress = Callable[..., None]

DEFAULT_BATCH = 256
#: images run twice to detect a non-deterministic runtime
DETERMINISM_IMAGES = 64


@dataclass
class AttackOutcome:
    """One attack's result on the runtime.

    Attributes:
        name: ``pgd20``, ``square1000``.
        label: name and budget, ``pgd20@8/255``.
        kind: ``"whitebox"`` (the pack's images crafted on this artifact through its twin, scored
            on its runtime), ``"transfer"`` (the pack's images crafted on the PyTorch model) or
            ``"query"`` (run live on the runtime).
        eps: L-inf budget.
        n: samples it covers (all pack samples for transfer and white-box; the live subset for query).
        robust_acc: fraction of those samples correct on clean and under the attack.
        reference_acc: the pack's number for the same images: the PyTorch model's (transfer), the
            artifact's runtime on the machine that built the pack (whitebox); None for query.
        seconds: wall time (inference for transfer; the whole attack for a live one).
        settings: the attack's settings (budget, options) as recorded in the pack or run here.
        queries: forward passes (images) the runtime served for this attack.
        per_sample: bool flags, one per covered sample.
        indices: pack positions of the covered samples (None: all, in order).
        origin: ``"ran"`` (measured by this call), ``"resumed"`` (a live attack continued from a
            state file's finished batches) or ``"reused"`` (taken whole from a state file); the
            numbers are the same either way, ``seconds`` counts every call that worked on it.
    """

    name: str
    label: str
    kind: Literal["whitebox", "transfer", "query"]
    eps: float
    n: int
    robust_acc: float
    reference_acc: float | None
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    queries: int = 0
    per_sample: np.ndarray | None = field(default=None, repr=False)
    indices: np.ndarray | None = field(default=None, repr=False)
    origin: str = "ran"

    def to_dict(self) -> dict[str, Any]:
        drop = None if self.reference_acc is None else self.reference_acc - self.robust_acc
        return {"name": self.name, "label": self.label, "kind": self.kind, "eps": self.eps,
                "eps_label": format_eps(self.eps), "n": self.n, "robust_acc": self.robust_acc,
                "reference_acc": self.reference_acc, "drop": drop, "seconds": round(self.seconds, 4),
                "queries": self.queries, "origin": self.origin, "settings": self.settings}


@dataclass
class RuntimeEvaluation:
    """Everything ``evaluate_runtime`` measured (arrays kept for tests and benchmarks)."""

    n: int
    clean_acc: float
    clean_correct: np.ndarray
    attacks: list[AttackOutcome]
    worst_transfer: dict[str, Any] | None
    worst_case: dict[str, Any] | None
    parity: ParityReport
    timings: dict[str, Any]
    live_indices: np.ndarray | None = None
    determinism: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    logits: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def transfer(self) -> list[AttackOutcome]:
        return [a for a in self.attacks if a.kind == "transfer"]

    @property
    def whitebox(self) -> list[AttackOutcome]:
        return [a for a in self.attacks if a.kind == "whitebox"]

    @property
    def query(self) -> list[AttackOutcome]:
        return [a for a in self.attacks if a.kind == "query"]

    def __getitem__(self, label: str) -> AttackOutcome:
        for a in self.attacks:
            if label in (a.label, a.name):
                return a
        raise KeyError(f"no attack {label!r}; have: {', '.join(a.label for a in self.attacks)}")


def stratified_subset(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded, class-stratified subset of ``k`` samples (all if ``k >= n``)."""
    n = len(labels)
    if k >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    quota, rest = divmod(k, len(classes))
    chosen, leftovers = [], []
    for i, c in enumerate(classes):
        take = quota + (1 if i < rest else 0)
        chosen.append(pools[c][:take])
        leftovers.append(pools[c][take:])
    got = sum(len(c) for c in chosen)
    if got < k:
        pool = rng.permutation(np.concatenate(leftovers))
        chosen.append(pool[:k - got])
    return np.sort(np.concatenate(chosen))


def _correct(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per image: the top-1 class is the label and every logit is finite (a NaN/inf row predicts nothing; V114)."""
    return (logits.argmax(1) == y) & np.isfinite(logits).all(axis=1)


def _predict_all(backend: Any, x: np.ndarray, batch_size: int, tick: Callable[[int], None]) -> np.ndarray:
    outs = []
    for s in range(0, len(x), batch_size):
        outs.append(backend.predict(x[s:s + batch_size], batch_size=batch_size))
        tick(len(outs[-1]))
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def evaluate_runtime(backend: Any, pack: RobustnessPack, *, live: str | Sequence[str] | None = None,
                     live_n: int | None = None, batch_size: int = DEFAULT_BATCH, seed: int = 0,
                     progress: Progress | None = None, state: VerifyState | None = None,
                     on_state: Callable[[StateEvent], None] | None = None,
                     save_every: float = SAVE_EVERY_S, section: ArtifactSection | None = None,
                     is_source: bool = False, square_queries: int | None = None,
                     square_n: int | None = None) -> RuntimeEvaluation:
    """Clean, transferred and query-only robustness of ``backend`` on ``pack``, AutoAttack-style.

    With a ``state`` (``verify.state.VerifyState`` for these settings) the live attacks are
    resumable: the clean and transfer phase is measured (it is cheap), its clean flags are stored,
    and each live attack continues after the state's last finished batch of it (or is taken whole
    when it finished). When the state has a ``path`` it is saved there (atomically) after the
    transfer phase, after finished batches (at most every ``save_every`` seconds), when an attack
    ends, and when it is interrupted (Ctrl-C or an error), so at most the batch in flight is lost.
    If the runtime's clean flags differ from the state's (a non-deterministic runtime), the saved
    batches no longer apply: they are discarded and the live attacks run again.

    Args:
        backend: an open runtime backend (``predict(images) -> logits``).
        pack: a loaded, validated pack whose shape and classes fit the backend.
        live: query-only attack specs run live, in order (``["square1000"]``, or ``"square1000,square5000"``);
            None: ``options.live.DEFAULT_LIVE``; ``[]`` or ``"none"``: none.
        live_n: images the live attacks attack (one seeded class-stratified subset of the pack; None: all).
        batch_size: images per runtime call (and per live-attack batch).
        seed: seed of the live subset; each live attack's batch ``i`` (of the attacked samples, in pack
            order) is seeded ``seed + i``, so each batch's outcome does not depend on the others.
        progress: ``callback(done, total, stage=...)``.
        state: optional ``VerifyState`` whose key has these settings; updated in place.
        on_state: optional ``callback(StateEvent)`` when a live attack is taken from the state
            (``"reused"``, ``"resumed"``) or its saved batches are dropped (``"discarded"``).
        save_every: seconds between saves of finished batches (0: after every batch).
        section: the pack's white-box section for this very artifact (``RobustnessPack.artifact_for``),
            scored here as the "white-box on this artifact" tier; None: the pack has none.
        is_source: the backend runs the pack's own source model (PyTorch), for which the
            transferred attacks are white-box: the worst case is then not an upper bound.
        square_queries: deprecated alias: ``live=[square<N>]`` (0: none).
        square_n: deprecated alias of ``live_n``.

    Returns:
        the ``RuntimeEvaluation``.

    Raises:
        UsageError: bad live attacks or sizes, a bad batch size, or a ``state`` made with other settings.
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    specs, live_n = resolve_live(live, live_n, square_queries=square_queries, square_n=square_n)
    n, y = pack.n, pack.y
    k = live_size(n, live_n)
    attacks = create_live_attacks(specs, pack.eps, seed=seed, batch_size=batch_size)
    if state is not None:
        diffs = state.key.settings_differences(n=n, eps=pack.eps, live_n=k, seed=int(seed), batch_size=int(batch_size))
        for attack in attacks:
            rec = state.record(attack.label)
            if rec is not None:
                diffs += [f"{attack.label} {d}" for d in settings_differences(rec.settings, attack.describe())]
        if diffs:
            raise UsageError(f"the verify state is for other settings: {'; '.join(diffs)}")
    has_wb = section is not None and section.x_adv is not None
    total_inf = n * (1 + len(pack.adv) + int(has_wb))
    done = [0]

    def tick(k: int) -> None:
        done[0] += k
        if progress is not None:
            progress(done[0], total_inf, stage="inference")

    announce, save = state_hooks(state, on_state, log)

    # ---------------------------------------------------------------- clean + transfer
    tick(0)
    t_inf = time.perf_counter()
    t0 = time.perf_counter()
    logits_clean = _predict_all(backend, pack.x, batch_size, tick)
    clean_s = time.perf_counter() - t0
    clean_correct = _correct(logits_clean, y)
    logits: dict[str, np.ndarray] = {"clean": logits_clean}
    ref = pack.reference
    outcomes: list[AttackOutcome] = []
    per_attack_parity: dict[str, Parity] = {}
    for a, xa, la_ref in zip(pack.attacks, pack.adv, pack.logits_adv):
        t0 = time.perf_counter()
        la = _predict_all(backend, xa, batch_size, tick)
        seconds = time.perf_counter() - t0
        flags = clean_correct & _correct(la, y)
        logits[a["label"]] = la
        per_attack_parity[a["label"]] = compare(la_ref, la)
        outcomes.append(AttackOutcome(
            name=a["name"], label=a["label"], kind="transfer", eps=float(a["eps"]), n=n,
            robust_acc=float(flags.mean()), reference_acc=ref.get("robust_acc", {}).get(a["label"]), seconds=seconds,
            settings={**a.get("settings", {}), "source": a.get("source", "crafted on the PyTorch model")},
            queries=n, per_sample=flags))
    if has_wb:
        t0 = time.perf_counter()
        lw = _predict_all(backend, section.x_adv, batch_size, tick)  # type: ignore[union-attr,arg-type]
        seconds = time.perf_counter() - t0
        flags = clean_correct & _correct(lw, y)
        m = section.meta  # type: ignore[union-attr]
        label = str(m.get("label") or "wb")
        logits[label] = lw
        outcomes.insert(0, AttackOutcome(
            name=label.rsplit("@", 1)[0], label=label, kind="whitebox", eps=float(m["eps"]), n=n,
            robust_acc=float(flags.mean()), reference_acc=m.get("robust_acc"), seconds=seconds,
            settings={"source": m.get("source"), "attacks": m.get("attacks", []), "twin": m.get("twin"),
                      "pack_runtime": m.get("runtime"), "pack_seconds": m.get("seconds")},
            queries=n, per_sample=flags))
    inference_s = time.perf_counter() - t_inf
    parity = ParityReport(clean=compare(pack.logits_clean, logits_clean), per_attack=per_attack_parity)
    k_det = min(DETERMINISM_IMAGES, n)
    determinism = (logits_clean[:k_det], backend.predict(pack.x[:k_det], batch_size=batch_size))
    if state is not None:
        if state.clean_correct is not None and not np.array_equal(state.clean_correct, clean_correct):
            for rec in state.attacks:  # the live attacks attacked other samples then: their batches do not apply
                announce("discarded", rec.label, 0, rec.total, rec.seconds)
                log.debug("%s in %s was measured on other clean predictions than the runtime gives now "
                          "(a non-deterministic runtime?): it runs again", rec.label, state.path)
            state.attacks = []
        state.clean_correct = clean_correct.copy()
        save()

    worst_transfer = None
    wt_flags = clean_correct.copy()
    transferred = [o for o in outcomes if o.kind == "transfer"]
    for o in transferred:
        wt_flags &= o.per_sample  # type: ignore[arg-type]
    if transferred:
        worst_transfer = {"label": worst_case_label([o.to_dict() for o in transferred]),
                          "acc": float(wt_flags.mean()), "n": n, "attacks": [o.label for o in transferred],
                          "reference_acc": ref.get("worst_case_acc")}
    full_flags = wt_flags.copy()  # every tier that covers all samples: transfer and white-box on the artifact
    for o in outcomes:
        if o.kind == "whitebox":
            full_flags &= o.per_sample  # type: ignore[arg-type]

    # ---------------------------------------------------------------- live attacks, query-only on the runtime
    live_idx = None
    live_s = 0.0
    worst_case = None
    if outcomes:
        worst_case = {"label": worst_case_label([o.to_dict() for o in outcomes]), "acc": float(full_flags.mean()),
                      "n": n, "attacks": [o.label for o in outcomes]}
    if attacks:
        live_idx = stratified_subset(y, k, seed)
        targets = live_idx[clean_correct[live_idx]]
        all_flags = full_flags[live_idx].copy()
        for attack in attacks:
            settings = attack.describe()  # before the batches re-seed it
            robust_t, queries, seconds, origin = run_live_attack(
                backend, pack, attack, targets, seed=seed, batch_size=batch_size,
                num_classes=int(logits_clean.shape[1]), progress=progress, state=state, announce=announce, save=save,
                save_every=save_every)
            flags = np.zeros(k, dtype=bool)
            flags[np.searchsorted(live_idx, targets)] = robust_t
            all_flags &= flags
            live_s += seconds
            outcomes.append(AttackOutcome(
                name=attack.name, label=attack.label, kind="query", eps=pack.eps, n=k, robust_acc=float(flags.mean()),
                reference_acc=None, seconds=seconds,
                settings={**settings, "seed": seed, "batch_seeds": "seed + batch index", "batch_size": batch_size,
                          "started_from": "clean images", "attacked": int(len(targets)),
                          "subset": "all" if k == n else f"{k} of {n}, class-stratified",
                          "implementation": f"{type(attack).__module__}.{type(attack).__name__} (numpy, live on "
                                            "the runtime)"},
                queries=queries, per_sample=flags, indices=live_idx, origin=origin))
        worst_case = {"label": worst_case_label([o.to_dict() for o in outcomes]), "acc": float(all_flags.mean()),
                      "n": k, "attacks": [o.label for o in outcomes]}
    if worst_case is not None:
        worst_case.update(coverage(outcomes, section, is_source))
    stats = backend.stats
    timings = {"clean_s": round(clean_s, 4), "transfer_s": round(inference_s - clean_s, 4),
               "inference_s": round(inference_s, 4), "inference_images": total_inf,
               "inference_images_per_s": round(total_inf / inference_s, 1) if inference_s > 0 else None,
               "live_s": round(live_s, 4),
               "live_s_per_100_images": round(100 * live_s / len(live_idx), 4)
               if live_idx is not None and len(live_idx) else None,
               "runtime": stats.to_dict() if hasattr(stats, "to_dict") else None}
    return RuntimeEvaluation(n=n, clean_acc=float(clean_correct.mean()), clean_correct=clean_correct,
                             attacks=outcomes, worst_transfer=worst_transfer, worst_case=worst_case, parity=parity,
                             timings=timings, live_indices=live_idx, determinism=determinism, logits=logits)


#: How each tier is named in reports.
TIER_NAMES = {"whitebox": "white-box on this artifact", "transfer": "transferred from PyTorch",
              "query": "query-only on the runtime"}


def coverage(outcomes: list[AttackOutcome], section: ArtifactSection | None, is_source: bool) -> dict[str, Any]:
    """Which tiers a worst case covers, and whether it is only an upper bound on the artifact's robustness.

    The number is an upper bound unless white-box attacks ran on this artifact (through its twin)
    or the artifact is the pack's own PyTorch model (then the transferred attacks are white-box).
    """
    tiers = {kind: [o.label for o in outcomes if o.kind == kind] for kind in TIER_NAMES}
    upper = not (tiers["whitebox"] or (is_source and tiers["transfer"]))
    if section is None:
        why = "the pack holds no white-box attack made on this artifact"
    elif section.skipped:
        why = f"no white-box attack was possible on this artifact: {section.skipped}"
    else:
        why = None
    covers = "; ".join(f"{TIER_NAMES[k]} ({', '.join(v)})" for k, v in tiers.items() if v)
    return {"tiers": tiers, "covers": covers, "upper_bound": upper,
            "upper_bound_reason": (why or "no white-box attack on this artifact") if upper else None}


def _live_worst(ev: RuntimeEvaluation, family: str | None = None) -> float | None:
    """Per-sample worst case over the live attacks (of one registry ``family``, or all) on their subset."""
    flags = [o.per_sample for o in ev.query if family is None or family_of(o.name) == family]
    if not flags:
        return None
    return float(np.logical_and.reduce([np.asarray(f, bool) for f in flags]).mean())


def metrics_of(ev: RuntimeEvaluation, pack: RobustnessPack) -> dict[str, float | None]:
    """The flat numbers gates judge (see ``verify.gates``), plus a few for readers.

    The live attacks give ``live_acc`` (per-sample worst over all of them, on their subset) and one
    ``<family>_acc`` per query-only family of the registry (``square_acc``: the worst over the
    Square attacks that ran; None when none did).
    """
    ref = pack.reference
    adv = ev.parity.adversarial
    wt = ev.worst_transfer
    return {
        "clean_acc": ev.clean_acc,
        "worst_case_acc": ev.worst_case["acc"] if ev.worst_case else None,
        "clean_drop": float(ref["clean_acc"]) - ev.clean_acc,
        "robust_drop": (float(ref["worst_case_acc"]) - wt["acc"]) if wt and ref.get("worst_case_acc") is not None
        else None,
        "agreement_clean": ev.parity.clean.top1_agreement,
        "agreement_adversarial": adv.top1_agreement if adv else None,
        "worst_case_transfer_acc": wt["acc"] if wt else None,
        "reference_clean_acc": float(ref["clean_acc"]),
        "reference_worst_case_acc": ref.get("worst_case_acc"),
        **{f"{family}_acc": _live_worst(ev, family) for family in live_families()},
        "live_acc": _live_worst(ev),
        "whitebox_acc": ev.whitebox[0].robust_acc if ev.whitebox else None,
    }


__all__ = ["AttackOutcome", "DEFAULT_BATCH", "DETERMINISM_IMAGES", "Progress", "RuntimeEvaluation", "TIER_NAMES",
           "coverage", "evaluate_runtime", "metrics_of", "stratified_subset"]
