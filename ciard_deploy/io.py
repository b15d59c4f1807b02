"""The ground floor of file output: atomic writes (temp file + rename), the JSON text every ciard file
holds, whether a folder can be written, and the library versions files record.

Imports nothing of the project, so everything may import it. Hashes are
``ciard_deploy.fingerprint``; checkpoints ``ciard_deploy.checkpoints`` (the files) and
``ciard_deploy.model_loader`` (rebuilding a model from them).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


# ---------------------------------------------------------------- atomic files
@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temp path in the same folder; renamed onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None:  # a write's error (ENOSPC) names no file: name the one being written
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_text(obj: Any) -> str:
    """``obj`` as the indented JSON text every ciard JSON file holds (numpy scalars and arrays, paths
    converted), ending in a newline."""
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json_text(obj))


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_blocker(folder: str | os.PathLike) -> str | None:
    """Why files could not be written into ``folder`` (made if missing), or None: its nearest existing
    ancestor (itself, when it exists) must be a folder this process may write to."""
    probe = Path(folder)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions of the libraries that shape numbers, for metadata and reports (and ``extra`` ones, e.g. a
    benchmark's independent attack stack); those not installed are left out."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("ciard-deploy", "torch", "torchvision", "numpy", "onnx", "onnxruntime", "tensorrt", *extra):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


__all__ = ["atomic_path", "atomic_write_json", "atomic_write_text", "json_text", "library_versions", "write_blocker"]
