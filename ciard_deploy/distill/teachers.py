"""Load the teachers a distillation recipe names, training and caching the missing ones.

A teacher is given in a recipe by one of:

- ``checkpoint: PATH`` -- a ciard checkpoint (``.safetensors`` + ``.json`` model card, e.g. a
  ``student_best`` of an earlier run), or a user's own ``.pt``/``.pth``/``.safetensors`` state
  dict (``module.`` prefixes fine, pickled code refused) together with ``arch``;
- ``recipe: PATH`` -- a kind ``train`` recipe (natural, pgd_at, trades). If no finished run of
  it is cached, it is trained first, into ``$CIARD_CACHE/teachers/<recipe hash>/`` (default
  ``~/.cache/ciard/teachers/``); a second distillation with the same teacher recipe reuses it
  and says so (a ``teacher_reused`` event naming the cached folder; the CLI prints it).
  An interrupted teacher training resumes where it stopped. A teacher recipe reads its data
  from the student recipe's ``data.data_root`` when that one is set (``--set data.data_root=DIR``
  on the distillation reaches its teachers too).

The student's recipe hash covers each teacher recipe's content through that same hash
(``DistillRecipe.teacher_hash``); a run refuses a teacher recipe that changed since the student
recipe was hashed, or that no longer matches the ``recipe_hash`` a resolved recipe pins.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ciard_deploy.config import (TEACHER_ROLES, DistillRecipe, TeacherSpec, TrainRecipe, check_teacher_pin,
                                 load_teacher_recipe)
from ciard_deploy.errors import ArtifactError, RecipeError
from ciard_deploy.checkpoints import checkpoint_paths, load_weights_into
from ciard_deploy.fingerprint import sha256_file
from ciard_deploy.model_loader import load_checkpoint
from ciard_deploy.lock import folder_lock

log = logging.getLogger(__name__)


def teacher_cache_dir() -> Path:
    """Where teachers trained from recipes are kept: ``$CIARD_CACHE/teachers`` or ~/.cache/ciard/teachers."""
    base = os.environ.get("CIARD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ciard"))
    return Path(base) / "teachers"


def cached_run_dir(recipe: TrainRecipe) -> Path:
    """The cache folder of a teacher recipe (keyed by its hash)."""
    return teacher_cache_dir() / recipe.short_hash


def is_trained(run_dir: Path) -> bool:
    """True when ``run_dir`` holds a finished run (summary complete, best checkpoint present)."""
    summary = run_dir / "summary.json"
    if not summary.exists() or not (run_dir / "student_best.safetensors").exists():
        return False
    try:
        return json.loads(summary.read_text()).get("status") == "complete"
    except json.JSONDecodeError:
        return False


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
    from ciard_deploy.distill import ddp
    from ciard_deploy.distill.trainer import TrainEvent, run

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


def load_teacher(spec: TeacherSpec, role: str, info: Any, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """A teacher from a checkpoint (ciard checkpoint or plain state dict); returns (model, reference)."""
    from ciard_deploy.models import create_model

    path = Path(spec.checkpoint or "")
    weights, meta_path = checkpoint_paths(path)
    if path.suffix in ("", ".safetensors", ".json") and meta_path.exists() and weights.exists():
        model, meta = load_checkpoint(weights, device="cpu")
        if spec.arch is not None and spec.arch != meta.arch:
            raise ArtifactError(f"teachers.{role}: {weights} is a {meta.arch}, the recipe says arch {spec.arch}")
        if meta.num_classes != info.num_classes or tuple(meta.input_shape) != tuple(info.input_shape):
            raise ArtifactError(f"teachers.{role}: {weights} was made for {meta.num_classes} classes of "
                                f"{tuple(meta.input_shape)} inputs ({meta.dataset or 'unknown dataset'}); "
                                f"this run has {info.num_classes} classes of {tuple(info.input_shape)}")
        ref = {"role": role, "source": "checkpoint", "path": str(weights), "sha256": sha256_file(weights),
               "arch": meta.arch, "recipe": None, "recipe_hash": meta.recipe_hash or None,
               "dataset": meta.dataset, "metrics": meta.metrics}
        return model.to(device), ref
    if not path.exists():
        raise ArtifactError(f"teachers.{role}.checkpoint: not found: {path}")
    if spec.arch is None:
        raise ArtifactError(f"teachers.{role}: {path} is a plain state dict (no .json model card next to it): "
                            f"give teachers.{role}.arch")
    mean, std = (info.mean, info.std) if spec.normalize else (None, None)
    model = create_model(spec.arch, info.num_classes, info.in_chans, mean, std)
    load_weights_into(model, path)
    ref = {"role": role, "source": "checkpoint", "path": str(path.resolve()), "sha256": sha256_file(path),
           "arch": spec.arch, "recipe": None, "recipe_hash": None, "dataset": info.name, "metrics": {}}
    return model.to(device), ref


def resolve_teachers(recipe: DistillRecipe, info: Any, device: torch.device, *, callbacks: Sequence[Any] = (),
                     ctx: Any = None) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
    """Every teacher the recipe names, on ``device``, with its reference for ``teachers.json``.

    Teachers given by recipe are trained first when not cached (see module docstring).
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


__all__ = ["cached_run_dir", "is_trained", "load_teacher", "load_teacher_recipe", "resolve_teachers",
           "teacher_cache_dir", "train_teacher"]
