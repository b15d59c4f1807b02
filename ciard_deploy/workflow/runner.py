"""``workflow.run``: the entry point of ``ciard run`` and ``ciard quickstart``. It checks the recipe, the
output folder and the environment before any work, then plans each stage (``plan``), runs it
(``stages.run_stage``) and records it in ``workflow.json``, holding the folder's lock throughout.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ciard_deploy import lock
from ciard_deploy.config import RecipeBase, find_recipe, load_recipe
from ciard_deploy.errors import CiardError, RecipeError, UsageError
from ciard_deploy.export.base import check_environment, resolve_formats
from ciard_deploy.io import atomic_write_text
from ciard_deploy.workflow.planning import file_hashes, plan, stage_inputs, teacher_inputs
from ciard_deploy.workflow.stages import Progress, StageContext, run_stage
from ciard_deploy.workflow.state import (QAT_STAGES, STAGES, STATE_NAME, Layout, StateFile, check_out_dir, new_state,
                                         stages_of)
from ciard_deploy.fingerprint import canonical_json_hash
from ciard_deploy.workflow.summary import StageEvent, StageOutcome, WorkflowResult, summarize
from ciard_deploy.distill.events import TrainingInterrupted

QUICKSTART_RECIPE = "quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15"


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_environment(recipe: Any) -> None:
    """Exit 3 before any training when an export format needs what this machine lacks (its runtime, or
    the execution provider ``deploy.provider``): each format's runtime says what it needs."""
    d = recipe.deploy
    check_environment(resolve_formats(d.formats), d.provider, where="deploy.provider")


def load_deploy_recipe(recipe: "RecipeBase | str | Path", overrides: Sequence[str] = ()) -> "RecipeBase":
    """A recipe with a ``deploy:`` section (a RecipeError names the fix when it has none)."""
    if not isinstance(recipe, RecipeBase):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise UsageError("overrides apply to a recipe file; apply them before validating a Recipe object")
    if recipe.deploy is None:
        where = recipe.source or "the recipe"
        raise RecipeError(f"{where} has no deploy: section, which `ciard run` needs (formats, pack, gates); add "
                          f"one (see recipes/quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15.yaml) or pass "
                          f"--set deploy.formats=[onnx]")
    return recipe


def _training_interrupted(e: BaseException) -> bool:
    """``e`` is the trainer's TrainingInterrupted (SIGINT/SIGTERM during training: kept for a resume)."""

    return isinstance(e, TrainingInterrupted)


def _undone_on_refusal(fn: Callable[..., WorkflowResult]) -> Callable[..., WorkflowResult]:
    """:func:`run` that, refused before any stage kept a file (a dataset not found in the first stage's
    setup, a disk full while writing its state), removes the bookkeeping it wrote into ``out_dir``
    (``workflow.json``, ``recipe.yaml``) when they are new: a refused call leaves the folder as it found it.
    Anything else new (a stage's files, kept for a resume) keeps them too; an interruption keeps all."""

    @functools.wraps(fn)
    def wrapper(recipe: Any, out_dir: str | Path, **kwargs: Any) -> WorkflowResult:
        root = Path(out_dir)
        before = {p.name for p in lock.entries(root)} if root.is_dir() else set()
        try:
            return fn(recipe, out_dir, **kwargs)
        except (CiardError, OSError) as e:
            new = {p.name for p in lock.entries(root)} - before if root.is_dir() else set()
            if not _training_interrupted(e) and new and new <= {STATE_NAME, Layout(root).recipe.name}:
                lock.remove_new_entries(root, before)
            raise

    return wrapper


@lock.holding("out_dir")
@_undone_on_refusal
def run(recipe: "RecipeBase | str | Path", out_dir: str | Path, *, overrides: Sequence[str] = (),
        from_stage: str | None = None, device: str | None = None, threads: int | None = None, entry: str = "run",
        on_event: Callable[[StageEvent], None] | None = None, train_callbacks: Sequence[Any] = (),
        progress: Progress | None = None) -> WorkflowResult:
    """Runs (or brings up to date) distill -> export [-> quantize] -> pack -> verify in ``out_dir``
    (``quantize`` only for a recipe with a ``quantize:`` section).

    Args:
        recipe: a recipe file (``overrides`` apply) or a validated recipe; it needs a ``deploy:`` section.
        out_dir: the workflow dir: new, empty, or one this function made before.
        overrides: ``a.b=value`` strings, as ``--set``.
        from_stage: force this stage and every later one (``distill`` trains from scratch).
        device: training and pack device (default: the recipe's ``train.device``).
        threads: torch intra-op threads (and onnxruntime's) for this call; None leaves them as they are.
        entry: ``run`` or ``quickstart`` (recorded; a quickstart only reuses its own dirs).
        on_event: called with a StageEvent when a stage starts, is skipped or ends.
        train_callbacks: trainer callbacks (``distill.trainer.TrainEvent``).
        progress: ``callback(done, total, stage=...)`` for export, pack and verify.

    Returns:
        the WorkflowResult; ``result.status`` is ``passed`` (gates set and every one passed, no warning
        failed under the policy, every export check passed), ``failed`` or ``not_gated`` (no gates set:
        nothing failed, nothing was judged).

    Raises:
        UsageError / RecipeError: bad input (exit 2): an unknown stage, a recipe without ``deploy``,
            an ``out_dir`` that holds someone else's files. Nothing is written.
        InUse: another ``ciard run`` into ``out_dir`` is running (exit 2). Nothing is written.
        EnvironmentMissing: a format or provider this machine cannot run (exit 3), before any work.
        TrainingInterrupted: training was stopped (SIGINT/SIGTERM); calling ``run`` again resumes it.
    """
    if from_stage is not None and from_stage not in QAT_STAGES:
        close = difflib.get_close_matches(str(from_stage), QAT_STAGES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"--from {from_stage!r} is not a stage{hint}; stages: {', '.join(STAGES)} "
                         f"(and quantize, after export, with a quantize: section)")
    rec = load_deploy_recipe(recipe, overrides)
    stages = stages_of(rec)
    if from_stage is not None and from_stage not in stages:
        raise UsageError(f"--from {from_stage}: the recipe has no quantize: section, so no such stage; "
                         f"stages: {', '.join(stages)}")
    layout = Layout(Path(out_dir))
    state = check_out_dir(layout.root, entry)
    _check_environment(rec)
    teachers = teacher_inputs(rec)

    layout.root.mkdir(parents=True, exist_ok=True)
    sf = StateFile(layout, state or new_state(entry))
    sf.data["status"] = "running"
    sf.data["recipe"] = {"path": str(rec.source) if rec.source else None, "overrides": list(overrides),
                         "hash": rec.hash, "deploy_hash": canonical_json_hash(rec.deploy.model_dump(mode="json")),
                         "kind": rec.kind, "method": rec.method.name, "arch": rec.model_spec.arch,
                         "dataset": rec.data.dataset, "stages": list(stages)}  # run_folder.qat_artifacts reads it
    sf.save()
    src = f" from {rec.source}" if rec.source else ""
    atomic_write_text(layout.recipe, f"# the recipe of this workflow{src}, resolved (training hash {rec.short_hash})\n"
                                     f"# ciard run {layout.recipe} --out {layout.root}\n" + rec.to_yaml())

    ctx = StageContext(rec, layout, device, threads, list(train_callbacks), progress, sf.data)
    emit = on_event or (lambda ev: None)
    outcomes: dict[str, StageOutcome] = {}
    forced = False
    with _torch_threads(threads):
        for stage in stages:
            forced = forced or stage == from_stage
            record = sf.stage(stage)
            inputs = stage_inputs(stage, rec, layout, teachers, sf.data)
            action, reason = plan(stage, record, inputs, layout.root, forced=forced, from_stage=from_stage)
            if action == "skip":
                outcomes[stage] = StageOutcome(stage, "skipped", reason)
                emit(StageEvent("skip", stage, "skip", reason))
                continue
            # a stage that runs again makes every later stage's recorded outputs suspect: its own
            # inputs (upstream hashes) decide, so nothing more is needed here
            emit(StageEvent("start", stage, action, reason))
            t0 = time.perf_counter()
            previous = dict(record)
            record.clear()
            record.update(status="running", action=action, reason=reason, inputs=inputs,
                          inputs_hash=canonical_json_hash(inputs), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            sf.save()
            try:
                files = run_stage(ctx, stage, action, previous)
            except BaseException as e:
                interrupted = isinstance(e, KeyboardInterrupt) or _training_interrupted(e)
                record.update(status="interrupted" if interrupted else "failed", error=str(e) or type(e).__name__,
                              seconds=round(time.perf_counter() - t0, 3))
                sf.data["status"] = "interrupted" if interrupted else "error"
                sf.save()
                raise
            seconds = round(time.perf_counter() - t0, 3)
            record.update(status="done", outputs=file_hashes(layout, files), seconds=seconds,
                          finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), runs=int(previous.get("runs", 0)) + 1)
            sf.save()
            done = {"run": "ran", "resume": "resumed", "rejudge": "rejudged"}[action]
            outcomes[stage] = StageOutcome(stage, done, reason, seconds)
            emit(StageEvent("end", stage, done, reason, seconds))

    qat = rec.quantize is not None
    rows, reference, failures = summarize(layout, qat)
    result = WorkflowResult(layout.root, outcomes, rows, reference, failures, sf.data, qat=qat)
    sf.data.update(status=result.status, artifacts=rows, reference=reference, failures=failures,
                   last_call={k: asdict(v) for k, v in outcomes.items()})
    sf.save()
    return result


def quickstart_recipe() -> Path:
    """The shipped recipe ``ciard quickstart`` runs (the CIARD digits quick recipe)."""
    return find_recipe(QUICKSTART_RECIPE)


__all__ = ["QUICKSTART_RECIPE", "load_deploy_recipe", "quickstart_recipe", "run"]
