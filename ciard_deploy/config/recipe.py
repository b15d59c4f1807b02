"""Recipes: the typed ``TrainRecipe`` / ``DistillRecipe``, their hash, and the entry points that make them.

``load_recipe`` reads a file (``loading``: YAML, ``extends``, ``--set``) and ``validate_recipe`` checks
it (``validation``); both live here with the recipe classes because a distill recipe's hash takes each
teacher recipe by content, which ``load_teacher_recipe`` reads.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator

from ciard_deploy.config.deploy import DeployConfig
from ciard_deploy.config.loading import apply_overrides, load_raw
from ciard_deploy.config.quantize import QuantizeConfig
from ciard_deploy.config.sections import (TEACHER_ROLES, AttackConfig, DataConfig, MethodSection, ModelSpec,
                                          OptimConfig, Section, TeachersConfig, TrainConfig)
from ciard_deploy.config.validation import cross_checks, format_errors, problem_message, validate_method
from ciard_deploy.errors import RecipeError
from ciard_deploy.fingerprint import canonical_json_hash

SCHEMA_VERSION = 1
RecipeKind = Literal["distill", "train"]


class RecipeBase(Section):
    kind: RecipeKind = Field(..., description="distill (a student from teachers) or train (a teacher or a "
                                              "no-teacher baseline)")
    schema_version: int = Field(SCHEMA_VERSION, description="recipe schema version")
    description: str = Field("", description="one line about this recipe")
    data: DataConfig = Field(default_factory=DataConfig, description="dataset, split, batches, augmentation")
    method: MethodSection = Field(..., description="method name and its parameters (see the method section below)")
    attack: AttackConfig = Field(default_factory=AttackConfig, description="the training attack's L-inf budget")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="SGD of the trained model and its schedule")
    train: TrainConfig = Field(default_factory=TrainConfig, description="epochs, seed, device, precision, "
                                                                         "evaluation and model selection")
    deploy: DeployConfig | None = Field(None, description="export, robustness pack, verify and gates for "
                                                          "`ciard run` (not part of the training: the recipe "
                                                          "hash leaves it out)")
    quantize: QuantizeConfig | None = Field(None, description="quantization-aware robust fine-tuning of the "
                                                              "trained student (`ciard qat`; a stage after "
                                                              "training: the recipe hash leaves it out)")

    _source: Path | None = PrivateAttr(None)

    @field_validator("schema_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"this ciard-deploy reads schema_version {SCHEMA_VERSION}, not {v}")
        return v

    # ------------------------------------------------------------------ derived
    @property
    def model_spec(self) -> ModelSpec:
        """The network this recipe trains: ``student`` (distill) or ``model`` (train)."""
        spec = getattr(self, "student", None) or getattr(self, "model", None)
        if spec is None:
            raise TypeError(f"{type(self).__name__} names no network")
        return spec

    @property
    def source(self) -> Path | None:
        """The file this recipe was loaded from (None if built in code)."""
        return self._source

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain JSON-able data (eps written as ``8/255``)."""
        d = self.model_dump(mode="json")
        d["method"] = {"name": self.method.name, **self.method.params}
        for section in ("deploy", "quantize"):
            if d.get(section) is None:
                d.pop(section, None)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=100)

    def hash_payload(self) -> dict[str, Any]:
        """What :attr:`hash` covers: the resolved recipe without its ``deploy`` and ``quantize``
        sections (stages after training) and without ``train.loggers`` (where the numbers are also sent changes no model, and a run resumes with a
        tracker added)."""
        d = self.to_dict()
        d.pop("deploy", None)
        d.pop("quantize", None)
        d["train"].pop("loggers", None)
        return d

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON of the resolved recipe (every default filled in), without its
        ``deploy`` section: the hash names what the model was trained with, so models (and teacher
        caches, and ``--resume``) do not change when only the release gates or export formats do.

        A distill recipe's teachers enter by content, not by path: a teacher recipe by its own hash
        (after its ``extends`` and the student's ``data_root``; see
        :meth:`DistillRecipe.teacher_hashes`), so editing it changes the student's hash and moving or
        renaming it does not. A checkpoint teacher enters by its resolved path only: hashing is
        never allowed to read (or need) a weights file of hundreds of MB; its sha256 is pinned at
        run time instead (``teachers.json`` of the run, the inputs of ``ciard run``'s distill stage).
        A RobustBench teacher enters by its ID, threat model and dataset, not by where its weights
        lie (``model_dir``) nor by them: their sha256 is pinned at run time like a checkpoint's.

        Raises:
            RecipeError: a teacher recipe cannot be read or does not validate.
        """
        return canonical_json_hash(self.hash_payload())

    @property
    def short_hash(self) -> str:
        return self.hash[:16]


class TrainRecipe(RecipeBase):
    """A network trained on its own: a teacher (natural, PGD-AT, TRADES) or a no-teacher baseline."""

    kind: Literal["train"] = Field(..., description="train: a network trained without teachers")
    model: ModelSpec = Field(..., description="the trained network")


class DistillRecipe(RecipeBase):
    """A student distilled from the teachers that its method needs."""

    kind: Literal["distill"] = Field(..., description="distill: a student trained from teachers")
    student: ModelSpec = Field(..., description="the student network")
    teachers: TeachersConfig = Field(default_factory=TeachersConfig, description="the teachers the method needs, "
                                                                                 "each by checkpoint, by recipe or by "
                                                                                 "RobustBench ID")

    # teacher recipe hashes computed so far, keyed by everything they depend on: a recipe object
    # is a snapshot, so a teacher file edited after its first use cannot change this recipe's hash
    _teacher_hash_cache: dict[tuple[str, str, str, str | None], str] = PrivateAttr(default_factory=dict)

    def teacher_hash(self, role: str) -> str:
        """The hash of the ``role`` teacher's recipe: its pinned ``recipe_hash`` when the recipe gives
        one (no file read), else that of :func:`load_teacher_recipe` on the file (the same hash
        that keys the teacher cache).

        Raises:
            RecipeError: no teacher recipe for ``role``, or it cannot be read or does not validate.
        """
        spec = getattr(self.teachers, role)
        if spec is None or spec.recipe is None:
            raise RecipeError(f"teachers.{role}: not given by a recipe")
        if spec.recipe_hash is not None:
            return spec.recipe_hash
        key = (role, spec.recipe, self.data.dataset, self.data.data_root)
        if key not in self._teacher_hash_cache:
            self._teacher_hash_cache[key] = load_teacher_recipe(spec.recipe, role, self.data.dataset,
                                                                self.data.data_root).hash
        return self._teacher_hash_cache[key]

    def teacher_hashes(self) -> dict[str, str]:
        """Teacher role -> recipe hash, for the teachers given by recipe (see :meth:`teacher_hash`)."""
        return {role: self.teacher_hash(role) for role in TEACHER_ROLES
                if getattr(self.teachers, role) is not None and getattr(self.teachers, role).recipe is not None}

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe; each teacher recipe's hash is filled in as ``recipe_hash`` (where its
        file validates), so a run dir's ``recipe.yaml`` pins the teachers it was trained from."""
        d = super().to_dict()
        for role in TEACHER_ROLES:
            spec = getattr(self.teachers, role)
            if spec is not None and spec.recipe is not None and spec.recipe_hash is None:
                try:
                    d["teachers"][role]["recipe_hash"] = self.teacher_hash(role)
                except RecipeError:
                    pass  # shown as is; hash (and running it) report the problem
        return d

    def hash_payload(self) -> dict[str, Any]:
        """The resolved recipe with each teacher recipe's path replaced by its content hash (and no
        RobustBench ``model_dir``)."""
        d = super().hash_payload()
        for role in TEACHER_ROLES:
            if d["teachers"].get(role) and d["teachers"][role].get("robustbench") is not None:
                d["teachers"][role].pop("model_dir", None)
        for role, h in self.teacher_hashes().items():
            d["teachers"][role].pop("recipe", None)
            d["teachers"][role]["recipe_hash"] = h
        return d


Recipe = Union[TrainRecipe, DistillRecipe]
RECIPE_CLASSES: dict[str, type[RecipeBase]] = {"train": TrainRecipe, "distill": DistillRecipe}


# --------------------------------------------------------------------------- making recipes
def validate_recipe(data: Mapping[str, Any], source: str | Path | None = None) -> Recipe:
    """Validates a merged recipe mapping; collects every problem into one RecipeError."""
    where = str(source) if source is not None else "recipe"
    data = dict(data)
    data.pop("extends", None)
    kind = data.get("kind")
    if kind not in RECIPE_CLASSES:
        close = difflib.get_close_matches(str(kind), list(RECIPE_CLASSES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        msg = "missing (use 'distill' or 'train')" if kind is None else f"{kind!r} is not a recipe kind{hint}; use 'distill' or 'train'"
        raise RecipeError(f"{where}: kind: {msg}")
    cls = RECIPE_CLASSES[kind]
    problems: list[str] = []
    method_raw = data.get("method")
    # the method's own parameters are checked by its Config; fill its defaults in
    if isinstance(method_raw, dict) and isinstance(method_raw.get("name"), str):
        method_data, method_problems = validate_method(method_raw)
        problems += method_problems
        data["method"] = method_data
    try:
        recipe = cls.model_validate(data)
    except ValidationError as e:
        problems = format_errors(e, cls) + problems
        recipe = None
    if recipe is not None and not problems:
        problems += cross_checks(recipe)
    if problems:
        err = RecipeError(problem_message(where, problems))
        err.problems = problems  # type: ignore[attr-defined]
        raise err
    assert recipe is not None
    if source is not None:
        recipe._source = Path(source)
    return recipe


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Reads, merges (``extends``), overrides (``a.b=value``) and validates a recipe file."""
    p = Path(path)
    data = apply_overrides(load_raw(p), overrides)
    return validate_recipe(data, source=p)


def recipe_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> Recipe:
    """Validates a recipe given as a mapping (paths are taken as given)."""
    return validate_recipe(apply_overrides(dict(data), overrides))


def load_teacher_recipe(path: str | Path, role: str, dataset: str, data_root: str | None = None) -> TrainRecipe:
    """A teacher recipe, checked: kind train, same dataset as the student. ``data_root`` (the
    student's, when its recipe sets one) replaces the teacher recipe's: where the data lies is a
    property of the machine, not of the teacher.

    Its ``hash`` is the one place a teacher recipe's identity comes from: it keys the teacher cache
    (``distill.teachers``) and enters the student's hash (:meth:`DistillRecipe.teacher_hash`).
    """
    overrides = [f"data.data_root={json.dumps(str(data_root))}"] if data_root else []
    try:
        recipe = load_recipe(path, overrides)
    except RecipeError as e:
        raise RecipeError(f"teachers.{role}.recipe: {e}") from None
    if not isinstance(recipe, TrainRecipe):
        raise RecipeError(f"teachers.{role}.recipe: {path} is a kind {recipe.kind!r} recipe; a teacher recipe "
                          f"has kind 'train'")
    if recipe.data.dataset != dataset:
        raise RecipeError(f"teachers.{role}.recipe: {path} trains on {recipe.data.dataset!r}, the student on "
                          f"{dataset!r}")
    return recipe


__all__ = ["DistillRecipe", "RECIPE_CLASSES", "Recipe", "RecipeBase", "RecipeKind", "SCHEMA_VERSION", "TrainRecipe",
           "load_recipe", "load_teacher_recipe", "recipe_from_dict", "validate_recipe"]
