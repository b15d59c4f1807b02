"""Robustness measured again on the runtime: the attack cascade with per-sample flags, and ``run``.

``evaluate_runtime`` runs, on any ``Backend`` (onnxruntime, TensorRT, PyTorch):

1. clean: the runtime's predictions on the pack's clean images;
2. transfer: its predictions on each attack's adversarial images from the pack (crafted on the
   PyTorch model), so a sample is robust under an attack if it is correct on clean *and* on
   that attack's image (AutoAttack's per-sample flags);
3. query-only: Square run live against the runtime (scores only, no gradients, no torch),
   started from the clean images of the samples the runtime classifies correctly, batched
   across images;
4. the per-sample worst case over all of them, and parity with the pack's reference logits.

``run`` wraps it: checks gates, pack and artifact before any work, then evaluates, runs the
sanity checks, judges the gates and returns a ``VerifyReport``. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np

from ciard_deploy.errors import UsageError
from ciard_deploy.runtime.parity import Parity, compare
from ciard_deploy.verify.pack import EPS_TOLERANCE, RobustnessPack, worst_case_label
from ciard_deploy.verify.parity import ParityReport

if TYPE_CHECKING:  # pragma: no cover
    from ciard_deploy.verify.gates import Gates
    from ciard_deploy.verify.report import VerifyReport

log = logging.getLogger(__name__)

#: ``progress(done, total, stage=...)``: stage ``"inference"`` (clean + transferred images) or Square's label
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
        kind: ``"transfer"`` (images from the pack) or ``"query"`` (run live on the runtime).
        eps: L-inf budget.
        n: samples it covers (all pack samples for transfer; Square's subset otherwise).
        robust_acc: fraction of those samples correct on clean and under the attack.
        reference_acc: the PyTorch model's number for the same attack from the pack (transfer only).
        seconds: wall time (inference for transfer; the whole attack for Square).
        settings: the attack's settings (budget, options) as recorded in the pack or run here.
        queries: forward passes (images) the runtime served for this attack.
        per_sample: bool flags, one per covered sample.
        indices: pack positions of the covered samples (None: all, in order).
    """

    name: str
    label: str
    kind: Literal["transfer", "query"]
    eps: float
    n: int
    robust_acc: float
    reference_acc: float | None
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    queries: int = 0
    per_sample: np.ndarray | None = field(default=None, repr=False)
    indices: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        from ciard_deploy.attacks.base import format_eps

        drop = None if self.reference_acc is None else self.reference_acc - self.robust_acc
        return {"name": self.name, "label": self.label, "kind": self.kind, "eps": self.eps,
                "eps_label": format_eps(self.eps), "n": self.n, "robust_acc": self.robust_acc,
                "reference_acc": self.reference_acc, "drop": drop, "seconds": round(self.seconds, 4),
                "queries": self.queries, "settings": self.settings}


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
    square_indices: np.ndarray | None = None
    determinism: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    logits: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def transfer(self) -> list[AttackOutcome]:
        return [a for a in self.attacks if a.kind == "transfer"]

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


def _predict_all(backend: Any, x: np.ndarray, batch_size: int, tick: Callable[[int], None]) -> np.ndarray:
    outs = []
    for s in range(0, len(x), batch_size):
        outs.append(backend.predict(x[s:s + batch_size], batch_size=batch_size))
        tick(len(outs[-1]))
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def evaluate_runtime(backend: Any, pack: RobustnessPack, *, square_queries: int = 1000, square_n: int | None = None,
                     batch_size: int = DEFAULT_BATCH, seed: int = 0, square_p_init: float = 0.8,
                     progress: Progress | None = None) -> RuntimeEvaluation:
    """Clean, transferred and query-only robustness of ``backend`` on ``pack``, AutoAttack-style.

    Args:
        backend: an open runtime backend (``predict(images) -> logits``).
        pack: a loaded, validated pack whose shape and classes fit the backend.
        square_queries: Square's query budget per image; 0 turns Square off.
        square_n: images Square attacks (a seeded class-stratified subset of the pack; None: all).
        batch_size: images per runtime call (and per Square batch).
        seed: seed of the Square subset and of Square's randomness.
        square_p_init: Square's initial square size (fraction of pixels).
        progress: ``callback(done, total, stage=...)``.

    Returns:
        the ``RuntimeEvaluation``.
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    n, y = pack.n, pack.y
    total_inf = n * (1 + len(pack.adv))
    done = [0]

    def tick(k: int) -> None:
        done[0] += k
        if progress is not None:
            progress(done[0], total_inf, stage="inference")

    # ---------------------------------------------------------------- clean + transfer
    tick(0)
    t_inf = time.perf_counter()
    t0 = time.perf_counter()
    logits_clean = _predict_all(backend, pack.x, batch_size, tick)
    clean_s = time.perf_counter() - t0
    clean_correct = logits_clean.argmax(1) == y
    logits: dict[str, np.ndarray] = {"clean": logits_clean}
    ref = pack.reference
    outcomes: list[AttackOutcome] = []
    per_attack_parity: dict[str, Parity] = {}
    for a, xa, la_ref in zip(pack.attacks, pack.adv, pack.logits_adv):
        t0 = time.perf_counter()
        la = _predict_all(backend, xa, batch_size, tick)
        seconds = time.perf_counter() - t0
        flags = clean_correct & (la.argmax(1) == y)
        logits[a["label"]] = la
        per_attack_parity[a["label"]] = compare(la_ref, la)
        outcomes.append(AttackOutcome(
            name=a["name"], label=a["label"], kind="transfer", eps=float(a["eps"]), n=n,
            robust_acc=float(flags.mean()), reference_acc=ref.get("robust_acc", {}).get(a["label"]), seconds=seconds,
            settings={**a.get("settings", {}), "source": a.get("source", "crafted on the PyTorch model")},
            queries=n, per_sample=flags))
    inference_s = time.perf_counter() - t_inf
    parity = ParityReport(clean=compare(pack.logits_clean, logits_clean), per_attack=per_attack_parity)
    k_det = min(DETERMINISM_IMAGES, n)
    determinism = (logits_clean[:k_det], backend.predict(pack.x[:k_det], batch_size=batch_size))

    worst_transfer = None
    wt_flags = clean_correct.copy()
    for o in outcomes:
        wt_flags &= o.per_sample  # type: ignore[arg-type]
    if outcomes:
        worst_transfer = {"label": worst_case_label([o.to_dict() for o in outcomes]), "acc": float(wt_flags.mean()),
                          "n": n, "attacks": [o.label for o in outcomes],
                          "reference_acc": ref.get("worst_case_acc")}

    # ---------------------------------------------------------------- Square, live on the runtime
    square_idx = None
    square_s = 0.0
    worst_case = dict(worst_transfer) if worst_transfer else None
    if worst_case:
        worst_case.pop("reference_acc", None)
    if square_queries:
        from ciard_deploy.attacks.base import create_attack

        k = n if square_n is None else min(int(square_n), n)
        square_idx = stratified_subset(y, k, seed)
        attack = create_attack(f"square{int(square_queries)}", pack.eps, seed=seed, batch_size=batch_size,
                               p_init=square_p_init)
        targets = square_idx[clean_correct[square_idx]]
        queries = [0]

        def predict(batch: np.ndarray) -> np.ndarray:
            queries[0] += len(batch)
            return backend.predict(batch, batch_size=batch_size)

        num_classes = int(logits_clean.shape[1])
        robust_t = np.zeros(len(targets), dtype=bool)
        t0 = time.perf_counter()
        if progress is not None:
            progress(0, len(targets), stage=attack.label)
        for i, s in enumerate(range(0, len(targets), batch_size)):
            pos = targets[s:s + batch_size]
            attack.seed = seed + i  # each batch its own (seeded) random search
            xb = pack.x[pos]
            x_adv = attack.run_numpy(predict, xb, y[pos], num_classes=num_classes)
            dist = float(np.abs(x_adv - xb).max()) if len(xb) else 0.0
            if dist > pack.eps + EPS_TOLERANCE or (len(x_adv) and (x_adv.min() < 0 or x_adv.max() > 1)):
                raise RuntimeError(f"{attack.label} broke its budget: max |x_adv - x| = {dist:.3g} (eps {pack.eps:.3g})")
            robust_t[s:s + len(pos)] = predict(x_adv).argmax(1) == y[pos]
            if progress is not None:
                progress(min(s + batch_size, len(targets)), len(targets), stage=attack.label)
        square_s = time.perf_counter() - t0
        flags = np.zeros(k, dtype=bool)
        flags[np.searchsorted(square_idx, targets)] = robust_t
        outcomes.append(AttackOutcome(
            name=attack.name, label=attack.label, kind="query", eps=pack.eps, n=k, robust_acc=float(flags.mean()),
            reference_acc=None, seconds=square_s,
            settings={**attack.describe(), "seed": seed, "batch_size": batch_size, "started_from": "clean images",
                      "attacked": int(len(targets)), "subset": "all" if k == n else f"{k} of {n}, class-stratified",
                      "implementation": "ART SquareAttack + BlackBoxClassifierNeuralNetwork on the runtime's logits"},
            queries=queries[0], per_sample=flags, indices=square_idx))
        all_flags = wt_flags[square_idx] & flags
        worst_case = {"label": worst_case_label([o.to_dict() for o in outcomes]), "acc": float(all_flags.mean()),
                      "n": k, "attacks": [o.label for o in outcomes]}
    stats = backend.stats
    timings = {"clean_s": round(clean_s, 4), "transfer_s": round(inference_s - clean_s, 4),
               "inference_s": round(inference_s, 4), "inference_images": total_inf,
               "inference_images_per_s": round(total_inf / inference_s, 1) if inference_s > 0 else None,
               "square_s": round(square_s, 4),
               "square_s_per_100_images": round(100 * square_s / len(square_idx), 4)
               if square_idx is not None and len(square_idx) else None,
               "runtime": stats.to_dict() if hasattr(stats, "to_dict") else None}
    return RuntimeEvaluation(n=n, clean_acc=float(clean_correct.mean()), clean_correct=clean_correct,
                             attacks=outcomes, worst_transfer=worst_transfer, worst_case=worst_case, parity=parity,
                             timings=timings, square_indices=square_idx, determinism=determinism, logits=logits)


def metrics_of(ev: RuntimeEvaluation, pack: RobustnessPack) -> dict[str, float | None]:
    """The flat numbers gates judge (see ``verify.gates``), plus a few for readers."""
    ref = pack.reference
    adv = ev.parity.adversarial
    wt = ev.worst_transfer
    square = ev.query[0] if ev.query else None
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
        "square_acc": square.robust_acc if square else None,
    }


# --------------------------------------------------------------------------- the entry point
def run(artifact: str | os.PathLike, pack: str | os.PathLike | RobustnessPack, *, provider: str | None = None,
        gates: Gates | None = None, square_queries: int = 1000, square_n: int | None = None,
        batch_size: int = DEFAULT_BATCH, seed: int = 0, threads: int | None = None, square_p_init: float = 0.8,
        progress: Progress | None = None) -> VerifyReport:
    """Verifies an exported artifact on its runtime against a robustness pack.

    Order of work, so that bad input costs nothing: gates and settings; the pack (fully
    validated); the artifact opened in its runtime; pack <-> artifact compatibility; then the
    evaluation, the checks and the gates.

    Args:
        artifact: ``.onnx`` (onnxruntime), ``.engine``/``.plan`` (TensorRT), or a checkpoint/run dir (PyTorch).
        pack: path of a pack built by ``ciard pack`` (or a loaded ``RobustnessPack``).
        provider: onnxruntime execution provider (``cpu``, ``cuda``, ``tensorrt``) or torch device.
        gates: a ``Gates`` (None: no gates; the report then always passes).
        square_queries: Square's query budget per image on the runtime; 0 turns it off.
        square_n: images Square attacks (seeded, class-stratified subset; None: all).
        batch_size: images per runtime call.
        seed: seed of Square and its subset.
        threads: onnxruntime intra-op threads (None: its default).
        square_p_init: Square's initial square size.
        progress: ``callback(done, total, stage=...)``.

    Returns:
        the ``VerifyReport`` (``report.passed`` says whether every gate passed; the caller
        decides what a failure means: the CLI exits 1).

    Raises:
        UsageError: bad settings or gates (exit 2).
        ArtifactError: missing/corrupt pack or artifact, or a pack for another input shape or class count (exit 2).
        BackendUnavailable: the runtime or provider is not installed here (exit 3).
    """
    from ciard_deploy import __version__
    from ciard_deploy.io import library_versions
    from ciard_deploy.runtime import open_backend
    from ciard_deploy.verify import checks
    from ciard_deploy.verify.gates import Gates, judge, unmeasurable
    from ciard_deploy.verify.pack import load_pack
    from ciard_deploy.verify.report import REPORT_KIND, SCHEMA_VERSION, VerifyReport

    t_start = time.perf_counter()
    gates = gates if gates is not None else Gates()
    if square_queries < 0 or square_queries == 1:
        raise UsageError(f"--square-queries must be 0 (off) or >= 2, got {square_queries}")
    if square_n is not None and square_n < 1:
        raise UsageError(f"--square-n must be >= 1, got {square_n}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if not 0.0 < square_p_init < 1.0:
        raise UsageError(f"square p_init must be in (0, 1), got {square_p_init}")
    p = pack if isinstance(pack, RobustnessPack) else load_pack(pack)
    has_attacks = bool(p.adv)
    missing = unmeasurable(gates, {"clean_acc": True, "clean_drop": True, "agreement_clean": True,
                                   "worst_case_acc": has_attacks or square_queries > 0,
                                   "robust_drop": has_attacks and p.reference.get("worst_case_acc") is not None,
                                   "agreement_adversarial": has_attacks})
    if missing:
        raise UsageError(f"{'; '.join(missing)}, which this run cannot measure (the pack holds "
                         f"{len(p.adv)} attacks{', Square is off' if not square_queries else ''})")
    if square_queries:
        from ciard_deploy.attacks.base import create_attack

        create_attack(f"square{int(square_queries)}", p.eps, p_init=square_p_init)  # settings checked before work
    t0 = time.perf_counter()
    options = {"threads": threads} if threads and Path(artifact).suffix.lower() == ".onnx" else {}
    backend = open_backend(artifact, provider=provider, **options)
    open_s = time.perf_counter() - t0
    try:
        num_classes = checks.check_compatible(p.input_shape, p.num_classes, backend, artifact)
        if square_queries:
            from ciard_deploy.attacks.square import _import_art

            _import_art()  # ART missing is exit 3 before any inference
        metadata = dict(backend.metadata or {})
        if getattr(backend, "name", "") == "torch" and not metadata.get("source_sha256"):
            from ciard_deploy.io import resolve_checkpoint, sha256_file

            metadata["source_sha256"] = sha256_file(resolve_checkpoint(artifact))  # the checkpoint is its own source
        prov, findings, manifest_thresholds = checks.provenance(artifact, metadata, p.model_sha256)
        findings += checks.metadata_mismatches(p.meta, metadata)
        ev = evaluate_runtime(backend, p, square_queries=square_queries, square_n=square_n, batch_size=batch_size,
                              seed=seed, square_p_init=square_p_init, progress=progress)
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
    if ev.query and ev.transfer and ev.square_indices is not None:
        idx = ev.square_indices
        sq = ev.query[0]
        subset = {o.label: float(o.per_sample[idx].mean()) for o in ev.transfer}  # type: ignore[index]
        found.append(checks.check_square(sq.label, sq.robust_acc, subset, len(idx)))
    if not ev.attacks:
        found.append(checks.finding("no_adversarial_evaluation", "no attack ran: the pack holds none and Square is off",
                                    "info"))
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
                  "square_indices": [int(i) for i in ev.square_indices] if ev.square_indices is not None else None}
    artifact_path = Path(artifact)
    artifact_section = {"path": str(artifact_path), "name": artifact_path.name, **prov,
                        "backend": runtime.get("backend"), "provider": runtime.get("provider", provider),
                        "precision": precision, "num_classes": num_classes, "input_spec": runtime.get("input_spec"),
                        "active_providers": runtime.get("active_providers"), "metadata": metadata}
    settings = {"square_queries": int(square_queries), "square_n": square_n, "square_p_init": square_p_init,
                "batch_size": batch_size, "seed": seed, "provider": provider, "threads": threads,
                "parity_thresholds": {"clean": thr_clean, "adversarial": thr_adv if adv is not None else None}}
    timings = {"open_s": round(open_s, 4), **ev.timings, "total_s": round(time.perf_counter() - t_start, 4)}
    return VerifyReport(
        kind=REPORT_KIND, schema_version=SCHEMA_VERSION, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        tool=f"ciard-deploy {__version__}", artifact=artifact_section, pack=p.summary(), settings=settings,
        results=results, parity=ev.parity.to_dict(), metrics=metrics, gates=gates.to_dict(),
        gate_results=judge(gates, metrics), warnings=findings, timings=timings, versions=library_versions(),
        per_sample=per_sample)


def _bits(flags: np.ndarray | None) -> str:
    """Per-sample flags as a compact ``"1101..."`` string for the JSON report."""
    return "" if flags is None else "".join("1" if f else "0" for f in np.asarray(flags, bool))


__all__ = ["AttackOutcome", "DEFAULT_BATCH", "RuntimeEvaluation", "evaluate_runtime", "metrics_of", "run",
           "stratified_subset"]
