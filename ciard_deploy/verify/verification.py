"""One verification, from inputs to report: ``run`` checks gates, settings, the state file, the pack and
the artifact before any work, opens the runtime, measures (``verify.measure.evaluate_runtime``), runs
the sanity checks (``verify.checks``), judges the gates and returns a ``VerifyReport``.

A call with a state file holds its lock (``lock.file_lock``, ``.FILE.lock`` beside it) throughout: a
second verify with the same ``--state`` meanwhile is refused (exit 2). Nothing here imports torch.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ciard_deploy import __version__
from ciard_deploy.checkpoints import resolve_checkpoint
from ciard_deploy.errors import UsageError
from ciard_deploy.fingerprint import checksum_arrays, sha256_file
from ciard_deploy.io import library_versions
from ciard_deploy.lock import holding
from ciard_deploy.resume import FRESH_HINT, SAVE_EVERY_S, StateEvent
from ciard_deploy.runtime import backend_for, open_backend
from ciard_deploy.verify import checks
from ciard_deploy.options.gates import Gates
from ciard_deploy.options.live import resolve_live
from ciard_deploy.verify.gates import Policy, judge, unmeasurable
from ciard_deploy.verify.live import create_live_attacks
from ciard_deploy.verify.measure import DEFAULT_BATCH, Progress, evaluate_runtime, metrics_of
from ciard_deploy.verify.pack import RobustnessPack
from ciard_deploy.verify.pack_load import load_pack
from ciard_deploy.verify.report import REPORT_KIND, SCHEMA_VERSION, VerifyReport
from ciard_deploy.verify.state import VerifyKey, VerifyState

log = logging.getLogger(__name__)


@holding("state_path", file=True, hint="wait for it or use another --state")
def run(artifact: str | os.PathLike, pack: str | os.PathLike | RobustnessPack, *, provider: str | None = None,
        gates: Gates | None = None, policy: Policy | None = None, live: str | Sequence[str] | None = None,
        live_n: int | None = None,
        batch_size: int = DEFAULT_BATCH, seed: int = 0, threads: int | None = None,
        progress: Progress | None = None, state_path: str | os.PathLike | None = None, fresh: bool = False,
        on_state: Callable[[StateEvent], None] | None = None, save_every: float = SAVE_EVERY_S,
        square_queries: int | None = None, square_n: int | None = None, name: str | None = None) -> VerifyReport:
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
        name: how the report names the artifact (its tables, ``artifact.name``; default: its file name), e.g.
            ``onnx-int8 (qat)`` for a run folder's QAT artifact (``run_folder.artifact_name``).

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
    # threads where its runtime takes them (a missing file: open_backend says so, whatever its suffix)
    options = backend_for(artifact).thread_options(threads) if threads and Path(artifact).exists() else {}
    backend = open_backend(artifact, provider=provider, **options)
    open_s = time.perf_counter() - t0
    try:
        num_classes = checks.check_compatible(p.input_shape, p.num_classes, backend, artifact)
        metadata = dict(backend.metadata or {})
        if getattr(backend, "name", "") == "torch" and not metadata.get("source_sha256"):
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
                                        mismatch_hint=FRESH_HINT)
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
    artifact_section = {"path": str(artifact_path), "name": name or artifact_path.name, **prov,
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



__all__ = ["run"]
