"""A distill recipe's teacher recipes: which files, whether each still is what the recipe was hashed with,
and whether each fits the student (kind train, same dataset, same architecture).
"""

from __future__ import annotations

from pathlib import Path

from ciard_deploy.config.recipe import DistillRecipe, Recipe, TrainRecipe, load_teacher_recipe
from ciard_deploy.config.sections import TEACHER_ROLES
from ciard_deploy.errors import RecipeError


def teacher_recipe_paths(recipe: Recipe) -> dict[str, Path]:
    """Teacher role -> recipe file, for the teachers given by recipe."""
    if not isinstance(recipe, DistillRecipe):
        return {}
    out = {}
    for role in TEACHER_ROLES:
        spec = getattr(recipe.teachers, role)
        if spec is not None and spec.recipe is not None:
            out[role] = Path(spec.recipe)
    return out


def check_teacher_pin(recipe: DistillRecipe, role: str, teacher: TrainRecipe) -> None:
    """Raises a RecipeError when ``teacher`` (the role's recipe as read now) is not the content
    ``recipe`` was hashed with: a pinned ``recipe_hash`` that no longer matches, or a file edited
    since ``recipe.hash`` was first taken."""
    expected = recipe.teacher_hash(role)
    if teacher.hash == expected:
        return
    spec = getattr(recipe.teachers, role)
    if spec.recipe_hash is not None:
        fix = (f"this recipe pins teachers.{role}.recipe_hash {expected[:16]} (a run dir's recipe.yaml does): "
               f"resume with the same teacher recipe, or remove the pin to train with the edited one (a new run)")
    else:
        fix = f"it was {expected[:16]} when this recipe was loaded; load the recipe again"
    raise RecipeError(f"teachers.{role}.recipe: {spec.recipe} changed: its hash is {teacher.short_hash}, but {fix}")


def check_recipe_tree(recipe: Recipe) -> list[str]:
    """Validates the teacher recipes a distill recipe names; returns their problems (empty: fine).

    A teacher recipe must be a kind 'train' recipe on the same dataset as the student (read with the
    student's ``data_root``, as a run reads it), and match the ``recipe_hash`` pinned for it, if any.
    """
    problems = []
    for role, path in teacher_recipe_paths(recipe).items():
        assert isinstance(recipe, DistillRecipe)
        try:
            t = load_teacher_recipe(path, role, recipe.data.dataset, recipe.data.data_root)
            check_teacher_pin(recipe, role, t)
        except RecipeError as e:
            problems.append(str(e))
            continue
        spec = getattr(recipe.teachers, role)
        if spec.arch is not None and spec.arch != t.model.arch:
            problems.append(f"teachers.{role}.arch: {spec.arch!r} but its recipe trains {t.model.arch!r}")
    return problems


__all__ = ["check_recipe_tree", "check_teacher_pin", "teacher_recipe_paths"]
