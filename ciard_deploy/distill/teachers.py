"""Where a distillation's teachers come from: a checkpoint, or a teacher recipe trained into the cache.

A teacher is given in a recipe by one of:

- ``checkpoint: PATH`` -- a ciard checkpoint (``.safetensors`` + ``.json`` model card, e.g. a
  ``student_best`` of an earlier run), or a user's own ``.pt``/``.pth``/``.safetensors`` state
  dict (``module.`` prefixes fine, pickled code refused) together with ``arch``;
- ``robustbench: ID`` (with ``threat_model``, default Linf) -- a RobustBench model-zoo entry, built and
  loaded by the ``robustbench`` package from its ``model_dir`` layout (``robustbench_teachers``);
- ``recipe: PATH`` -- a kind ``train`` recipe (natural, pgd_at, trades). If no finished run of
  it is cached, it is trained first, into ``$CIARD_CACHE/teachers/<recipe hash>/`` (default
  ``~/.cache/ciard/teachers/``); a second distillation with the same teacher recipe reuses it
  and says so (a ``teacher_reused`` event naming the cached folder; the CLI prints it).
  An interrupted teacher training resumes where it stopped. A teacher recipe reads its data
  from the student recipe's ``data.data_root`` when that one is set (``--set data.data_root=DIR``
  on the distillation reaches its teachers too).

Here: loading a teacher checkpoint (:func:`load_teacher`) and the cache's folders (:func:`cached_run_dir`,
:func:`is_trained`). Resolving a recipe's teachers and training the missing ones are nested runs of the
trainer, so they live with it: ``trainer.resolve_teachers`` and ``trainer.train_teacher`` (this module
imports nothing of the trainer).

The student's recipe hash covers each teacher recipe's content through that same hash
(``DistillRecipe.teacher_hash``); a run refuses a teacher recipe that changed since the student
recipe was hashed, or that no longer matches the ``recipe_hash`` a resolved recipe pins.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ciard_deploy.config import TeacherSpec, TrainRecipe, load_teacher_recipe
from ciard_deploy.errors import ArtifactError
from ciard_deploy.checkpoints import checkpoint_paths, load_weights_into
from ciard_deploy.distill.robustbench_teachers import load_robustbench_teacher
from ciard_deploy.model_loader import load_checkpoint
from ciard_deploy.fingerprint import sha256_file
from ciard_deploy.models import create_model

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


def load_teacher(spec: TeacherSpec, role: str, info: Any, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """A teacher from a checkpoint (ciard checkpoint or plain state dict) or a RobustBench ID; returns
    (model, reference)."""
    if spec.robustbench is not None:
        return load_robustbench_teacher(spec, role, info, device)
    path = Path(spec.checkpoint or "")
    weights, meta_path = checkpoint_paths(path)
    if path.suffix in ("", ".safetensors", ".json") and meta_path.exists() and weights.exists():
        model, meta = load_checkpoint(weights, device="cpu")
        if spec.arch is not None and spec.arch != meta.arch:
            raise ArtifactError(f"teachers.{role}: {weights} is a {meta.arch}, the recipe says arch {spec.arch}")
        if spec.stem is not None and spec.stem != meta.stem:
            raise ArtifactError(f"teachers.{role}: {weights} has stem {meta.stem or 'none'}, the recipe says stem {spec.stem}")
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
    model = create_model(spec.arch, info.num_classes, info.in_chans, mean, std, stem=spec.stem,
                         input_shape=info.input_shape)
    load_weights_into(model, path)
    ref = {"role": role, "source": "checkpoint", "path": str(path.resolve()), "sha256": sha256_file(path),
           "arch": spec.arch, "recipe": None, "recipe_hash": None, "dataset": info.name, "metrics": {}}
    return model.to(device), ref


__all__ = ["cached_run_dir", "is_trained", "load_teacher", "load_teacher_recipe", "teacher_cache_dir"]
