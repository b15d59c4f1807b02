"""The metadata every exported artifact carries, as flat string pairs (ONNX ``metadata_props``)
or as a JSON sidecar (TensorRT engines).

Each key is stored as ``ciard.<key>`` with a JSON-encoded value, so one codec serves ONNX
files, engine sidecars and the manifest. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ciard_deploy.errors import ArtifactError
from ciard_deploy.limits import (ClassNames, Finite, LimitError, NumClasses, ShortText, loads_json, read_json,
                                 schema_problems)

PREFIX = "ciard."
SCHEMA = "ciard-artifact/1"
SIDECAR_SUFFIX = ".json"

#: keys written into every artifact (see export/manifest.py for what each holds)
KEYS = ("schema", "arch", "num_classes", "classes", "input_spec", "normalization", "dataset", "eps",
        "recipe_hash", "source_sha256", "precision", "format", "opset", "calibration", "versions", "engine")


class FileMetadata(NamedTuple):
    """What one artifact says about itself (``ciard inspect``), as its runtime's ``read_metadata`` reads it."""

    kind: str  #: ``"onnx"``, ``"engine"``
    metadata: dict[str, Any]  #: the decoded ciard metadata ({} when it carries none)
    other: dict[str, str]  #: the file's other metadata entries
    where: Path  #: the file that holds the metadata: the artifact itself or its JSON sidecar


def encode_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    """``{"arch": "small_cnn"} -> {"ciard.arch": '"small_cnn"'}`` (None values dropped)."""
    return {f"{PREFIX}{k}": json.dumps(v, sort_keys=True) for k, v in meta.items() if v is not None}


def decode_metadata(props: Mapping[str, str]) -> dict[str, Any]:
    """The inverse of ``encode_metadata``; other keys (``onnx.infer``, ...) are ignored."""
    out: dict[str, Any] = {}
    for k, v in props.items():
        if not k.startswith(PREFIX):
            continue
        try:
            out[k[len(PREFIX):]] = loads_json(v)  # bounded: a deeply nested value stays the raw string
        except (LimitError, TypeError):
            out[k[len(PREFIX):]] = v
    return out


class _Normalization(BaseModel):
    model_config = ConfigDict(extra="allow")
    inside_model: bool | None = None
    mean: list[Finite] | None = Field(default=None, max_length=4096)
    std: list[Finite] | None = Field(default=None, max_length=4096)


class ArtifactMetadata(BaseModel):
    """The types of the keys ``KEYS`` an artifact's metadata may carry (all optional: a plain ONNX file has
    none; unknown keys are kept for newer writers). ``eps`` is left to verify's V109, which names a
    budget that is not a number as a mismatch."""

    model_config = ConfigDict(extra="allow")
    schema_: ShortText | None = Field(default=None, alias="schema")
    arch: ShortText | None = None
    num_classes: NumClasses | None = None
    classes: ClassNames | None = None
    input_spec: dict[str, Any] | None = None
    normalization: _Normalization | None = None
    dataset: ShortText | None = None
    recipe_hash: ShortText | None = None
    source_sha256: ShortText | None = None
    precision: ShortText | None = None
    format: ShortText | None = None
    opset: int | None = Field(default=None, ge=1, le=10_000)
    calibration: dict[str, Any] | None = None
    versions: dict[str, ShortText] | None = None
    engine: dict[str, Any] | None = None


def check_metadata(meta: Mapping[str, Any], where: str | Path) -> dict[str, Any]:
    """``meta`` (decoded ``ciard.*`` metadata of ``where``) unchanged if its known keys have their types.

    Raises:
        ArtifactError (exit 2): a key of the wrong type (``num_classes: "ten"``, ``classes`` a mapping, ...),
            named with the file.
    """
    try:
        ArtifactMetadata.model_validate(dict(meta))
    except ValidationError as e:
        problems = schema_problems(e).replace("field '", "field 'ciard.")
        raise ArtifactError(f"{where}: its ciard metadata does not validate: {problems}") from None
    return dict(meta)


def sidecar_path(artifact: str | Path) -> Path:
    """``model.fp16.engine -> model.fp16.engine.json``."""
    p = Path(artifact)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def read_sidecar(artifact: str | Path) -> dict[str, Any]:
    """The JSON sidecar of an engine, or {} when there is none (or it is unreadable)."""
    p = sidecar_path(artifact)
    if not p.exists():
        return {}
    try:
        data = read_json(p)
    except (OSError, LimitError):
        return {}
    return data if isinstance(data, dict) else {}
