"""The metadata every exported artifact carries, as flat string pairs (ONNX ``metadata_props``)
or as a JSON sidecar (TensorRT engines).

Each key is stored as ``ciard.<key>`` with a JSON-encoded value, so one codec serves ONNX
files, engine sidecars and the manifest. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ciard_deploy.limits import LimitError, loads_json, read_json

PREFIX = "ciard."
SCHEMA = "ciard-artifact/1"
SIDECAR_SUFFIX = ".json"

#: keys written into every artifact (see export/manifest.py for what each holds)
KEYS = ("schema", "arch", "num_classes", "classes", "input_spec", "normalization", "dataset", "eps",
        "recipe_hash", "source_sha256", "precision", "format", "opset", "calibration", "versions", "engine")


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
