"""Fingerprints: the one home of every hash ciard computes, one convention per purpose.

Each convention below is stored on disk somewhere, so it is fixed: changing one changes the
values old files hold (and a recipe's hash names its trained models). They differ because their
purposes differ:

- ``sha256_file``: a file's bytes. Manifests, packs, checkpoint cards, state keys, ``workflow.json``.
- ``canonical_json_hash``: JSON with sorted keys, no spaces, ``str()`` for what JSON cannot hold.
  Recipe hashes (shipped recipes' hashes never change), ``workflow.json``'s stage inputs.
- ``array_hash``: per array its ``dtype.str``, shape and ``;``, then its C-order bytes. Resumable
  state keys (eval states, pack partials): sample indices; ``data_hash`` is it over float32 images
  and int64 labels (a key's ``data_sha256``).
- ``checksum_arrays``: per array, in name order, ``name|dtype|shape|`` then its bytes, written
  ``"sha256:<hex>"``. The ``checksum`` of packs and pack partials (``.npz``); DDP weight digests.
- ``float32_sha256``: the array's bytes as float32, C order, nothing else. The export manifest's
  calibration and reference image sets.

``flatten`` turns nested settings into dotted keys: how two fingerprinted inputs (stage inputs,
recipes, attack settings) are compared key by key, so a mismatch names what differs.

numpy only (torch tensors are read through ``.detach().cpu().numpy()``), so ``verify`` hashes on a
device without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

import numpy as np

#: bytes read per step when hashing a file
FILE_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike, chunk: int = FILE_CHUNK) -> str:
    """Hex sha256 of a file's bytes, read in chunks (weights files of hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    """``obj`` as canonical JSON: sorted keys, no spaces, ``str()`` for anything JSON cannot hold."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def canonical_json_hash(obj: Any) -> str:
    """Hex sha256 of ``canonical_json(obj)``: equal content, equal hash, whatever the key order."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def _numpy(a: Any, dtype: Any = None) -> np.ndarray:
    a = a.detach().cpu().numpy() if hasattr(a, "detach") else a
    return np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)


def array_hash(*arrays: Any) -> str:
    """Hex sha256 over the dtype, shape and bytes of each array (C order): equal data, equal hash."""
    h = hashlib.sha256()
    for a in arrays:
        arr = np.ascontiguousarray(_numpy(a))
        h.update(f"{arr.dtype.str}{arr.shape};".encode())
        h.update(arr.reshape(-1).view(np.uint8) if arr.size else b"")  # no copy of large image arrays
    return h.hexdigest()


def data_hash(x: Any, y: Any) -> str:
    """``array_hash`` of float32 images and int64 labels (numpy arrays or torch tensors)."""
    return array_hash(_numpy(x, np.float32), _numpy(y, np.int64))


def checksum_arrays(arrays: Mapping[str, Any]) -> str:
    """``"sha256:<hex>"`` over each array's name, dtype, shape and bytes, in name order (``checksum`` skipped)."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        if key == "checksum":
            continue
        a = np.ascontiguousarray(_numpy(arrays[key]))
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return f"sha256:{h.hexdigest()}"


def float32_sha256(x: Any) -> str:
    """Hex sha256 of an array's bytes as float32, C order (how calibration and parity image sets are named)."""
    return hashlib.sha256(np.ascontiguousarray(_numpy(x), dtype=np.float32).tobytes()).hexdigest()


def flatten(d: Mapping[str, Any], prefix: str = "", *, keep_empty: bool = False) -> dict[str, Any]:
    """Nested mappings as one level of dotted keys: ``{"a": {"b": 1}} -> {"a.b": 1}``.

    An empty nested mapping is dropped, or kept as the value of its key with ``keep_empty``.
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and (v or not keep_empty):
            out.update(flatten(v, key, keep_empty=keep_empty))
        else:
            out[key] = v
    return out


__all__ = ["FILE_CHUNK", "array_hash", "canonical_json", "canonical_json_hash", "checksum_arrays", "data_hash",
           "flatten", "float32_sha256", "sha256_file"]
