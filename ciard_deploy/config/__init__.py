"""Typed recipes: pydantic models, YAML loading with ``extends``, dotted overrides, a recipe hash.

A recipe is one YAML file that says everything a training run needs::

    kind: distill            # or "train" (a teacher or a no-teacher baseline)
    schema_version: 1
    extends: _base.yaml      # optional: deep-merged under this file (relative path)
    data: {dataset: digits, batch_size: 128}
    student: {arch: small_cnn}          # "model:" in a kind "train" recipe
    teachers:
      clean: {recipe: teachers/digits_natural_small_cnn_wide.yaml}
      robust: {checkpoint: /path/to/robust.pt, arch: wrn-34-10}
    method: {name: ciard, push_loss: true}   # parameters checked by the method's own Config
    attack: {eps: 8/255, steps: 10, step_size: 2/255}
    optim: {lr: 0.1, schedule: ciard}
    train: {epochs: 300, seed: 0}

Every section rejects unknown keys and suggests the closest valid one; every problem of a
recipe is reported at once in one ``RecipeError``. Relative paths inside a recipe (teacher
checkpoints and recipes, ``data.data_root``) are resolved against the recipe file's folder.

    recipe = load_recipe(find_recipe("quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15"),
                         overrides=["train.epochs=2"])
    recipe.hash          # sha256 of the canonical JSON of the resolved recipe (teachers by content)

Shipped recipes are found by name (``find_recipe``, ``list_recipes``) in ``$CIARD_RECIPES``, else in
the installed package's copy, else in the source checkout's ``recipes/`` (see ``recipes_dir``).

The package, by role (``from ciard_deploy.config import X`` reads every public name):

    sections.py    the training sections (data, student/model, teachers, method, attack, optim, train)
    deploy.py      the ``deploy:`` section, made of the option models of ``ciard_deploy.options``
    recipe.py      TrainRecipe / DistillRecipe, the recipe hash, load_recipe / validate_recipe
    loading.py     YAML files, ``extends`` chains, ``--set`` overrides (plain data)
    validation.py  problems worded as ``key: problem`` with near-match hints, cross-section rules
    teachers.py    a distill recipe's teacher recipes: pins and fit
    shipped.py     where the shipped recipes are, and finding one by name
    docs.py        the field reference of ``ciard recipe show``

Validating a recipe imports neither torch nor ``ciard_deploy.verify`` (names are checked against the
torch-free catalogs of ``ciard_deploy.options``).
"""

from ciard_deploy.config.deploy import DeployConfig
from ciard_deploy.config.docs import field_docs
from ciard_deploy.config.loading import apply_overrides, deep_merge, load_raw
from ciard_deploy.config.recipe import (RECIPE_CLASSES, SCHEMA_VERSION, DistillRecipe, Recipe, RecipeBase, TrainRecipe,
                                        load_recipe, load_teacher_recipe, recipe_from_dict, validate_recipe)
from ciard_deploy.config.sections import (TEACHER_ROLES, AttackConfig, DataConfig, MethodSection, ModelSpec,
                                          OptimConfig, TeachersConfig, TeacherSpec, TrainConfig)
from ciard_deploy.config.shipped import find_recipe, list_recipes, recipes_dir
from ciard_deploy.config.teachers import check_recipe_tree, check_teacher_pin, teacher_recipe_paths

__all__ = [
    "AttackConfig", "DataConfig", "DeployConfig", "DistillRecipe", "MethodSection", "ModelSpec", "OptimConfig",
    "RECIPE_CLASSES", "Recipe", "RecipeBase", "SCHEMA_VERSION", "TEACHER_ROLES", "TeacherSpec", "TeachersConfig",
    "TrainConfig", "TrainRecipe", "apply_overrides", "check_recipe_tree", "check_teacher_pin", "deep_merge",
    "field_docs", "find_recipe", "list_recipes", "load_raw", "load_recipe", "load_teacher_recipe",
    "recipe_from_dict", "recipes_dir", "teacher_recipe_paths", "validate_recipe",
]
