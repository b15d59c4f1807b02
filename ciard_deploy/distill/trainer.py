"""One training loop for every method: distillation (CIARD, MTARD, RSLAD, ARD) and plain training
(natural, PGD-AT, TRADES, the teachers).

    from ciard_deploy.config import load_recipe
    from ciard_deploy.distill.trainer import run
    summary = run(load_recipe("recipes/quick/...yaml"), "runs/ciard-digits")

What one call does, in order: takes the run dir's lock (``lock.folder_lock``: a second process
training into it is refused, exit 2), checks the run dir (never overwrites; ``resume=True`` continues
it), loads or trains the teachers, seeds everything, builds the student, the method, SGD and
its schedule, then loops over epochs: each step is ``method.train_step`` under autocast, the
student's backward and step (through a GradScaler for fp16), then ``method.after_student_step``
(CIARD's robust-teacher update). Every ``train.eval_every`` epochs (and the last) it evaluates
clean and ``train.eval_attack`` accuracy on a fixed held-out subset and keeps the best
checkpoint by (clean + robust) / 2; the last one is kept too. At each epoch end it appends to
``metrics.jsonl`` and atomically saves ``train_state.pt`` (every RNG state included), so an
interrupted run resumes bit-exactly on CPU. SIGINT/SIGTERM finish the current step, save a
mid-epoch state and raise :class:`TrainingInterrupted`. After the last epoch it evaluates
``student_best`` and ``student_last`` on the test split (``train.final_attacks``; once when they
are the same weights), reporting progress as ``final_eval`` events; a stop requested there ends it
at once (the checkpoints are saved already; ``--resume`` runs the final evaluation again). A second
SIGINT, or a ``KeyboardInterrupt``, stops at once too, keeping the last saved state.

Run dir::

    recipe.yaml            the recipe as resolved (every default filled in)
    student_best.*         best checkpoint by the selection score (safetensors + json model card)
    student_last.*         last epoch's checkpoint
    teachers.json          which teachers were used: path, sha256, recipe hash
    train_state.pt         resume state (torch.save; loaded with weights_only=True)
    metrics.jsonl          one line per epoch
    summary.json           final numbers on the test split, robust ones named like pgd20@8/255
    train.log              the run's log

The library never prints: progress goes to ``callbacks`` (see ``events.TrainEvent``).

This module is the entry: :func:`run`, and the teachers a distillation trains first as nested runs of
it (:func:`resolve_teachers`, :func:`train_teacher`). The pieces live beside it, one role each::

    loop.py         TrainingLoop: setup, epochs and steps, selection, the saved state; train_step
    events.py       TrainEvent, RunControl, TrainingInterrupted (torch-free)
    run_context.py  SIGINT/SIGTERM as stop requests, train.log
    rng.py          seeding, every RNG's state for train_state.pt
    splits.py       training positions, the selection subset, the test split
    selection.py    accuracy_metrics (clean and under attack, seeded), the selection score
    train_state.py  --resume: run-dir checks, train_state.pt, metrics.jsonl trimming, recipe diffs
    summary.py      the final test evaluation, summary.json, the students' model cards
    teachers.py     teacher checkpoints and the teacher cache's folders
    schedules.py    the lr schedules
"""

from __future__ import annotations

import contextlib
import gc
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ciard_deploy.config import (TEACHER_ROLES, DistillRecipe, Recipe, RecipeBase, TeacherSpec, TrainRecipe,
                                 check_teacher_pin, load_recipe, load_teacher_recipe)
from ciard_deploy.devices import resolve_device
from ciard_deploy.distill import ddp
from ciard_deploy.distill.events import Callback, RunControl, TrainEvent
from ciard_deploy.distill.loop import TrainingLoop
from ciard_deploy.distill.teachers import cached_run_dir, is_trained, load_teacher
from ciard_deploy.errors import CiardError, InUse, RecipeError, UsageError
from ciard_deploy.lock import folder_lock

log = logging.getLogger(__name__)


def run(recipe: Recipe | str | Path, out_dir: str | Path, *, resume: bool = False, device: str | None = None,
        callbacks: Sequence[Callback] | Callback | None = None, overrides: Sequence[str] = (),
        stop_after_epoch: int | None = None, control: RunControl | None = None,
        handle_signals: bool = True) -> dict[str, Any]:
    """Trains the recipe's model (kind distill: the student from its teachers; kind train: a
    teacher or baseline) into ``out_dir`` and returns the summary (also in ``summary.json``).

    Args:
        recipe: a validated recipe, or a recipe file (then ``overrides`` apply).
        out_dir: the run dir; must not exist (or be empty) unless ``resume``.
        resume: continue the run in ``out_dir`` from its last saved state (a missing or empty
            ``out_dir`` starts fresh, so a job can always pass it).
        device: overrides ``train.device`` (auto, cpu, cuda, cuda:N, mps).
        callbacks: called with a :class:`TrainEvent` at run/epoch/step boundaries.
        overrides: ``a.b=value`` strings applied when ``recipe`` is a path.
        stop_after_epoch: stop (state saved, status ``partial``) once this many epochs are done.
        control: a :class:`RunControl` to request a stop from outside (else one is made).
        handle_signals: turn SIGINT/SIGTERM into a clean stop (main thread only).

    Returns:
        the summary dict; ``status`` is ``complete`` or ``partial``.

    Raises:
        UsageError: the run dir exists without ``resume``; bad device/amp combination.
        InUse: another process is training into ``out_dir`` (it holds the folder's lock; exit 2).
        RecipeError: the recipe does not validate, or differs from the one a resumed run used.
        TrainingInterrupted: a stop was requested mid-run; the state is saved (exit code 130).
    """
    if not isinstance(recipe, RecipeBase):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise UsageError("overrides apply to a recipe file; apply them before validating a Recipe object")
    if callable(callbacks):
        callbacks = [callbacks]
    dev = resolve_device(device or recipe.train.device)
    ctx = ddp.init_from_env(dev.type)
    if ctx.enabled and dev.type == "cuda":
        dev = torch.device("cuda", ctx.local_rank)
    pkg_log = logging.getLogger("ciard_deploy")
    old_level = pkg_log.level
    if not ctx.is_main:
        pkg_log.setLevel(logging.ERROR)  # rank 0 alone logs
    training: TrainingLoop | None = None
    try:
        training = TrainingLoop(recipe, Path(out_dir), dev, ctx, list(callbacks or []), control or RunControl(),
                                resolve_teachers)
        with _run_dir_lock(training.run_dir, ctx):
            return training.execute(resume=resume, stop_after_epoch=stop_after_epoch, handle_signals=handle_signals)
    finally:
        pkg_log.setLevel(old_level)
        if ctx.owns_group:
            # the DDP reducer and gloo work objects go before the process group, not at interpreter exit
            del training
            gc.collect()
        ctx.close()


@contextlib.contextmanager
def _run_dir_lock(run_dir: Path, ctx: ddp.DistContext) -> Iterator[None]:
    """Holds the run dir's lock (``lock.folder_lock``, taken by rank 0 before anything in the folder is
    read): a second process training into the same folder is refused (``InUse``, exit 2, naming the
    holder's pid) and the holder's files are never mixed with its own."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file, not a run dir")
    with contextlib.ExitStack() as held:
        refused: CiardError | None = None
        if ctx.is_main:
            try:
                held.enter_context(folder_lock(run_dir, hint="wait for it or use another --out"))
            except CiardError as e:
                refused = e
        message = ddp.broadcast_object(None if refused is None else str(refused), ctx)
        if message is not None:
            raise refused if refused is not None else InUse(message)
        yield


# --------------------------------------------------------------------------- teachers, trained as nested runs
def _exclusive(run_dir: Path, enabled: bool) -> contextlib.AbstractContextManager:
    """The cache run's own lock (``lock.folder_lock``), waited for: two distillations never train the same
    teacher at once, the second one takes it from the cache when the first is done. The training inside
    takes the same lock again (it is this thread's already)."""
    if not enabled:
        return contextlib.nullcontext()
    return folder_lock(run_dir, wait=True)


def train_teacher(recipe: TrainRecipe, role: str, device: torch.device | str, *, callbacks: Sequence[Any] = (),
                  ctx: Any = None) -> tuple[Path, bool]:
    """Trains (or reuses) a teacher recipe in the cache; returns (run dir, trained now?).

    ``callbacks`` get a ``teacher`` event before a teacher is trained (then the nested run's events)
    or a ``teacher_reused`` event naming the cached run it is taken from."""
    ctx = ctx or ddp.DistContext()
    run_dir = cached_run_dir(recipe)
    name = f"{role} teacher: {recipe.method.name} {recipe.model.arch} ({recipe.train.epochs} epochs)"

    def reused() -> tuple[Path, bool]:
        log.info("reusing the %s from the cache %s", name, run_dir)
        for cb in callbacks:
            cb(TrainEvent("teacher_reused", run_dir, message=f"reusing the {name} from the cache {run_dir}"))
        return run_dir, False

    done = ddp.broadcast_object(is_trained(run_dir), ctx)
    if done:
        return reused()
    with _exclusive(run_dir, enabled=ctx.is_main and not ctx.enabled):
        if is_trained(run_dir):  # trained by another process while we waited
            return reused()
        what = f"{name} -> {run_dir}"
        log.info("training the %s", what)
        for cb in callbacks:
            cb(TrainEvent("teacher", run_dir, message=f"training the {what}"))
        run(recipe, run_dir, resume=True, device=str(device), callbacks=callbacks)
    ctx.barrier()
    return run_dir, True


def resolve_teachers(recipe: DistillRecipe, info: Any, device: torch.device, *, callbacks: Sequence[Any] = (),
                     ctx: Any = None) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
    """Every teacher the recipe names, on ``device``, with its reference for ``teachers.json``.

    Teachers given by recipe are trained first when not cached (see ``teachers``' module docstring).
    """
    models: dict[str, nn.Module] = {}
    refs: dict[str, dict[str, Any]] = {}
    for role in TEACHER_ROLES:
        spec = getattr(recipe.teachers, role)
        if spec is None:
            continue
        if spec.recipe is not None:
            t_recipe = load_teacher_recipe(spec.recipe, role, recipe.data.dataset, recipe.data.data_root)
            check_teacher_pin(recipe, role, t_recipe)
            if spec.arch is not None and spec.arch != t_recipe.model.arch:
                raise RecipeError(f"teachers.{role}.arch: {spec.arch!r} but its recipe trains {t_recipe.model.arch!r}")
            run_dir, trained_now = train_teacher(t_recipe, role, device, callbacks=callbacks, ctx=ctx)
            model, ref = load_teacher(TeacherSpec(checkpoint=str(run_dir / "student_best.safetensors")), role,
                                      info, device)
            ref.update(source="recipe", recipe=str(spec.recipe), recipe_hash=t_recipe.hash, trained_now=trained_now,
                       run_dir=str(run_dir))
        else:
            model, ref = load_teacher(spec, role, info, device)
        models[role] = model
        refs[role] = ref
        log.info("%s teacher: %s %s (sha256 %s)", role, ref["arch"], ref["path"], ref["sha256"][:12])
    return models, refs


__all__ = ["resolve_teachers", "run", "train_teacher"]
