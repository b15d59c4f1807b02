"""The four stages of ``ciard run`` as adapters over the library, each returning the files it made:

    distill   distill.trainer.run (kind distill; kind train trains the model alone) -> DIR/run/
              (+ training curves in DIR/run/plots/)
    export    export.run(DIR/run, DIR/export, deploy.formats, ...)  -> artifacts + manifest.json
    quantize  (a recipe with quantize: only) quantize_aware finetune + export_qat -> DIR/qat/
              (model.qat.int8.onnx + manifest.json; written as DIR/qat.partial/, renamed once complete)
    pack      verify.pack_build.write_pack(DIR/run, DIR/pack.npz, ...)  -> DIR/pack.npz
              (while it runs, finished attacks in DIR/pack.npz.partial/, removed when the stage is done)
    verify    verify.run(artifact, DIR/pack.npz, gates=...) for every artifact of the manifest (and the
              QAT artifact, reported as onnx-int8-qat, named onnx-int8 (qat)) -> DIR/verify/<format>.json
              (report), .xml (JUnit), .md (Markdown) and .png (chart);
              while it runs, DIR/verify/<format>.state.json (removed when the stage is done)

The trainer and the QAT fine-tuning (torch) are imported when their stage runs; everything else here is
torch-free to import.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ciard_deploy import export
from ciard_deploy.resume import StateMismatch
from ciard_deploy.errors import ArtifactError, CiardError
from ciard_deploy.plots import accuracy_chart, rows_from_reports, safe_training_curves
from ciard_deploy.runtime import BACKENDS
from ciard_deploy.verify.verification import run as verify_run
from ciard_deploy.verify.gates import Policy, gates_from_mapping
from ciard_deploy.verify.pack_build import write_pack
from ciard_deploy.verify.pack_partial import partial_dir
from ciard_deploy.verify.report import VerifyReport
from ciard_deploy.verify.state import VerifyState
from ciard_deploy.workflow.planning import attacked_artifacts, checkpoint_files, pack_eps
from ciard_deploy.workflow.summary import verified_artifacts
from ciard_deploy.workflow.state import QAT_NAME, QAT_REPORT, Action, Layout, report_paths, state_path

log = logging.getLogger(__name__)
Progress = Callable[..., None]


@dataclass
class StageContext:
    """What every stage adapter reads: the recipe, the dir, the call's settings and callbacks."""

    recipe: Any
    layout: Layout
    device: str | None
    threads: int | None
    train_callbacks: list[Any]
    progress: Progress | None
    state: Mapping[str, Any] = field(default_factory=dict)  # workflow.json's data, as the stages update it

    def progress_for(self, name: str) -> Progress | None:
        """A progress callback whose stage labels start with ``name`` (``export check onnx``)."""
        if self.progress is None:
            return None
        outer = self.progress

        def update(done: int, total: int | None = None, stage: str | None = None) -> None:
            label = name if not stage else stage if stage.startswith(name.split()[0]) else f"{name} {stage}"
            outer(done, total, stage=label)

        return update


def run_stage(ctx: StageContext, stage: str, action: Action, previous: Mapping[str, Any]) -> list[Path]:
    """Runs one stage (``action`` run, resume or rejudge; ``previous``: its last record, which a re-judged
    verify stage reads its reports from) and returns the files it made, which ``workflow.json`` hashes."""
    if stage == "distill":
        return _run_distill(ctx, action)
    if stage == "export":
        return _run_export(ctx)
    if stage == "quantize":
        return _run_quantize(ctx)
    if stage == "pack":
        return _run_pack(ctx)
    if action == "rejudge":
        return _rejudge_verify(ctx, previous)
    return _run_verify(ctx)


def _run_distill(ctx: StageContext, action: Action) -> list[Path]:
    from ciard_deploy.distill.trainer import run as train  # imports torch: the workflow package stays torch-free

    run_dir = ctx.layout.run
    if action == "resume":
        summary = train(ctx.recipe, run_dir, resume=True, device=ctx.device, callbacks=ctx.train_callbacks)
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # the workflow's own earlier run (inputs changed or forced)
        summary = train(ctx.recipe, run_dir, device=ctx.device, callbacks=ctx.train_callbacks)
    if summary.get("status") != "complete":  # pragma: no cover - only with stop_after_epoch, never passed here
        raise CiardError(f"training stopped after epoch {summary.get('epochs_done')}; run again to resume")
    safe_training_curves(run_dir)
    return [*checkpoint_files(run_dir), run_dir / "summary.json"]


def _run_export(ctx: StageContext) -> list[Path]:
    d = ctx.recipe.deploy
    data = ctx.recipe.data  # the recipe's own data: calibration and parity images come from there too
    options = d.export_options(data.dataset, data.data_root, ctx.threads)
    result = export.run(ctx.layout.run, ctx.layout.export, d.formats, options, force=True,
                        progress=ctx.progress_for("export"), check=False)
    files = []
    for a in result.manifest.artifacts:
        files.append(ctx.layout.export / a.file)
        if a.sidecar and (ctx.layout.export / a.sidecar).is_file():  # a format whose metadata sits beside it
            files.append(ctx.layout.export / a.sidecar)
    return files + [ctx.layout.export / "manifest.json"]


def qat_partial_path(layout: Layout) -> Path:
    """Where the quantize stage writes its folder before it becomes DIR/qat/ (a rename, once complete)."""
    return layout.root / "qat.partial"


def _run_quantize(ctx: StageContext) -> list[Path]:
    """Fine-tunes the distilled student with fake quantization (the recipe's quantize: section, its method
    and teachers) and writes DIR/qat/model.qat.int8.onnx + manifest.json (the workflow's own: replaced).

    Never half-written: the earlier DIR/qat/ is removed before the fine-tuning, and the new one is written
    into DIR/qat.partial/ and renamed into place once complete. An interrupted stage (Ctrl-C, a killed job)
    leaves no DIR/qat/ (a stale DIR/qat.partial/ at most, removed by the next call), and runs again whole:
    the fine-tuning is short and keeps no checkpoint to resume from.
    """
    from ciard_deploy.quantize_aware.export import export_qat  # imports torch: the workflow package stays torch-free
    from ciard_deploy.quantize_aware.finetune import finetune  # imports torch

    qat, partial = ctx.layout.qat, qat_partial_path(ctx.layout)
    for old in (qat, partial):
        if old.exists():
            shutil.rmtree(old)
    device = ctx.device or ctx.recipe.train.device
    result = finetune(ctx.layout.run, recipe=ctx.recipe, device="cpu" if device in (None, "auto") else device)
    manifest = export_qat(result, partial, n=ctx.recipe.deploy.parity_n, force=True, threads=ctx.threads,
                          check=False)
    partial.rename(qat)
    return [qat / a.file for a in manifest.artifacts] + [qat / "manifest.json"]


def pack_partial_path(layout: Layout) -> Path:
    """Where the pack stage keeps its finished attacks while it runs (``verify.pack_partial.partial_dir``)."""
    return partial_dir(layout.pack)


def _run_pack(ctx: StageContext) -> list[Path]:
    """Builds DIR/pack.npz; resumable: each finished attack is kept in DIR/pack.npz.partial/ meanwhile.

    An interrupted pack stage (Ctrl-C, a killed job) leaves that folder behind; the next call takes
    the finished attacks from it instead of running them again, provided it was made for the same
    checkpoint, sample, seeds, eps, batch size, device type and attack settings; any other is the
    workflow's own stale temp data and is discarded (a log line). The folder is removed once the
    pack is saved: the stage's output (hashed in ``workflow.json``) is the pack alone.
    """
    r, d = ctx.recipe, ctx.recipe.deploy
    partial = pack_partial_path(ctx.layout)

    def on_state(ev: Any) -> None:
        if ev.kind == "reused":
            log.info("pack: reusing %s from %s (finished earlier in %.1f s)", ev.stage, ctx.layout.rel(partial),
                     ev.seconds)
        else:
            log.info("pack: %s in %s is damaged: it runs again", ev.stage, ctx.layout.rel(partial))

    artifacts = [ctx.layout.root / name for name in attacked_artifacts(ctx.state, r.quantize is not None)] \
        if d.pack.artifact_attacks else []
    write_pack(ctx.layout.run, ctx.layout.pack, force=True, dataset=r.data.dataset, data_root=r.data.data_root,
               download=r.data.download, n=d.pack.n, attacks=list(d.pack.attacks), eps=pack_eps(r), seed=d.seed,
               device=ctx.device or r.train.device, step_size=d.pack.step_size, batch_size=r.data.eval_batch_size,
               progress=ctx.progress_for("pack"), on_state=on_state, artifacts=artifacts,
               artifact_attacks=list(d.pack.artifact_attacks), allow_untrusted_twin=d.pack.allow_untrusted_twin,
               threads=ctx.threads, on_plan=_warn_eps)
    return [ctx.layout.pack]


def _warn_eps(plan: Any) -> None:
    """deploy.pack.eps other than the training eps: said now (verify then fails on V109 unless allow_mismatch)."""
    if plan.eps.warning:
        log.warning("pack: %s (deploy.pack.eps)", plan.eps.warning)


def _write_reports(layout: Layout, name: str, report: Any) -> list[Path]:
    paths = report_paths(layout, name)
    report.write_json(paths["json"])
    report.write_junit(paths["junit"])
    report.write_markdown(paths["markdown"])
    return list(paths.values())


def _gates(recipe: Any) -> Any:
    return gates_from_mapping({"gates": recipe.deploy.gates_mapping()}, source="recipe deploy.gates")


def _policy(recipe: Any) -> Any:
    return Policy(**recipe.deploy.policy_mapping())


def _clear_verify_dir(layout: Layout, keep: set[Path]) -> None:
    """Empties DIR/verify (the workflow's own reports of an earlier run) except the state files in ``keep``.

    A kept state file that is not a readable verify state (it is the workflow's own file) is removed.
    """
    if not layout.verify.exists():
        return
    for p in layout.verify.iterdir():
        if p in keep and p.is_file():
            try:
                VerifyState.load(p)
                continue
            except ArtifactError as e:
                log.info("discarding %s: %s", layout.rel(p), e)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _run_verify(ctx: StageContext) -> list[Path]:
    """Verifies every artifact of the manifest; resumable: each keeps a state at DIR/verify/<name>.state.json.

    An interrupted verify stage (Ctrl-C, a killed job) leaves those states behind; the next call
    continues each artifact's live attacks where they stopped (finished ones are taken whole from
    its state), provided the state is for the same artifact, pack and settings; any
    other state is the workflow's own stale file and is started over. Once the stage is done the
    states are removed: the stage's outputs (hashed in ``workflow.json``) are the reports only.
    """
    d = ctx.recipe.deploy
    artifacts = verified_artifacts(ctx.layout, ctx.recipe.quantize is not None)
    gates = _gates(ctx.recipe)
    states = {name: state_path(ctx.layout, name) for name, _, _ in artifacts}
    _clear_verify_dir(ctx.layout, keep=set(states.values()))
    written: list[Path] = []
    for name, a, file in artifacts:
        def on_state(ev: Any, name: str = name) -> None:
            log.info("verify %s: %s %s at %d/%d from %s", name, ev.kind, ev.stage, ev.done, ev.total, ev.path)

        options = dict(gates=gates, policy=_policy(ctx.recipe), provider=BACKENDS.get(a.runtime).provider_for(d.provider),
                       live=list(d.live_attacks), live_n=d.live_n, seed=d.seed, threads=ctx.threads,
                       name=QAT_NAME if name == QAT_REPORT else None,
                       progress=ctx.progress_for(f"verify {name}"), state_path=states[name], on_state=on_state)
        try:
            report = verify_run(file, ctx.layout.pack, **options)
        except StateMismatch as e:  # made for an earlier export, pack or settings: the workflow's own, start over
            log.info("verify %s: %s", name, e)
            report = verify_run(file, ctx.layout.pack, fresh=True, **options)
        written += _write_reports(ctx.layout, name, report)
    _combined_chart(ctx.layout, [name for name, _, _ in artifacts])
    for p in states.values():
        p.unlink(missing_ok=True)
    return written


def _rejudge_verify(ctx: StageContext, record: Mapping[str, Any]) -> list[Path]:
    gates, policy = _gates(ctx.recipe), _policy(ctx.recipe)
    written: list[Path] = []
    for rel in record.get("outputs", {}):
        if rel.endswith(".json"):
            path = ctx.layout.root / rel
            report = VerifyReport.from_json(path).rejudge(gates, policy)
            written += _write_reports(ctx.layout, path.stem, report)
    return written


def _combined_chart(layout: Layout, names: list[str]) -> None:
    """``verify/accuracy.png``: PyTorch vs every artifact in one chart (a by-product: problems are logged)."""
    try:
        reports = [json.loads(report_paths(layout, name)["json"].read_text()) for name in names]
        accuracy_chart(rows_from_reports(reports), layout.verify / "accuracy.png",
                       title="clean and robust accuracy: PyTorch vs each artifact")
    except Exception as e:  # noqa: BLE001 - a missing matplotlib must not fail a verified run
        log.info("no combined accuracy chart: %s", e)


__all__ = ["Progress", "StageContext", "pack_partial_path", "qat_partial_path", "run_stage"]
