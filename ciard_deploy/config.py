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
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

import yaml
from pydantic import (AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_serializer,
                      field_validator, model_validator)

from ciard_deploy.errors import CiardError, RecipeError
from ciard_deploy.limits import LimitError, MAX_EXTENDS_DEPTH, MAX_EXTENDS_FILES, MAX_RECIPE_BYTES, check_tree

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RecipeKind = Literal["distill", "train"]
TEACHER_ROLES = ("clean", "robust")


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _registered(registry: Any, name: str) -> str:
    """``name`` if the registry has it, else a ValueError listing the valid names."""
    try:
        registry.get(name)
    except CiardError as e:
        raise ValueError(str(e)) from None
    return name


def _eps_value(v: Any) -> float:
    from ciard_deploy.attacks.budget import parse_eps

    try:
        return parse_eps(v)
    except CiardError as e:  # UsageError -> a pydantic error at this key
        raise ValueError(str(e)) from None


def _eps_text(v: float) -> str | float:
    """``8/255`` stays ``"8/255"`` when written back; other values stay numbers."""
    from ciard_deploy.attacks.budget import format_eps, parse_eps

    text = format_eps(v)
    try:
        return text if "/" in text and parse_eps(text) == v else v
    except CiardError:
        return v


# --------------------------------------------------------------------------- sections
class DataConfig(Section):
    dataset: str = Field("digits", description="registered dataset name (`ciard datasets`)")
    data_root: str | None = Field(None, description="folder of the dataset files (relative to the recipe file); "
                                                    "default: the dataset's own default location")
    download: bool = Field(False, description="allow torchvision to download the dataset")
    train_subset: int | None = Field(None, gt=0, description="train on a seeded class-stratified subset of this "
                                                             "many training images (before the holdout is taken)")
    holdout: float = Field(0.1, ge=0, description="part of the training split held out for model selection: a "
                                                  "fraction if < 1, else a number of images (0 = none)")
    batch_size: int = Field(128, gt=0, description="global batch size (split across DDP ranks)")
    eval_batch_size: int = Field(256, gt=0, description="batch size of the evaluations")
    augment: bool = Field(True, description="the dataset's training augmentation (crop + flip for CIFAR-like "
                                            "datasets, none for digits)")
    split_seed: int = Field(0, description="seed of the subset and holdout draws (kept apart from train.seed so "
                                           "seeds of a study share one split)")

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from ciard_deploy.data import DATASETS

        return _registered(DATASETS, v)

    @field_validator("holdout")
    @classmethod
    def _holdout_count(cls, v: float) -> float:
        if v >= 1 and not float(v).is_integer():
            raise ValueError("holdout >= 1 is a number of images and must be a whole number")
        return v


class ModelSpec(Section):
    arch: str = Field(..., description="registered architecture (`ciard models`)")
    normalize: bool = Field(True, description="normalize inside the model with the dataset's mean/std (inputs "
                                              "stay in [0, 1] either way)")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        from ciard_deploy.models import MODELS

        return _registered(MODELS, v)


class TeacherSpec(Section):
    checkpoint: str | None = Field(None, description="a ciard checkpoint (.safetensors + .json) or a user's "
                                                     ".pt/.pth/.safetensors state dict (then `arch` is needed)")
    recipe: str | None = Field(None, description="a kind 'train' recipe that trains this teacher when it is not "
                                                 "cached yet (cached by recipe hash)")
    recipe_hash: str | None = Field(None, description="the teacher recipe's hash, filled in by ciard when a recipe is "
                                                      "resolved (run dirs' recipe.yaml): a run refuses a teacher "
                                                      "recipe whose content changed since; remove it to accept the "
                                                      "edit")
    arch: str | None = Field(None, description="architecture of a plain state-dict checkpoint")
    normalize: bool = Field(False, description="plain state dict only: normalize inside the model with the "
                                               "dataset's mean/std (false: the network sees [0, 1] pixels, as the "
                                               "reference TRADES/ResNet-56 checkpoints expect)")

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherSpec":
        if (self.checkpoint is None) == (self.recipe is None):
            raise ValueError("give exactly one of 'checkpoint' or 'recipe'")
        if self.recipe_hash is not None:
            if self.recipe is None:
                raise ValueError("'recipe_hash' pins a teacher recipe; a checkpoint teacher has none (its sha256 "
                                 "is recorded in the run's teachers.json)")
            if len(self.recipe_hash) != 64 or any(c not in "0123456789abcdef" for c in self.recipe_hash):
                raise ValueError(f"recipe_hash {self.recipe_hash!r} is not a sha256 (64 lowercase hex digits)")
        if self.checkpoint and Path(self.checkpoint).suffix in (".pt", ".pth", ".bin") and not self.arch:
            raise ValueError("a .pt/.pth/.bin state dict needs 'arch' (the architecture it fits)")
        if self.arch is not None:
            from ciard_deploy.models import MODELS

            _registered(MODELS, self.arch)
        return self


class TeachersConfig(Section):
    clean: TeacherSpec | None = Field(None, description="naturally trained teacher (frozen)")
    robust: TeacherSpec | None = Field(None, description="adversarially trained teacher (CIARD keeps training it)")


class MethodSection(BaseModel):
    """``name`` plus the method's own parameters, checked against its ``Config``."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(..., description="distillation/training method (`ciard recipe show` lists them)")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class AttackConfig(Section):
    eps: float = Field(8 / 255, description="L-inf radius in [0, 1] pixels, e.g. 8/255 or 0.1")
    steps: int = Field(10, gt=0, description="PGD steps of the training attack")
    step_size: float = Field(2 / 255, gt=0, description="PGD step size of the training attack")

    @field_validator("eps", "step_size", mode="before")
    @classmethod
    def _parse(cls, v: Any) -> float:
        return _eps_value(v)

    @field_serializer("eps", "step_size")
    def _write(self, v: float) -> str | float:
        return _eps_text(v)


class OptimConfig(Section):
    lr: float = Field(0.1, gt=0, description="SGD learning rate of the trained model")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(2e-4, ge=0, description="SGD weight decay")
    nesterov: bool = Field(False, description="Nesterov momentum")
    schedule: Literal["ciard", "step", "cosine", "constant"] = Field(
        "ciard", description="ciard: constant, then cosine x exp decay to 0 from `decay_start` (the paper); "
                             "step: x gamma at `milestones`; cosine: to 0 at the end; constant")
    decay_start: float = Field(0.5, ge=0, lt=1, description="ciard schedule: fraction of the epochs at constant lr")
    milestones: list[int] = Field(default_factory=list, description="step schedule: epochs at which lr *= gamma")
    gamma: float = Field(0.1, gt=0, le=1, description="step schedule: decay factor")

    @field_validator("milestones")
    @classmethod
    def _sorted(cls, v: list[int]) -> list[int]:
        if any(m <= 0 for m in v) or v != sorted(v):
            raise ValueError("milestones must be positive epochs in increasing order")
        return v


class TrainConfig(Section):
    epochs: int = Field(10, gt=0, description="training epochs")
    seed: int = Field(0, description="seed of weights, data order, augmentation and attacks")
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps; "
                                            "--device overrides it")
    amp: Literal["off", "bf16", "fp16"] = Field("off", description="mixed precision autocast (fp16 adds a grad "
                                                                   "scaler and needs CUDA; bf16 works on CPU too)")
    channels_last: bool = Field(True, description="channels_last memory format on CUDA (ignored elsewhere)")
    deterministic: bool = Field(False, description="deterministic kernels (slower on GPU)")
    eval_every: int = Field(1, gt=0, description="evaluate for model selection every N epochs (and the last)")
    eval_dense_from: int | None = Field(None, gt=0, description="evaluate every epoch from this epoch on")
    eval_n: int = Field(500, gt=0, description="images of the fixed model-selection subset")
    eval_attack: str | None = Field("pgd20", description="attack of the model-selection evaluation (null: clean only)")
    selection: Literal["holdout", "test"] = Field(
        "holdout", description="model selection on a held-out part of the training set (honest) or on the test "
                               "set (the reference code's choice, for reproduction)")
    select_by: Literal["mean", "clean", "robust"] = Field(
        "mean", description="best checkpoint by (clean + robust) / 2, clean or robust accuracy")
    eval_step_size: float | None = Field(
        None, gt=0, description="step size of the pgd/pgdt/cw evaluation attacks (null: each attack's default, "
                                "2/255 for pgd and cw); set it for budgets far from 8/255 (e.g. eps/4)")
    final_attacks: list[str] = Field(default_factory=lambda: ["pgd20"],
                                     description="attacks of the final test-set evaluation in summary.json")
    final_eval_n: int | None = Field(None, gt=0, description="test images of the final evaluation (null: all)")
    sync_bn: bool = Field(False, description="DDP: convert the student's BatchNorm to SyncBatchNorm")

    @field_validator("eval_step_size", mode="before")
    @classmethod
    def _step(cls, v: Any) -> float | None:
        return None if v is None else _eps_value(v)

    @field_serializer("eval_step_size")
    def _write_step(self, v: float | None) -> str | float | None:
        return None if v is None else _eps_text(v)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        v = v.strip().lower()
        if v in ("auto", "cpu", "mps", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"unknown device {v!r}: use auto, cpu, cuda, cuda:N or mps")

    @field_validator("eval_attack")
    @classmethod
    def _attack(cls, v: str | None) -> str | None:
        if v is not None:
            _check_attack_spec(v)
        return v

    @field_validator("final_attacks")
    @classmethod
    def _attacks(cls, v: list[str]) -> list[str]:
        for spec in v:
            _check_attack_spec(spec)
        return v

    @model_validator(mode="after")
    def _selection_needs_attack(self) -> "TrainConfig":
        if self.eval_attack is None and self.select_by != "clean":
            raise ValueError(f"select_by {self.select_by!r} needs an eval_attack (or set select_by: clean)")
        return self


def _check_attack_spec(spec: str) -> None:
    from ciard_deploy.attacks.base import parse_attack_spec

    try:
        parse_attack_spec(spec)
    except CiardError as e:
        raise ValueError(str(e)) from None


# --------------------------------------------------------------------------- deploy (ciard run)
def _gate_threshold(name: str, value: Any) -> float | None:
    """One gate threshold checked by verify's own rules (``0.9`` or ``"90%"``, fractions in [0, 1])."""
    from ciard_deploy.verify.gates import Gates

    if value is None:
        return None
    source = "deploy.gates"
    try:
        return getattr(Gates.create(source=source, **{name: value}), name)
    except CiardError as e:
        # verify words it "<source>: <gate> <problem>"; pydantic already names the key
        raise ValueError(str(e).removeprefix(f"{source}: {name} ").removeprefix(f"{source}: ")) from None


def _make_gates_section() -> type[BaseModel]:
    """``deploy.gates``: one optional field per gate of ``verify.gates.SPECS`` (names, metrics and
    descriptions come from there, so the recipe and ``ciard verify`` always know the same gates)."""
    from pydantic import create_model

    from ciard_deploy.verify.gates import SPECS

    fields: dict[str, Any] = {
        name: (float | None, Field(None, description=f"{spec.description}: {spec.metric} {spec.op} this "
                                                     f"(a fraction, or \"90%\"; same as verify's {spec.flag})"))
        for name, spec in SPECS.items()}

    def _check(cls: type, v: Any, info: Any) -> float | None:
        return _gate_threshold(info.field_name, v)

    validators = {"_thresholds": field_validator(*SPECS, mode="before")(classmethod(_check))}
    model = create_model("DeployGates", __base__=Section, __validators__=validators,  # type: ignore[call-overload]
                         **fields)
    model.__doc__ = "Release gates judged on every exported artifact by ``ciard verify`` (unset: no gate)."
    return model


DeployGates = _make_gates_section()


class DeployPack(Section):
    attacks: list[str] = Field(default_factory=lambda: ["apgd-ce", "apgd-t"],
                               description="white-box attacks crafted on the PyTorch student and stored in the "
                                           "robustness pack (transferred to every artifact)")
    artifact_attacks: list[str] = Field(
        default_factory=lambda: ["apgd-ce", "apgd-t", "fab-t", "mtpgd100"],
        description="white-box attacks run on each exported ONNX artifact itself (gradients from its twin, every "
                    "iterate scored on its runtime); [] leaves verify with an upper bound (transfer + query-only)")
    allow_untrusted_twin: bool = Field(False, description="attack an artifact through a twin that agrees with its "
                                                          "runtime on < 99.5 % of images instead of failing")
    n: int = Field(1000, gt=0, description="test images in the pack (seeded, class-stratified; all of the test "
                                           "split if it has fewer)")
    eps: float | None = Field(None, description="L-inf budget of the pack's attacks and of the live attacks (null: "
                                                "the recipe's attack.eps)")
    step_size: float | None = Field(None, gt=0, description="step of the iterative pack attacks (null: each "
                                                            "attack's default, max(2/255, eps/4))")

    @field_validator("attacks")
    @classmethod
    def _attacks(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one attack (e.g. [apgd-ce, apgd-t])")
        for spec in v:
            _check_attack_spec(spec)
        if len(set(v)) != len(v):
            raise ValueError(f"attack listed twice in {v}")
        return v

    @field_validator("artifact_attacks")
    @classmethod
    def _artifact_attacks(cls, v: list[str]) -> list[str]:
        from ciard_deploy.attacks.base import GRADIENTS, parse_attack_spec

        for spec in v:
            _check_attack_spec(spec)
            if GRADIENTS not in parse_attack_spec(spec)[0].requires:
                raise ValueError(f"{spec} is query-only: it runs live in verify (deploy.live_attacks), not on the twin")
        if len(set(v)) != len(v):
            raise ValueError(f"attack listed twice in {v}")
        return v

    @field_validator("eps", "step_size", mode="before")
    @classmethod
    def _parse(cls, v: Any) -> float | None:
        return None if v is None else _eps_value(v)

    @field_serializer("eps", "step_size")
    def _write(self, v: float | None) -> str | float | None:
        return None if v is None else _eps_text(v)


def _default_live() -> list[str]:
    from ciard_deploy.verify.live import DEFAULT_LIVE

    return list(DEFAULT_LIVE)


def _live_text(queries: Any) -> str:
    """``square_queries: 300`` as the new key reads it (``live_attacks: [square300]``)."""
    if isinstance(queries, int) and not isinstance(queries, bool) and queries >= 0:
        return f"live_attacks: [{f'square{queries}' if queries else ''}]"
    return f"live_attacks from {queries!r}"


class DeployConfig(Section):
    """What ``ciard run`` does after training: export, robustness pack, verification and its gates."""

    formats: list[str] = Field(default_factory=lambda: ["onnx", "onnx-int8"],
                               description="export formats (`ciard export --list`): onnx, onnx-fp16, onnx-int8, "
                                           "tensorrt-fp32, tensorrt-fp16, tensorrt-int8; each one is verified")
    opset: int = Field(18, description="ONNX opset of the exported files")
    calib: Literal["clean", "adversarial", "mixed"] = Field(
        "clean", description="INT8 calibration images: clean, adversarial (PGD on the FP32 student) or mixed")
    calib_n: int = Field(512, gt=0, description="INT8 calibration images from the training split")
    calib_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="onnxruntime INT8 calibration method")
    parity_n: int = Field(512, gt=0, description="test images of the export's parity check against PyTorch")
    pack: DeployPack = Field(default_factory=DeployPack, description="the robustness pack built on the PyTorch "
                                                                      "student")
    live_attacks: list[str] = Field(
        default_factory=_default_live, validation_alias=AliasChoices("square_queries", "live_attacks"),
        description="query-only attacks run live on each runtime by verify (registered attacks that need no "
                    "gradients: square<Q>), e.g. [square1000]; [] turns them off (verify's --live). The old key "
                    "square_queries: N still reads as [square<N>] (0: []) and wins over live_attacks")
    live_n: int | None = Field(None, gt=0, validation_alias=AliasChoices("square_n", "live_n"),
                               description="images the live attacks attack (one seeded class-stratified subset of "
                                           "the pack; null: all; verify's --live-n; the old key square_n reads as it)")
    provider: Literal["cpu", "cuda", "tensorrt"] = Field(
        "cpu", description="onnxruntime execution provider of the export check and of verify")
    seed: int = Field(0, description="seed of the parity/pack samples, calibration, attacks and live attacks")
    gates: DeployGates = Field(default_factory=DeployGates,  # type: ignore[valid-type]
                               description="release gates, judged on every artifact (verify's --min-clean, ...); "
                                           "none set: the artifacts are reported NOT GATED, never passed")
    allow_mismatch: bool = Field(False, description="judge an artifact even when a warning says the numbers may not "
                                                    "be about it (V103, V104, V105, V109); false: such a warning "
                                                    "fails the run (verify's --allow-mismatch)")
    strict: bool = Field(False, description="every verify warning fails the run, mismatches included (verify's "
                                            "--strict)")

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[str]) -> list[str]:
        from ciard_deploy.export.base import FORMATS

        if not v:
            raise ValueError("give at least one format (e.g. [onnx, onnx-int8])")
        for name in v:
            _registered(FORMATS, name)
        return list(dict.fromkeys(v))

    @field_validator("opset")
    @classmethod
    def _opset(cls, v: int) -> int:
        from ciard_deploy.export.base import MAX_OPSET, MIN_OPSET

        if not MIN_OPSET <= v <= MAX_OPSET:
            raise ValueError(f"opset must lie in {MIN_OPSET}..{MAX_OPSET}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _old_live_keys(cls, data: Any) -> Any:
        """The old keys (``square_queries``, ``square_n``) win over the new ones when both are given (an
        old ``--set deploy.square_queries=0`` on a recipe that has ``live_attacks``); validation maps them."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        for old, new in (("square_queries", "live_attacks"), ("square_n", "live_n")):
            if old in data:
                also = f", over {new}: {data.pop(new)!r}" if new in data else ""
                log.info("deploy.%s is the old name of deploy.%s: read as %s%s", old, new,
                         _live_text(data[old]) if old == "square_queries" else f"{new}: {data[old]!r}", also)
        return data

    @field_validator("live_attacks", mode="before")
    @classmethod
    def _live(cls, v: Any) -> Any:
        from ciard_deploy.verify.live import live_from_square_queries, parse_live

        if isinstance(v, int) and not isinstance(v, bool):  # the old key: square_queries: N
            if v == 1:
                raise ValueError("Square needs at least 2 queries per image (0 turns it off)")
            try:
                return live_from_square_queries(v, "square_queries")
            except CiardError as e:
                raise ValueError(str(e)) from None
        if v is None or isinstance(v, str):
            raise ValueError("give a list of query-only attacks, e.g. [square1000] ([] turns them off)")
        try:
            return parse_live(v, "", pack_hint="white-box attacks belong in deploy.pack.attacks (or "
                                                           "deploy.pack.artifact_attacks for the artifacts themselves)")
        except CiardError as e:
            raise ValueError(str(e)) from None

    def gates_mapping(self) -> dict[str, float]:
        """The set gates as ``{name: threshold}`` (for ``verify.gates_from_mapping``)."""
        return {k: v for k, v in self.gates.model_dump().items() if v is not None}

    def policy_mapping(self) -> dict[str, bool]:
        """How verify judges warnings, as ``{allow_mismatch, strict}`` (for ``verify.gates.Policy``)."""
        return {"allow_mismatch": self.allow_mismatch, "strict": self.strict}


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
        if d.get("deploy") is None:
            d.pop("deploy", None)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=100)

    def hash_payload(self) -> dict[str, Any]:
        """What :attr:`hash` covers: the resolved recipe without its ``deploy`` section."""
        d = self.to_dict()
        d.pop("deploy", None)
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

        Raises:
            RecipeError: a teacher recipe cannot be read or does not validate.
        """
        canon = json.dumps(self.hash_payload(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canon.encode()).hexdigest()

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
                                                                                 "each by checkpoint or by recipe")

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
        """The resolved recipe with each teacher recipe's path replaced by its content hash."""
        d = super().hash_payload()
        for role, h in self.teacher_hashes().items():
            d["teachers"][role].pop("recipe", None)
            d["teachers"][role]["recipe_hash"] = h
        return d


Recipe = Union[TrainRecipe, DistillRecipe]
RECIPE_CLASSES: dict[str, type[RecipeBase]] = {"train": TrainRecipe, "distill": DistillRecipe}


# --------------------------------------------------------------------------- YAML, extends, overrides
def read_yaml(path: str | Path) -> dict[str, Any]:
    """One YAML mapping from a file; a missing file or bad YAML is a one-line RecipeError."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe not found: {p}" + (" (it is a folder)" if p.is_dir() else ""))
    size = p.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{p}: {size} bytes, more than the {MAX_RECIPE_BYTES} a recipe may have")
    try:
        data = yaml.safe_load(p.read_text())
        check_tree(data, max_nodes=RECIPE_MAX_NODES)  # nesting, and aliases expanding into millions of values
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{p}:{where}: not valid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{p}: not a text file") from None
    except RecursionError:
        raise RecipeError(f"{p}: nested too deeply to be a recipe") from None
    except LimitError as e:
        raise RecipeError(f"{p}: {e}; not a recipe") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: a recipe must be a YAML mapping (key: value), got {type(data).__name__}")
    return data


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` wins; mappings merge key by key, anything else (lists, scalars, null) replaces."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


#: most values one recipe file may hold, YAML aliases expanded (shipped recipes hold about a hundred)
RECIPE_MAX_NODES = 100_000


def load_raw(path: str | Path, _chain: tuple[Path, ...] = (), _count: list[int] | None = None) -> dict[str, Any]:
    """A recipe file with its ``extends`` chain merged in (no validation). ``extends`` is a path,
    or a list of paths merged in order, relative to the file that names it.

    Bounded: a cycle, a chain deeper than ``limits.MAX_EXTENDS_DEPTH`` files, or more than
    ``limits.MAX_EXTENDS_FILES`` files read in all (a file extended twice counts twice: a fan-out
    of lists of parents grows exponentially) is a RecipeError before the next file is read."""
    p = Path(path).resolve()
    if p in _chain:
        cycle = " -> ".join(str(c.name) for c in (*_chain, p))
        raise RecipeError(f"recipe extends itself: {cycle}")
    root = _chain[0] if _chain else p
    if len(_chain) >= MAX_EXTENDS_DEPTH:
        raise RecipeError(f"{root}: its extends chain is deeper than {MAX_EXTENDS_DEPTH} files "
                          f"({' -> '.join(c.name for c in _chain[:3])} -> ... -> {p.name})")
    count = _count if _count is not None else [0]
    count[0] += 1
    if count[0] > MAX_EXTENDS_FILES:
        raise RecipeError(f"{root}: its extends read more than {MAX_EXTENDS_FILES} recipe files (the same parents "
                          "listed over and over?)")
    data = read_yaml(p)
    parents = data.pop("extends", None)
    if parents is None:
        return _absolutize_paths(data, p.parent)
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(x, str) for x in parents):
        raise RecipeError(f"{p}: 'extends' must be a path or a list of paths")
    merged: dict[str, Any] = {}
    for parent in parents:
        pp = (p.parent / parent)
        if not pp.is_file():
            raise RecipeError(f"{p}: extends {parent!r}, which is not found at {pp}")
        merged = deep_merge(merged, load_raw(pp, (*_chain, p), count))
    return deep_merge(merged, _absolutize_paths(data, p.parent))


_PATH_KEYS = (("data", "data_root"), ("teachers", "clean", "checkpoint"), ("teachers", "clean", "recipe"),
              ("teachers", "robust", "checkpoint"), ("teachers", "robust", "recipe"))


def _absolutize_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative file paths in a recipe are relative to the file that writes them."""
    data = copy.deepcopy(data)
    for keys in _PATH_KEYS:
        node: Any = data
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            node[keys[-1]] = _resolve_path(node[keys[-1]], base)
    return data


def _resolve_path(value: str, base: Path) -> str:
    """``value`` with ``$VARS`` and ``~`` expanded, made absolute against ``base`` and normalized
    (``..``, symlinks): one file has one spelling, whichever way the recipe wrote it."""
    expanded = Path(os.path.expandvars(value)).expanduser()
    return str((base / expanded).resolve())


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], value parsed as a YAML scalar/flow value)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.epochs=2")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
        check_tree(parsed, max_nodes=RECIPE_MAX_NODES)
    except (yaml.YAMLError, RecursionError, LimitError):
        parsed = value
    return key.split("."), parsed


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Applies ``--set a.b=value`` overrides in order (unknown keys are caught by validation)."""
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise RecipeError(f"--set {text!r}: {'.'.join(keys[:i + 1])} is a value, not a section")
            node = nxt
        node[keys[-1]] = value
    return data


# --------------------------------------------------------------------------- validation
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
        method_data, method_problems = _validate_method(method_raw)
        problems += method_problems
        data["method"] = method_data
    try:
        recipe = cls.model_validate(data)
    except ValidationError as e:
        problems = _format_errors(e, cls) + problems
        recipe = None
    if recipe is not None and not problems:
        problems += _cross_checks(recipe)
    if problems:
        err = RecipeError(_problem_message(where, problems))
        err.problems = problems  # type: ignore[attr-defined]
        raise err
    assert recipe is not None
    if source is not None:
        recipe._source = Path(source)
    return recipe


def _problem_message(where: str, problems: list[str]) -> str:
    if len(problems) == 1:
        return f"{where}: {problems[0]}"
    return f"{where}: {len(problems)} problems\n" + "\n".join(f"  {p}" for p in problems)


def _validate_method(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    from ciard_deploy.distill.methods import METHODS

    name = raw["name"]
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return raw, [f"method.name: unknown method {name!r}{hint}; valid: {', '.join(METHODS.names())}"]
    cfg_cls = METHODS.get(name).Config
    params = {k: v for k, v in raw.items() if k != "name"}
    try:
        cfg = cfg_cls.model_validate(params)
    except ValidationError as e:
        return raw, _format_errors(e, cfg_cls, prefix=("method",))
    return {"name": name, **cfg.model_dump(mode="json")}, []


def _cross_checks(recipe: Recipe) -> list[str]:
    """Rules that span sections: the teachers a method needs, the holdout the selection needs."""
    from ciard_deploy.distill.methods import METHODS

    problems = []
    needed = tuple(getattr(METHODS.get(recipe.method.name), "teachers", ()))
    if isinstance(recipe, TrainRecipe):
        if needed:
            problems.append(f"method.name: {recipe.method.name!r} distills from teacher(s) "
                            f"{', '.join(needed)}: use kind: distill with a teachers section")
    else:
        for role in TEACHER_ROLES:
            spec = getattr(recipe.teachers, role)
            if role in needed and spec is None:
                problems.append(f"teachers.{role}: required by method {recipe.method.name!r} "
                                f"(give a checkpoint or a recipe)")
            elif role not in needed and spec is not None:
                problems.append(f"teachers.{role}: method {recipe.method.name!r} does not use a {role} teacher "
                                f"(remove it or set teachers.{role}: null)")
    if recipe.train.selection == "holdout" and recipe.data.holdout == 0:
        problems.append("data.holdout: selection 'holdout' needs a held-out part (or set train.selection: test)")
    if recipe.optim.schedule == "step" and not recipe.optim.milestones:
        problems.append("optim.milestones: the step schedule needs milestones (epochs)")
    return problems


def _format_errors(err: ValidationError, model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[str]:
    out = []
    for e in err.errors():
        loc = tuple(str(x) for x in e["loc"])
        path = ".".join((*prefix, *loc)) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(model, loc[:-1])
            close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else (f" (valid: {', '.join(valid)})" if valid else "")
            out.append(f"{path}: unknown key{hint}")
        elif e["type"] == "missing":
            out.append(f"{path}: required")
        else:
            msg = e["msg"]
            for lead in ("Value error, ", "Assertion failed, "):
                msg = msg.removeprefix(lead)
            out.append(f"{path}: {msg}")
    return out


def _valid_keys(model: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    """Field names of the (sub)model found by following ``loc`` from ``model``."""
    import typing

    cur: Any = model
    for part in loc:
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return []
        ann = cur.model_fields[part].annotation
        cur = next((a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return []


# --------------------------------------------------------------------------- public entry points
def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Reads, merges (``extends``), overrides (``a.b=value``) and validates a recipe file."""
    p = Path(path)
    data = apply_overrides(load_raw(p), overrides)
    return validate_recipe(data, source=p)


def recipe_from_dict(data: Mapping[str, Any], overrides: Sequence[str] = ()) -> Recipe:
    """Validates a recipe given as a mapping (paths are taken as given)."""
    return validate_recipe(apply_overrides(dict(data), overrides))


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


# --------------------------------------------------------------------------- shipped recipes
def recipes_dir() -> Path | None:
    """The folder of the shipped recipes, the first of:

    1. ``$CIARD_RECIPES``, when set (a RecipeError if it is not a folder);
    2. ``ciard_deploy/recipes/`` inside the installed package: a wheel carries the repository's
       top-level ``recipes/`` there (pyproject.toml maps it in at build time);
    3. ``recipes/`` of the source checkout the package is imported from (a checkout on
       ``PYTHONPATH`` or an editable install): the same files, read in place.

    None when there is none (then ``list_recipes`` is empty and only recipe files can be named).
    """
    import ciard_deploy

    env = os.environ.get("CIARD_RECIPES")
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise RecipeError(f"CIARD_RECIPES={env}: not a folder (unset it to use the shipped recipes)")
        return p
    pkg = Path(ciard_deploy.__file__).resolve().parent
    if (pkg / "recipes").is_dir():
        return pkg / "recipes"
    checkout = pkg.parent
    if (checkout / "recipes").is_dir() and (checkout / "pyproject.toml").is_file():
        return checkout / "recipes"
    return None


def list_recipes() -> dict[str, Path]:
    """Shipped recipe name (path under recipes/ without .yaml) -> file. Files starting with ``_``
    are bases that other recipes extend, not recipes of their own."""
    root = recipes_dir()
    if root is None:
        return {}
    out = {}
    for p in sorted(root.rglob("*.yaml")):
        if p.name.startswith("_") or any(part.startswith((".", "_")) for part in p.relative_to(root).parts[:-1]):
            continue
        out[p.relative_to(root).with_suffix("").as_posix()] = p
    return out


def find_recipe(ref: str | Path) -> Path:
    """A recipe file from a path, or from a shipped recipe's name (``quick/digits_ciard_...`` or its
    last part alone when that is unique)."""
    p = Path(ref)
    if p.is_file():
        return p
    name = str(ref).removesuffix(".yaml").removesuffix(".yml")
    shipped = list_recipes()
    if name in shipped:
        return shipped[name]
    by_stem = [path for key, path in shipped.items() if key.rsplit("/", 1)[-1] == name]
    if len(by_stem) == 1:
        return by_stem[0]
    if p.suffix in (".yaml", ".yml") or "/" in str(ref) and not shipped:
        raise RecipeError(f"recipe not found: {ref}")
    close = difflib.get_close_matches(name, list(shipped) + [k.rsplit("/", 1)[-1] for k in shipped], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = f"; `ciard recipe ls` lists the {len(shipped)} shipped ones" if shipped else ""
    raise RecipeError(f"recipe not found: {ref} is neither a file nor a shipped recipe name{hint}{where}")


def field_docs(model: type[BaseModel] | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type, description) of every field, for ``ciard recipe show``."""
    rows: list[tuple[str, str, str]] = []
    if model is None:
        seen: set[str] = set()
        for cls in (DistillRecipe, TrainRecipe):
            for row in field_docs(cls):
                if row[0] not in seen:
                    seen.add(row[0])
                    rows.append(row)
        return rows
    import typing

    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = f.annotation
        sub = next((a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is not None and sub is not MethodSection:
            rows.append((key, "section", f.description or ""))
            rows += field_docs(sub, key + ".")
        else:
            rows.append((key, _type_name(ann), f.description or ""))
    return rows


def _type_name(ann: Any) -> str:
    text = repr(ann) if not isinstance(ann, type) else ann.__name__
    return text.replace("typing.", "").replace("NoneType", "None")


__all__ = [
    "AttackConfig", "DataConfig", "DeployConfig", "DeployGates", "DeployPack", "DistillRecipe", "MethodSection",
    "ModelSpec", "OptimConfig", "Recipe",
    "RecipeBase", "SCHEMA_VERSION", "TeacherSpec", "TeachersConfig", "TrainConfig", "TrainRecipe",
    "apply_overrides", "check_recipe_tree", "check_teacher_pin", "deep_merge", "field_docs", "find_recipe",
    "list_recipes", "load_raw", "load_recipe", "load_teacher_recipe", "recipe_from_dict", "recipes_dir",
    "teacher_recipe_paths", "validate_recipe",
]
