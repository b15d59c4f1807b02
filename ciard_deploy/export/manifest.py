"""``manifest.json``: what an export folder holds, how each artifact was made and checked.

Schema ``ciard-export-manifest/1`` (every key always present; ``null`` where it does not apply)::

    schema, created, tool, status ("passed" | "failed")
    source:    {path, checkpoint, sha256, metadata_sha256, arch, role, recipe_hash, recipe_file, recipe_file_sha256}
    model:     {arch, num_classes, classes, input_shape, normalization: {mean, std, inside_model}, dataset, eps}
    reference: {backend, device, dataset, split, n, seed, images_sha256, clean_acc, attacks: {label: {...}},
                origin, checkpoint_metrics}
    calibration: {source, method, n, split, seed, sha256, attack, adversarial_fraction, symmetric} | null
    thresholds: {fp32, fp16, int8}      # minimum top-1 agreement with PyTorch
    options:   ExportOptions as a dict
    artifacts: [{name, file, sha256, size, format, precision, runtime, status, opset, ir_version,
                 input_spec: {name, shape, batch, dtype, range, layout[, max_batch]},
                 output: {name, shape}, classes, normalization, exporter: {...}, derived_from,
                 calibration, engine, sidecar, parity: {clean: {...}, adversarial: {...}},
                 metrics: {clean_acc, "<attack>@<eps> (transfer)": acc}, seconds}]
    versions:  {python, torch, onnx, onnxruntime, onnxscript, tensorrt, ...}
    warnings:  [str]

Torch-free, so ``verify`` on a device can read it and check hashes. ``ciard inspect`` of a folder or an
artifact is ``export/inspection.py``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PureWindowsPath
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from ciard_deploy import fingerprint
from ciard_deploy.errors import ArtifactError
from ciard_deploy.io import atomic_write_json
from ciard_deploy.limits import (MAX_ARTIFACTS, MAX_ATTACKS, ClassNames, Finite, Fraction, NumClasses, ShortText,
                                 TrainingEps, check_image_shape, read_json_artifact, schema_problems)
from ciard_deploy.runtime.metadata import encode_metadata

SCHEMA = "ciard-export-manifest/1"
MANIFEST_NAME = "manifest.json"


@dataclass
class ArtifactRecord:
    """One exported file in the manifest."""

    name: str
    file: str
    format: str
    precision: str
    runtime: str
    sha256: str = ""
    size: int = 0
    status: str = "unchecked"  # passed | failed | unchecked
    opset: int | None = None
    ir_version: int | None = None
    input_spec: dict[str, Any] = field(default_factory=dict)
    output: dict[str, Any] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)
    normalization: dict[str, Any] = field(default_factory=dict)
    exporter: dict[str, Any] = field(default_factory=dict)
    derived_from: str | None = None
    calibration: dict[str, Any] | None = None
    engine: dict[str, Any] | None = None
    sidecar: str | None = None
    parity: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ArtifactRecord":
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as e:
            raise ArtifactError(f"manifest artifact entry incomplete: {e}") from None


@dataclass
class Manifest:
    """The whole export folder: source, reference numbers, artifacts, versions."""

    source: dict[str, Any]
    model: dict[str, Any]
    reference: dict[str, Any]
    thresholds: dict[str, float]
    options: dict[str, Any]
    artifacts: list[ArtifactRecord] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    tool: str = ""
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    schema: str = SCHEMA

    @property
    def passed(self) -> bool:
        return all(a.passed for a in self.artifacts)

    @property
    def status(self) -> str:
        return "passed" if self.passed else "failed"

    def artifact(self, key: str) -> ArtifactRecord:
        """The record whose format name or file name is ``key``."""
        for a in self.artifacts:
            if key == a.name or Path(key).name == a.file:
                return a
        raise ArtifactError(f"the manifest lists no artifact {key!r} (it has: "
                            f"{', '.join(a.file for a in self.artifacts) or 'none'})")

    def to_dict(self) -> dict[str, Any]:
        return {"schema": self.schema, "created": self.created, "tool": self.tool, "status": self.status,
                "source": self.source, "model": self.model, "reference": self.reference,
                "calibration": self.calibration, "thresholds": self.thresholds, "options": self.options,
                "artifacts": [a.to_dict() for a in self.artifacts], "versions": self.versions,
                "warnings": self.warnings}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        if not is_ciard_manifest(d):
            raise ArtifactError("not a ciard export manifest (no 'schema: ciard-export-manifest/N' key)")
        try:
            return cls(source=d["source"], model=d["model"], reference=d["reference"], thresholds=d["thresholds"],
                       options=d.get("options", {}),
                       artifacts=[ArtifactRecord.from_dict(a) for a in d.get("artifacts", [])],
                       calibration=d.get("calibration"), versions=d.get("versions", {}),
                       warnings=list(d.get("warnings", [])), tool=d.get("tool", ""), created=d.get("created", ""),
                       schema=d["schema"])
        except KeyError as e:
            raise ArtifactError(f"manifest is missing the key {e}") from None

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        atomic_write_json(path, self.to_dict())
        return path


# --------------------------------------------------------------------------- schema (what load_manifest accepts)
class ManifestInvalid(ArtifactError):
    """A file that says it is a ciard manifest (its ``schema`` key) but does not validate: a field of the
    wrong type, an artifact path outside the export folder, absurd sizes or nesting. Refused wherever it
    is read (exit 2), ``verify`` included: a manifest that is not JSON, or not ciard's, is only a V105 there."""


def _file_name(v: str | None) -> str | None:
    """An artifact's ``file`` (or ``sidecar``, ``derived_from``): a plain name in the export folder."""
    if v is None:
        return v
    if not v or v in (".", "..") or "\x00" in v or Path(v).name != v or PureWindowsPath(v).name != v:
        raise ValueError("must be a file name inside the export folder (no folder, no '..', not absolute)")
    return v


FileName = Annotated[str, AfterValidator(_file_name)]


class _Typed(BaseModel):
    """Typed where a field is present (strict: no "10" for 10, no NaN); unknown keys are kept."""

    model_config = ConfigDict(strict=True, extra="allow")


class _ParityCheck(_Typed):
    n: int | None = Field(default=None, ge=0)
    top1_agreement: Fraction | None = None
    threshold: Fraction | None = None
    flips: int | None = Field(default=None, ge=0)
    max_abs_diff: float | None = None
    passed: bool | None = None
    summary: ShortText | None = None


class _Parity(_Typed):
    clean: _ParityCheck | None = None
    adversarial: _ParityCheck | None = None
    runtime: dict[str, Any] | None = None


class _ArtifactEntry(_Typed):
    name: ShortText
    file: FileName
    format: ShortText
    precision: ShortText
    runtime: ShortText
    sha256: ShortText = ""
    size: int = Field(default=0, ge=0)
    status: Literal["passed", "failed", "unchecked"] = "unchecked"
    opset: int | None = None
    ir_version: int | None = None
    input_spec: dict[str, Any] = Field(default_factory=dict)
    output: dict[str, Any] = Field(default_factory=dict)
    classes: ClassNames = Field(default_factory=list)
    normalization: dict[str, Any] = Field(default_factory=dict)
    exporter: dict[str, Any] = Field(default_factory=dict)
    derived_from: FileName | None = None
    calibration: dict[str, Any] | None = None
    engine: dict[str, Any] | None = None
    sidecar: FileName | None = None
    parity: _Parity = Field(default_factory=_Parity)
    metrics: dict[str, Finite] = Field(default_factory=dict)
    seconds: Finite = 0.0


class _Source(_Typed):
    path: ShortText | None = None
    checkpoint: ShortText | None = None
    sha256: ShortText | None = None
    metadata_sha256: ShortText | None = None
    arch: ShortText | None = None
    role: ShortText | None = None
    recipe_hash: ShortText | None = None


class _ModelInfo(_Typed):
    arch: ShortText | None = None
    num_classes: NumClasses | None = None
    classes: ClassNames | None = None
    input_shape: list[int] | None = None
    normalization: dict[str, Any] | None = None
    dataset: ShortText | None = None
    eps: TrainingEps | None = None

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, v: list[int] | None) -> list[int] | None:
        return None if v is None else check_image_shape(v)


class _ReferenceAttack(_Typed):
    robust_acc: Fraction


class _Reference(_Typed):
    clean_acc: Fraction | None = None
    n: int | None = Field(default=None, ge=0)
    dataset: ShortText | None = None
    split: ShortText | None = None
    attacks: dict[str, _ReferenceAttack] = Field(default_factory=dict, max_length=MAX_ATTACKS)


class _Calibration(_Typed):
    source: ShortText | None = None
    n: int | None = Field(default=None, ge=0)
    split: ShortText | None = None
    sha256: ShortText | None = None


class ManifestSchema(_Typed):
    """What ``load_manifest`` accepts: the fields the code reads, typed and bounded (artifact files are
    plain names inside the export folder); absent optional fields are fine, unknown keys are kept."""

    schema_: ShortText = Field(alias="schema")
    created: ShortText | None = None
    tool: ShortText | None = None
    status: ShortText | None = None
    source: _Source
    model: _ModelInfo
    reference: _Reference
    calibration: _Calibration | None = None
    thresholds: dict[str, Fraction]
    options: dict[str, Any] = Field(default_factory=dict)
    artifacts: list[_ArtifactEntry] = Field(default_factory=list, max_length=MAX_ARTIFACTS)
    versions: dict[str, Any] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)


def manifest_path(path: str | Path) -> Path:
    p = Path(path)
    return p / MANIFEST_NAME if p.is_dir() else p


def load_manifest(path: str | Path) -> Manifest:
    """Reads ``manifest.json`` from a folder or a file path; ArtifactError (exit 2) if absent or invalid.

    Raises:
        ArtifactError: no file, not JSON, or not a ciard manifest (no ``schema: ciard-export-manifest/N``).
        ManifestInvalid: a ciard manifest that does not validate against ``ManifestSchema`` (names the
            field), or larger or more deeply nested than ``limits`` allows.
    """
    p = manifest_path(path)
    if not p.is_file():
        raise ArtifactError(f"no export manifest at {p}")
    data = read_json_artifact(p, limit_error=ManifestInvalid)
    if not is_ciard_manifest(data):
        raise ArtifactError(f"{p} is not a ciard export manifest (no 'schema: ciard-export-manifest/N' key)")
    try:
        ManifestSchema.model_validate(data)
    except ValidationError as e:
        raise ManifestInvalid(f"{p}: {schema_problems(e)}") from None
    return Manifest.from_dict(data)


def is_ciard_manifest(data: Any) -> bool:
    """Whether parsed JSON says it is a ciard export manifest (its ``schema`` key)."""
    return isinstance(data, dict) and str(data.get("schema", "")).startswith("ciard-export-manifest/")


def artifact_file(folder: str | Path, name: str) -> Path:
    """``folder / name`` for a file a manifest lists, refused (ManifestInvalid) unless it is a plain name
    whose path, symlinks resolved, stays inside ``folder``: a manifest never makes ciard read elsewhere."""
    if not isinstance(name, str) or not name:
        raise ManifestInvalid(f"the manifest in {folder} lists an artifact without a file name")
    try:
        _file_name(name)
    except ValueError:
        raise ManifestInvalid(f"the manifest in {folder} lists {name!r}: artifact files are plain names inside the "
                              "export folder") from None
    p = Path(folder) / name
    root = Path(folder).resolve()
    if p.exists() or p.is_symlink():
        target = p.resolve()
        if target.parent != root:
            raise ManifestInvalid(f"{p} resolves to {target}, outside the export folder {root}: refusing to read it")
    return p


def check_files(manifest: Manifest, folder: str | Path) -> list[str]:
    """Problems between the manifest and the files beside it (missing, size or sha256 differs).

    Raises:
        ManifestInvalid: the manifest lists a file outside ``folder`` (``artifact_file``); nothing is read.
    """

    problems = []
    paths = [artifact_file(folder, a.file) for a in manifest.artifacts]  # every path checked before any is read
    for a, p in zip(manifest.artifacts, paths):
        if not p.is_file():
            problems.append(f"{a.file}: listed in the manifest but missing")
            continue
        if p.stat().st_size != a.size:
            problems.append(f"{a.file}: size {p.stat().st_size} differs from the manifest's {a.size}")
            continue
        digest = fingerprint.sha256_file(p)
        if digest != a.sha256:
            problems.append(f"{a.file}: sha256 {digest[:12]}... differs from the manifest's {a.sha256[:12]}...")
    return problems


# --------------------------------------------------------------------------- ONNX metadata_props
def set_onnx_metadata(model: Any, meta: dict[str, Any]) -> None:
    """Writes ``meta`` into an ``onnx.ModelProto``'s metadata_props (replacing earlier ciard keys)."""
    encoded = encode_metadata(meta)
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in encoded]
    del model.metadata_props[:]
    for k, v in keep + sorted(encoded.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
