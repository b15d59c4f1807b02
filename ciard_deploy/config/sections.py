"""The training sections of a recipe: data, networks, teachers, method, attack, optimizer, training loop.

Each is a frozen pydantic model that refuses unknown keys (``Section``); names a recipe uses
(architectures, datasets, attacks) are checked against torch-free catalogs (``options.catalog``,
``attacks.base``), so validating a recipe imports no torch. A ``timm:NAME`` / ``torchvision:NAME``
architecture is checked by its form here and by its family when the model is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_serializer, field_validator,
                      model_serializer, model_validator)

from ciard_deploy.options.catalog import (DATASET_NAMES, MODEL_FAMILIES, STEMS, check_activation, check_arch,
                                          check_name, split_arch)
from ciard_deploy.options.common import Options, check_attack_spec, eps_text, eps_value

#: the teacher roles a distill recipe can name
TEACHER_ROLES = ("clean", "robust")

#: the experiment trackers ``train.loggers`` can name (``distill.loggers`` holds them; each is an extra)
LOGGER_NAMES = ("mlflow", "tensorboard")


class Section(Options):
    """Base of every recipe section: unknown keys are errors, values are immutable."""


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
        return check_name("dataset", v, DATASET_NAMES)

    @field_validator("holdout")
    @classmethod
    def _holdout_count(cls, v: float) -> float:
        if v >= 1 and not float(v).is_integer():
            raise ValueError("holdout >= 1 is a number of images and must be a whole number")
        return v


STEM_DESCRIPTION = (f"{'/'.join(STEMS)}: a {' or '.join(f'{f}:' for f in MODEL_FAMILIES)} ResNet gets a CIFAR-style "
                    "stem (3x3 stride-1 first conv, no max-pool) for small images; null: the family's own stem")


def check_stem(arch: str | None, stem: str | None) -> None:
    """A stem needs a family architecture (the built-in ones are sized for their datasets already)."""
    if stem is not None and (arch is None or split_arch(arch) is None):
        raise ValueError(f"stem {stem!r} adapts a {' or '.join(f'{f}:NAME' for f in MODEL_FAMILIES)} "
                         f"architecture; the built-in {arch!r} has its own stem (drop stem)")


class StemSection(Section):
    """A section with an optional ``stem`` (and ``activation``): left out of the dump while null, so recipes
    that do not use them keep their hash."""

    @model_serializer(mode="wrap")
    def _drop_null_stem(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        d = handler(self)
        for key in ("stem", "activation"):
            if getattr(self, key, None) is None:
                d.pop(key, None)
        return d


class ModelSpec(StemSection):
    arch: str = Field(..., description="registered architecture (`ciard models`) or a model of a family: "
                                       "timm:NAME (pip install 'ciard-deploy[timm]') or torchvision:NAME, built with "
                                       "fresh weights (pretrained stays off: nothing downloads)")
    normalize: bool = Field(True, description="normalize inside the model with the dataset's mean/std (inputs "
                                              "stay in [0, 1] either way)")
    stem: Literal["cifar"] | None = Field(None, description=STEM_DESCRIPTION)
    activation: Literal["relu6", "relu"] | None = Field(
        None, description="mobilenetv2 only: relu6 (its own, null) or relu (the kuangliu-style CIFAR MobileNetV2 "
                          "of the CIARD reference code)")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        return check_arch(v)

    @model_validator(mode="after")
    def _stem_fits(self) -> "ModelSpec":
        check_stem(self.arch, self.stem)
        check_activation(self.arch, self.activation)
        return self


#: RobustBench's datasets and threat models (``robustbench.model_zoo.enums``), spelled as its ``load_model`` takes them
ROBUSTBENCH_DATASETS = ("cifar10", "cifar100", "imagenet")
ROBUSTBENCH_THREAT_MODELS = ("Linf", "L2", "corruptions")
#: keys only a RobustBench teacher has: left out of every other teacher's resolved recipe (and so of its hash)
ROBUSTBENCH_KEYS = ("robustbench", "threat_model", "dataset", "model_dir")


class TeacherSpec(StemSection):
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
    robustbench: str | None = Field(None, description="a RobustBench model-zoo ID (e.g. Zhang2019Theoretically), "
                                                      "built by the `robustbench` package (pip install "
                                                      "'ciard-deploy[robustbench]'; normalization inside its model) "
                                                      "from <model_dir>/<dataset>/<threat_model>/<ID>.pt")
    threat_model: Literal["Linf", "L2", "corruptions"] | None = Field(
        None, description="RobustBench teacher: the leaderboard the ID is on (default Linf; a robust teacher must be "
                          "Linf, the recipe's attack)")
    dataset: Literal["cifar10", "cifar100", "imagenet"] | None = Field(
        None, description="RobustBench teacher: the dataset it was trained on (default: the recipe's dataset; "
                          "needed for an imagefolder copy)")
    model_dir: str | None = Field(None, description="RobustBench teacher: RobustBench's model_dir, the folder holding "
                                                    "<dataset>/<threat_model>/<ID>.pt (default "
                                                    "$CIARD_CACHE/robustbench, i.e. ~/.cache/ciard/robustbench)")

    @model_validator(mode="before")
    @classmethod
    def _default_threat_model(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("robustbench") is not None and data.get("threat_model") is None:
            data = {**data, "threat_model": "Linf"}  # RobustBench's own default, written out so the hash names it
        return data
    stem: Literal["cifar"] | None = Field(None, description="plain state dict of a family architecture only: "
                                                           + STEM_DESCRIPTION)

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherSpec":
        if sum(x is not None for x in (self.checkpoint, self.recipe, self.robustbench)) != 1:
            raise ValueError("give exactly one of 'checkpoint' or 'recipe' or 'robustbench' (a RobustBench ID)")
        if self.robustbench is not None:
            extra = [k for k in ("recipe_hash", "arch") if getattr(self, k) is not None]
            if extra or self.normalize:
                raise ValueError(f"a RobustBench teacher's architecture and normalization come from its model zoo: "
                                 f"remove {', '.join(extra) or 'normalize'}")
            if not self.robustbench.strip() or "/" in self.robustbench or "\\" in self.robustbench:
                raise ValueError(f"robustbench {self.robustbench!r} is not a model-zoo ID (e.g. Zhang2019Theoretically)")
        else:
            given = [k for k in ROBUSTBENCH_KEYS[1:] if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only for a RobustBench teacher ('robustbench: ID')")
        if self.recipe_hash is not None:
            if self.recipe is None:
                raise ValueError("'recipe_hash' pins a teacher recipe; a checkpoint teacher has none (its sha256 "
                                 "is recorded in the run's teachers.json)")
            if len(self.recipe_hash) != 64 or any(c not in "0123456789abcdef" for c in self.recipe_hash):
                raise ValueError(f"recipe_hash {self.recipe_hash!r} is not a sha256 (64 lowercase hex digits)")
        if self.checkpoint and Path(self.checkpoint).suffix in (".pt", ".pth", ".bin") and not self.arch:
            raise ValueError("a .pt/.pth/.bin state dict needs 'arch' (the architecture it fits)")
        if self.arch is not None:
            check_arch(self.arch)
        check_stem(self.arch, self.stem)
        return self

    @model_serializer(mode="wrap")
    def _write(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        d = handler(self)
        if self.robustbench is None:  # checkpoint and recipe teachers read (and hash) as before these keys existed
            for k in ROBUSTBENCH_KEYS:
                d.pop(k, None)
        if self.stem is None:  # as StemSection does (this serializer replaces its one)
            d.pop("stem", None)
        return d


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
        return eps_value(v)

    @field_serializer("eps", "step_size")
    def _write(self, v: float) -> str | float:
        return eps_text(v)


class OptimConfig(Section):
    lr: float = Field(0.1, gt=0, description="SGD learning rate of the trained model")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(2e-4, ge=0, description="SGD weight decay")
    nesterov: bool = Field(False, description="Nesterov momentum")
    schedule: Literal["ciard", "step", "cosine", "constant"] = Field(
        "ciard", description="ciard: constant, then cosine x exp decay to 0 from `decay_start` (the paper); "
                             "step: x gamma at `milestones`; cosine: to 0 at the end; constant")
    decay_start: float = Field(0.5, ge=0, lt=1, description="ciard schedule: fraction of the epochs at constant lr")
    milestones: list[int] = Field(default_factory=list, description="step schedule: epochs, counted from 0 as torch's "
                                                                    "MultiStepLR does, from which lr *= gamma (a script "
                                                                    "that sets `lr` when its 1-based epoch >= 75 has "
                                                                    "milestone 74)")
    gamma: float = Field(0.1, gt=0, le=1, description="step schedule: decay factor")

    @field_validator("milestones")
    @classmethod
    def _sorted(cls, v: list[int]) -> list[int]:
        if any(m <= 0 for m in v) or v != sorted(v):
            raise ValueError("milestones must be positive epochs in increasing order")
        return v


#: TrainConfig's speed switches and their defaults (today's behaviour): left out of a dump while at them
SPEED_DEFAULTS: dict[str, Any] = {"data_on_device": "auto", "fused_optimizer": False, "compile": False}


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
    loggers: list[str] = Field(default_factory=list, description="experiment trackers that get metrics.jsonl's "
                                                                 "scalars each epoch: tensorboard (<run>/tb), mlflow "
                                                                 "(<run>/mlruns, or $MLFLOW_TRACKING_URI); not "
                                                                 "part of the recipe hash")
    data_on_device: Literal["auto", "true", "false"] = Field(
        "auto", description="hold the in-memory training set on the device (uint8; crops and flips there, drawn from "
                            "the same generator: the same batches), so no step copies from the host; auto: on CUDA "
                            "when the images take under a quarter of the free GPU memory, never on CPU")
    fused_optimizer: bool = Field(False, description="the student's SGD as one fused kernel (fused=True; CUDA, and "
                                                     "CPU in recent torch); false: torch's default (foreach on CUDA)")
    compile: bool = Field(False, description="torch.compile the student and the teachers in place (their weights "
                                             "and checkpoints unchanged); the first steps pay the compile time")

    @model_validator(mode="before")
    @classmethod
    def _data_on_device_bool(cls, data: Any) -> Any:
        # YAML reads true/false as booleans: accept them for the auto|true|false switch
        if isinstance(data, dict) and isinstance(data.get("data_on_device"), bool):
            data = {**data, "data_on_device": "true" if data["data_on_device"] else "false"}
        return data

    @model_serializer(mode="wrap")
    def _drop_speed_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # the speed switches at their defaults stay out of the dump, so every recipe written before them keeps its hash
        d = handler(self)
        for key, default in SPEED_DEFAULTS.items():
            if d.get(key, default) == default:
                d.pop(key, None)
        return d

    @field_validator("eval_step_size", mode="before")
    @classmethod
    def _step(cls, v: Any) -> float | None:
        return None if v is None else eps_value(v)

    @field_serializer("eval_step_size")
    def _write_step(self, v: float | None) -> str | float | None:
        return None if v is None else eps_text(v)

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
            check_attack_spec(v)
        return v

    @field_validator("final_attacks")
    @classmethod
    def _attacks(cls, v: list[str]) -> list[str]:
        for spec in v:
            check_attack_spec(spec)
        return v

    @field_validator("loggers")
    @classmethod
    def _loggers(cls, v: list[str]) -> list[str]:
        for name in v:
            check_name("logger", name, LOGGER_NAMES)
        if len(set(v)) != len(v):
            raise ValueError(f"a logger is named twice: {v}")
        return v

    @model_validator(mode="after")
    def _selection_needs_attack(self) -> "TrainConfig":
        if self.eval_attack is None and self.select_by != "clean":
            raise ValueError(f"select_by {self.select_by!r} needs an eval_attack (or set select_by: clean)")
        return self


__all__ = ["AttackConfig", "DataConfig", "LOGGER_NAMES", "MethodSection", "ModelSpec", "OptimConfig",
           "ROBUSTBENCH_DATASETS", "ROBUSTBENCH_KEYS", "ROBUSTBENCH_THREAT_MODELS", "Section", "TEACHER_ROLES",
           "TeacherSpec", "TeachersConfig", "TrainConfig"]
