"""Robustness measured again on the runtime: the attack cascade with per-sample flags, and ``run``.

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

``run`` wraps it: checks gates, pack and artifact before any work, then evaluates, runs the
sanity checks, judges the gates and returns a ``VerifyReport``. Nothing here imports torch.

Resumable (``verify.state``): with a ``VerifyState`` (``run(..., state_path=FILE)``) each live
attack's finished batches are saved as it goes and a later call continues after the last one (or
takes a finished attack whole); steps 1-2 are cheap and always measured again (the state
module's docstring says why). Per-batch seeds make a resumed report's numbers equal an
uninterrupted run's. A call holds its state file's lock (``lock.file_lock``, ``.FILE.lock`` beside
it) throughout: a second verify with the same ``--state`` meanwhile is refused (exit 2).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import numpy as np

from ciard_deploy.attacks.state import SAVE_EVERY_S, StateEvent, settings_differences, state_hooks
from ciard_deploy.errors import UsageError
from ciard_deploy.lock import holding
from ciard_deploy.options.live import resolve_live
from ciard_deploy.runtime.parity import Parity, compare
from ciard_deploy.verify.live import create_live_attacks, family_of, live_families, live_size, run_live_attack
from ciard_deploy.verify.pack import ArtifactSection, RobustnessPack, worst_case_label
from ciard_deploy.verify.parity import ParityReport
from ciard_deploy.verify.state import VerifyState

if TYPE_CHECKING:  # pragma: no cover
    from ciard_deploy.options.gates import Gates
    from ciard_deploy.verify.gates import Policy
    from ciard_deploy.verify.report import VerifyReport

log = logging.getLogger(__name__)

#: ``progress(done, total, stage=...)``: stage ``"inference"`` (clean + transferred images) or a live attack's label
Progress = Callable[..., None]

DEFAULT_BATCH = 256
#: images run twice to detect a non-deterministic runtime
DETERMINISM_IMAGES = 64

#: What a mismatching ``--state`` file's error ends with (the CLI's way out).
MISMATCH_HINT = "the file was left as it is: pass --fresh to discard it, or give another --state file"


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
        from ciard_deploy.attacks.base import format_eps

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


# --------------------------------------------------------------------------- the entry point
@holding("state_path", file=True, hint="wait for it or use another --state")
def run(artifact: str | os.PathLike, pack: str | os.PathLike | RobustnessPack, *, provider: str | None = None,
        gates: Gates | None = None, policy: Policy | None = None, live: str | Sequence[str] | None = None,
        live_n: int | None = None,
        batch_size: int = DEFAULT_BATCH, seed: int = 0, threads: int | None = None,
        progress: Progress | None = None, state_path: str | os.PathLike | None = None, fresh: bool = False,
        on_state: Callable[[StateEvent], None] | None = None, save_every: float = SAVE_EVERY_S,
        square_queries: int | None = None, square_n: int | None = None) -> VerifyReport:
    """Verifies an exported artifact on its runtime against a robustness pack.

    Order of work, so that bad input costs nothing: gates and settings (the live attacks
    included); the state file (if any: a folder or a file that is not a verify state is refused);
    the pack (fully validated); the artifact opened in its runtime; pack <-> artifact
    compatibility; the state's key; then the evaluation, the checks and the gates.

    With ``state_path`` the verification is resumable (see ``verify.state``): the file is created
    if absent and saved as the live attacks go (after their finished batches, at most every
    ``save_every`` seconds, and on Ctrl-C). If it exists it must hold the same verification
    (artifact sha256, pack checksum, backend and provider, live n, seed, eps, batch size) and,
    for each live attack it holds that is asked for again, the same settings: the clean and
    transfer phase is measured again and each live attack continues after its last saved batch,
    or is taken whole if it finished (``on_state`` hears of it); live attacks the file lacks run.
    The report's numbers equal an uninterrupted run's. ``fresh`` discards what the file holds and
    starts over.

    Args:
        artifact: ``.onnx`` (onnxruntime), ``.engine``/``.plan`` (TensorRT), or a checkpoint/run dir (PyTorch).
        pack: path of a pack built by ``ciard pack`` (or a loaded ``RobustnessPack``).
        provider: onnxruntime execution provider (``cpu``, ``cuda``, ``tensorrt``) or torch device.
        gates: a ``Gates`` (None: no gates; the report is then ``not_gated`` unless a warning fails).
        policy: how warnings are judged (``gates.Policy``; None: the default, where a warning saying the
            numbers are not about this artifact, V103/V104/V105/V109, fails the report).
        live: query-only attacks run live on the runtime (specs: ``["square1000"]`` or
            ``"square1000,square5000"``; None: ``options.live.DEFAULT_LIVE``; ``[]``/``"none"``: none).
        live_n: images the live attacks attack (seeded, class-stratified subset; None: all).
        batch_size: images per runtime call.
        seed: seed of the live subset and of the live attacks' batches.
        threads: onnxruntime intra-op threads (None: its default).
        progress: ``callback(done, total, stage=...)``.
        state_path: optional state file (JSON) that makes the run resumable.
        fresh: with ``state_path``: discard what the file holds (never a file of another kind).
        on_state: optional ``callback(StateEvent)`` for what is taken from the state; the CLI prints one line.
        save_every: seconds between saves of finished live-attack batches (0: after every batch).
        square_queries: deprecated alias: ``live=[square<N>]`` (0: none).
        square_n: deprecated alias of ``live_n``.

    Returns:
        the ``VerifyReport`` (``report.status``: passed, failed or not_gated; ``report.failed`` says
        whether a gate or a warning failed; the caller decides what a failure means: the CLI exits 1).

    Raises:
        UsageError: bad settings or gates (a live attack that needs gradients among them), ``fresh``
            without ``state_path``, a state path that is a folder (exit 2).
        ArtifactError: missing/corrupt pack or artifact, a pack for another input shape or class count, or a
            state file that is not a ciard verify state (left as it is) (exit 2).
        StateMismatch: the state file holds a different verification (an ArtifactError naming each
            difference; the file is left as it is) (exit 2).
        InUse: another ciard process is verifying with the same ``state_path`` (exit 2).
        BackendUnavailable: the runtime or provider is not installed here (exit 3).
        KeyboardInterrupt: Ctrl-C; with ``state_path`` the finished live-attack batches are saved first.
    """
    from ciard_deploy import __version__
    from ciard_deploy.io import library_versions
    from ciard_deploy.runtime import open_backend
    from ciard_deploy.verify import checks
    from ciard_deploy.options.gates import Gates
    from ciard_deploy.verify.gates import Policy, judge, unmeasurable
    from ciard_deploy.verify.pack import checksum_arrays, load_pack
    from ciard_deploy.verify.report import REPORT_KIND, SCHEMA_VERSION, VerifyReport
    from ciard_deploy.verify.state import VerifyKey

    t_start = time.perf_counter()
    gates = gates if gates is not None else Gates()
    specs, live_n = resolve_live(live, live_n, square_queries=square_queries, square_n=square_n)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if fresh and state_path is None:
        raise UsageError("--fresh discards a --state file: give --state too")
    if state_path is not None:
        VerifyState.check_file(state_path)  # a folder or a file of another kind: refused before any work
    p = pack if isinstance(pack, RobustnessPack) else load_pack(pack)
    has_attacks = bool(p.adv)
    missing = unmeasurable(gates, {"clean_acc": True, "clean_drop": True, "agreement_clean": True,
                                   "worst_case_acc": has_attacks or bool(specs),
                                   "robust_drop": has_attacks and p.reference.get("worst_case_acc") is not None,
                                   "agreement_adversarial": has_attacks})
    if missing:
        raise UsageError(f"{'; '.join(missing)}, which this run cannot measure (the pack holds "
                         f"{len(p.adv)} attacks{', no live attack runs (--live none)' if not specs else ''})")
    attacks = create_live_attacks(specs, p.eps, seed=seed, batch_size=batch_size)  # settings checked before work
    t0 = time.perf_counter()
    options = {"threads": threads} if threads and Path(artifact).suffix.lower() == ".onnx" else {}
    backend = open_backend(artifact, provider=provider, **options)
    open_s = time.perf_counter() - t0
    try:
        num_classes = checks.check_compatible(p.input_shape, p.num_classes, backend, artifact)
        metadata = dict(backend.metadata or {})
        if getattr(backend, "name", "") == "torch" and not metadata.get("source_sha256"):
            from ciard_deploy.io import resolve_checkpoint, sha256_file

            metadata["source_sha256"] = sha256_file(resolve_checkpoint(artifact))  # the checkpoint is its own source
        prov, findings, manifest_thresholds = checks.provenance(artifact, metadata, p.model_sha256)
        findings += checks.metadata_mismatches(p.meta, metadata)
        state = None
        if state_path is not None:
            key = VerifyKey.create(
                artifact_sha256=prov.get("sha256") or metadata.get("source_sha256") or "",
                pack_checksum=p.checksum or checksum_arrays(p.arrays()), backend=str(backend.name),
                provider=backend.describe().get("provider", provider), n=p.n, eps=p.eps, live_n=live_n, seed=seed,
                batch_size=batch_size)
            state, _ = VerifyState.open(state_path, key, attacks, fresh=fresh,
                                        info={"artifact": str(artifact), "pack": str(p.path) if p.path else None,
                                              "threads": threads, "versions": library_versions()},
                                        mismatch_hint=MISMATCH_HINT)
        section = p.artifact_for(prov.get("sha256"))
        ev = evaluate_runtime(backend, p, live=specs, live_n=live_n, batch_size=batch_size,
                              seed=seed, progress=progress, state=state,
                              on_state=on_state, save_every=save_every, section=section,
                              is_source=getattr(backend, "name", "") == "torch")
        runtime = backend.describe()
    finally:
        backend.close()

    # ---------------------------------------------------------------- checks
    precision = str(getattr(backend, "precision", "unknown") or "unknown")
    thr_clean = checks.agreement_threshold(precision, manifest_thresholds, gates.min_agreement)
    thr_adv = gates.min_agreement_adv if gates.min_agreement_adv is not None else thr_clean
    found = [checks.check_parity("clean", ev.parity.clean.top1_agreement, ev.parity.clean.flips, ev.parity.clean.n,
                                 thr_clean)]
    adv = ev.parity.adversarial
    if adv is not None:
        found.append(checks.check_parity("adversarial", adv.top1_agreement, adv.flips, adv.n, thr_adv))
    if ev.determinism is not None:
        found.append(checks.check_determinism(*ev.determinism))
    found.append(checks.check_probabilities(ev.logits["clean"]))
    found.append(checks.check_finite(ev.logits))  # V114: fails whatever the policy
    if ev.query and ev.transfer and ev.live_indices is not None:
        idx = ev.live_indices
        best = min(ev.query, key=lambda o: o.robust_acc)  # the strongest live attack
        subset = {o.label: float(o.per_sample[idx].mean()) for o in ev.transfer}  # type: ignore[index]
        found.append(checks.check_live(best.label, best.robust_acc, subset, len(idx)))
    if ev.whitebox and ev.transfer:
        wb = ev.whitebox[0]
        found.append(checks.check_whitebox(wb.label, wb.robust_acc, {o.label: o.robust_acc for o in ev.transfer}, ev.n))
    found += checks.check_coverage(ev.worst_case, section)
    if not ev.attacks:
        found.append(checks.finding("no_adversarial_evaluation", "no attack ran: the pack holds none and no live "
                                                                  "attack runs (--live none)", "info"))
    findings += [f for f in found if f is not None]
    for f in findings:
        log.debug("%s: %s", f.level, f.line())  # the report carries them; the CLI renders them once

    # ---------------------------------------------------------------- gates and the report
    metrics = metrics_of(ev, p)
    results = {
        "n": ev.n, "clean_acc": ev.clean_acc, "reference_clean_acc": float(p.reference["clean_acc"]),
        "attacks": [o.to_dict() for o in ev.attacks],
        "robust_acc": {o.label: o.robust_acc for o in ev.attacks},
        "worst_case": ev.worst_case, "worst_case_transfer": ev.worst_transfer,
    }
    per_sample = {"clean": _bits(ev.clean_correct),
                  **{o.label: _bits(o.per_sample) for o in ev.attacks if o.per_sample is not None},
                  "live_indices": [int(i) for i in ev.live_indices] if ev.live_indices is not None else None}
    artifact_path = Path(artifact)
    artifact_section = {"path": str(artifact_path), "name": artifact_path.name, **prov,
                        "backend": runtime.get("backend"), "provider": runtime.get("provider", provider),
                        "precision": precision, "num_classes": num_classes, "input_spec": runtime.get("input_spec"),
                        "active_providers": runtime.get("active_providers"), "metadata": metadata}
    settings = {"live_attacks": list(specs), "live_n": live_n, "batch_size": batch_size, "seed": seed, "provider": provider, "threads": threads,
                "state": None if state_path is None else str(state_path),
                "parity_thresholds": {"clean": thr_clean, "adversarial": thr_adv if adv is not None else None}}
    timings = {"open_s": round(open_s, 4), **ev.timings, "total_s": round(time.perf_counter() - t_start, 4)}
    return VerifyReport(
        kind=REPORT_KIND, schema_version=SCHEMA_VERSION, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        tool=f"ciard-deploy {__version__}", artifact=artifact_section, pack=p.summary(), settings=settings,
        results=results, parity=ev.parity.to_dict(), metrics=metrics, gates=gates.to_dict(),
        gate_results=judge(gates, metrics), warnings=findings, policy=(policy or Policy()).to_dict(),
        timings=timings, versions=library_versions(),
        per_sample=per_sample)


def _bits(flags: np.ndarray | None) -> str:
    """Per-sample flags as a compact ``"1101..."`` string for the JSON report."""
    return "" if flags is None else "".join("1" if f else "0" for f in np.asarray(flags, bool))


__all__ = ["AttackOutcome", "DEFAULT_BATCH", "MISMATCH_HINT", "RuntimeEvaluation", "evaluate_runtime", "metrics_of",
           "run", "stratified_subset"]
