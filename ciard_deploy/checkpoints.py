"""Checkpoint files: the format and reading/writing them, without building a model.

A checkpoint is two files: ``NAME.safetensors`` (weights) and ``NAME.json`` (the model card,
``CheckpointMeta``: architecture (with its stem, for a ``timm:``/``torchvision:`` one), classes, input
shape, dataset, normalization, eps, recipe hash, versions, metrics), validated on read
(``CheckpointCard``). Users' own ``.pt``/``.pth`` files go through ``torch.load(weights_only=True)``
only: nothing here ever unpickles arbitrary code.

Rebuilding a model from a checkpoint needs the model and dataset registries:
``ciard_deploy.model_loader`` (above ``models`` and ``data``). This module imports neither, nor torch
at import time (``verify`` and the CLI resolve checkpoints on a torch-free device).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ciard_deploy.errors import ArtifactError
from ciard_deploy.fingerprint import sha256_file
from ciard_deploy.io import atomic_path, atomic_write_json, library_versions
from ciard_deploy.limits import (ClassNames, Finite, NumClasses, ShortText, TrainingEps, check_image_shape,
                                 read_json_artifact, schema_problems)

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "student", "module")
# keys that published checkpoints carry for modules this code base does not have
IGNORED_PREFIXES = ("sub_block1.",)  # TRADES WRN-34-10 release

# ---------------------------------------------------------------- checkpoint metadata
@dataclass
class CheckpointMeta:
    """Everything needed to rebuild and trust a model: the model card that travels with the weights."""

    arch: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str = ""
    classes: tuple[str, ...] = ()
    eps: float | None = None
    recipe_hash: str = ""
    role: str = "model"  # student, clean_teacher, robust_teacher, model
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)
    extra: dict[str, Any] = field(default_factory=dict)
    stem: str | None = None  # a family architecture's stem (``models.create_model``); written only when set
    format: str = "ciard-checkpoint/1"
    activation: str | None = None  # an architecture's activation choice (``create_model``); written only when set

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("input_shape", "mean", "std", "classes"):
            d[k] = list(d[k])
        for k in ("stem", "activation"):
            if d[k] is None:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CheckpointMeta":
        known = {f for f in cls.__dataclass_fields__}
        try:
            kw = {k: v for k, v in d.items() if k in known}
            for k in ("input_shape", "mean", "std", "classes"):
                if k in kw:
                    kw[k] = tuple(kw[k])
            return cls(**kw)
        except TypeError as e:
            raise ArtifactError(f"checkpoint metadata incomplete: {e}") from None


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, metadata) paths for ``x``, ``x.safetensors`` or ``x.json``."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_checkpoint(path: str | os.PathLike, model: Any, meta: CheckpointMeta) -> Path:
    """Writes ``<stem>.safetensors`` + ``<stem>.json`` atomically; returns the weights path."""
    from safetensors.torch import save_file

    weights, meta_path = checkpoint_paths(path)
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap_model(model).state_dict().items()}
    d = meta.to_dict()
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"ciard": json.dumps({"arch": meta.arch, "format": meta.format})})
    d["weights_sha256"] = sha256_file(weights)
    atomic_write_json(meta_path, d)
    return weights


class CheckpointCard(BaseModel):
    """What ``read_meta`` accepts from a checkpoint's ``.json``: every field ``CheckpointMeta`` holds, typed
    and bounded (a model of 10^9 classes or a 10^9-pixel input is refused before anything is built);
    unknown keys (``weights_sha256``, newer fields) are kept."""

    model_config = ConfigDict(strict=True, extra="allow")

    arch: Annotated[str, Field(min_length=1, max_length=200)]
    num_classes: NumClasses
    input_shape: list[int]
    mean: Annotated[list[Finite], Field(min_length=1, max_length=64)]
    std: Annotated[list[Annotated[float, Field(gt=0, allow_inf_nan=False)]], Field(min_length=1, max_length=64)]
    dataset: ShortText = ""
    classes: ClassNames = Field(default_factory=list)
    eps: TrainingEps | None = None
    recipe_hash: ShortText = ""
    role: ShortText = "model"
    metrics: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
    stem: Literal["cifar"] | None = None
    format: ShortText = "ciard-checkpoint/1"
    activation: Literal["relu6", "relu"] | None = None

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, v: list[int]) -> list[int]:
        return check_image_shape(v)

    @model_validator(mode="after")
    def _consistent(self) -> "CheckpointCard":
        channels = self.input_shape[0]
        if len(self.mean) not in (1, channels) or len(self.std) != len(self.mean):
            raise ValueError(f"mean and std must have 1 or {channels} values each (one per channel), got "
                             f"{len(self.mean)} and {len(self.std)}")
        if self.classes and len(self.classes) != self.num_classes:
            raise ValueError(f"{len(self.classes)} class names for num_classes {self.num_classes}")
        return self


def read_meta(path: str | os.PathLike) -> CheckpointMeta:
    """The checkpoint card (``NAME.json``) beside ``NAME.safetensors``, validated (``CheckpointCard``).

    Raises:
        ArtifactError: the weights or the card are missing, the card is not JSON, is larger or nested
            deeper than ``limits`` allows, or a field is of the wrong type or out of bounds (named).
    """
    weights, meta_path = checkpoint_paths(path)
    if not weights.exists():
        raise ArtifactError(f"checkpoint not found: {weights}")
    if not meta_path.exists():
        raise ArtifactError(f"checkpoint metadata missing: {meta_path} (a ciard checkpoint is .safetensors + .json)")
    d = read_json_artifact(meta_path, "checkpoint metadata")
    if not isinstance(d, dict):
        raise ArtifactError(f"checkpoint metadata {meta_path} is not a JSON object (got a {type(d).__name__})")
    try:
        CheckpointCard.model_validate(d)
    except ValidationError as e:
        raise ArtifactError(f"checkpoint metadata {meta_path}: {schema_problems(e)}") from None
    return CheckpointMeta.from_dict(d)


# ---------------------------------------------------------------- torch files (weights only)
class UnreadableTorchFile(ArtifactError):
    """``torch.load(weights_only=True)`` refused or could not read a file; ``reason`` says why in a few words
    (never torch's own advice, which suggests ``weights_only=False``: that would run the code a hostile file
    carries). Callers say what the file should have been."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _torch_load_reason(e: BaseException) -> str:
    """A short reason for a failed ``torch.load(weights_only=True)``, without torch's advice."""
    import re

    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        reason = f"it holds pickled code or objects ({found.group(1)}), which ciard never loads"
    elif "WeightsUnpickler error:" in text:
        lines = [ln.strip() for ln in text.split("WeightsUnpickler error:", 1)[1].splitlines() if ln.strip()]
        reason = f"not plain tensors: {lines[0] if lines else 'unpickling failed'}"
    elif isinstance(e, EOFError):
        reason = "the file is empty or truncated"
    elif "PytorchStreamReader" in text or isinstance(e, RuntimeError):
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        reason = f"truncated or damaged: {first.split('. ')[0].removeprefix('PytorchStreamReader ')}"
    else:
        first = text.strip().splitlines()[0] if text.strip() else ""
        reason = f"{type(e).__name__}{': ' + first if first else ''}"
    if "weights_only" in reason or "arbitrary code" in reason:
        reason = f"unreadable ({type(e).__name__})"
    return reason if len(reason) <= 200 else reason[:197] + "..."


def load_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load`` of ``path`` on the CPU with ``weights_only=True`` (no pickled code ever runs), torch's
    warnings silenced.

    Raises:
        UnreadableTorchFile: corrupt, truncated, not a torch file, or carrying pickled code or objects (an
            ArtifactError, exit 2; callers raise their own line with its ``reason``).
        OSError: the file cannot be opened or read (permission denied, ...).
    """
    import pickle
    import warnings

    import torch

    p = Path(path)
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4 ... the weights_only Unpickler ..."
            warnings.simplefilter("ignore")
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except (OSError, MemoryError, RecursionError):
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError, AttributeError, KeyError,
            IndexError, UnicodeDecodeError, ImportError) as e:  # what a hostile or damaged file can raise
        raise UnreadableTorchFile(p, _torch_load_reason(e)) from None


# ---------------------------------------------------------------- state dicts
def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Tensors from a .safetensors file or a .pt/.pth/.bin file (torch.load weights_only=True)."""
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise ArtifactError(f"corrupt safetensors file {p}: {e}") from None
    try:
        obj = load_torch_file(p)
    except UnreadableTorchFile as e:
        if "pickled code" in e.reason:
            raise ArtifactError(f"refusing {p}: {e.reason}; re-save it as a plain state dict (or .safetensors)") \
                from None
        raise ArtifactError(f"cannot read checkpoint {p}: corrupt or not a PyTorch/safetensors file ({e.reason})") \
            from None
    return unwrap_state_dict(obj, p)


def unwrap_state_dict(obj: Any, source: Path | str = "checkpoint") -> dict[str, Any]:
    """Finds the tensor dict inside the usual wrappers (state_dict, model, net, ...)."""
    import torch

    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if isinstance(obj, dict):
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], dict)), None)
            if inner is not None:
                obj = inner
                continue
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
        break
    raise ArtifactError(f"no state dict found in {source} (looked for a tensor dict or keys {', '.join(WRAPPER_KEYS)})")


def unwrap_model(model: Any) -> Any:
    """The module inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while hasattr(model, "module") and not hasattr(model, "net"):
        model = model.module
    return getattr(model, "_orig_mod", model)


def adapt_state_dict(state: dict[str, Any], model: Any) -> dict[str, Any]:
    """Strips ``module.`` / ``_orig_mod.`` prefixes, drops known-unused keys, and adds the
    ``net.`` prefix when the state dict is for the bare network inside ``Normalized``."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    dropped = [k for k in out if k.startswith(IGNORED_PREFIXES)]
    if dropped:
        log.info("ignoring %d keys of unused modules (%s...)", len(dropped), dropped[0])
        out = {k: v for k, v in out.items() if k not in dropped}
    target = set(model.state_dict())
    if hasattr(model, "net") and not any(k.startswith("net.") for k in out):
        out = {f"net.{k}": v for k, v in out.items()}
        for buf in ("mean", "std"):  # a bare network has no normalization: keep the model's own
            if buf in target and buf not in out:
                out[buf] = model.state_dict()[buf]
    return out


def load_weights_into(model: Any, path: str | os.PathLike) -> None:
    """Loads a checkpoint file into ``model`` strictly; a mismatch names the offending keys."""
    state = adapt_state_dict(read_state_dict(path), model)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        if shape:
            k = shape[0]
            parts.append(f"shape mismatch at {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        raise ArtifactError(f"{Path(path).name} does not fit this architecture: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------- model sources
def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A checkpoint path from a run dir (its best student), a ``.safetensors``/``.json`` stem or a .pt file."""
    p = Path(source)
    if p.is_dir():
        for name in ("student_best", "student_last", "model_best", "model_last", "model"):
            if (p / f"{name}.safetensors").exists():
                return p / f"{name}.safetensors"
        raise ArtifactError(f"{p} is a folder without a checkpoint (student_best.safetensors expected)")
    if p.suffix == ".json" and p.with_suffix(".safetensors").exists():
        return p.with_suffix(".safetensors")
    if not p.exists():
        raise ArtifactError(f"checkpoint not found: {p}")
    return p



__all__ = ["CheckpointCard", "CheckpointMeta", "IGNORED_PREFIXES", "UnreadableTorchFile", "WRAPPER_KEYS",
           "adapt_state_dict", "checkpoint_paths", "load_torch_file", "load_weights_into", "read_meta",
           "read_state_dict", "resolve_checkpoint", "save_checkpoint", "unwrap_model", "unwrap_state_dict"]
