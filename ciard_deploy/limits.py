"""Bounds on what ciard reads from files it did not necessarily write: packs, manifests, checkpoint
cards, recipes. A file that exceeds one is refused before anything large is allocated.

The ground floor (torch-free, imports only ``errors`` of ours): the readers (``verify.pack``,
``export.manifest``, ``checkpoints.read_meta``, ``config.load_raw``) turn a ``LimitError`` or a
``pydantic.ValidationError`` into their own one-line ``CiardError`` naming the file and the field
(``read_json_artifact`` does it for a JSON file).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Annotated

from pydantic import Field, ValidationError

from ciard_deploy.errors import ArtifactError

#: largest JSON file read whole (a manifest or checkpoint card is a few KiB; a pack's metadata, with its
#: sample indices, a few hundred KiB)
MAX_JSON_BYTES = 16 << 20
#: deepest nesting of JSON or YAML containers (ciard's own files nest at most 6 deep)
MAX_DEPTH = 32
#: most values in one JSON/YAML document, counted after YAML aliases are expanded (a "billion laughs"
#: recipe is refused, not expanded)
MAX_NODES = 1_000_000
#: largest recipe file
MAX_RECIPE_BYTES = 1 << 20
#: deepest ``extends:`` chain, and most recipe files one recipe may pull in through it (repeats counted)
MAX_EXTENDS_DEPTH = 16
MAX_EXTENDS_FILES = 64
#: most classes a model may have (ImageNet-21k has 21,841)
MAX_CLASSES = 100_000
#: most values in one input image (C * H * W); 3 x 2048 x 2048 is 12.6 M
MAX_IMAGE_ELEMENTS = 1 << 24
#: most artifacts one manifest lists, attacks one pack holds
MAX_ARTIFACTS = 256
MAX_ATTACKS = 256
#: a compressed member of a pack may inflate to at most this many times its compressed size (deflate can
#: reach ~1000: a 1 MB zip of zeros would allocate 1 GB); members smaller than MIN_INFLATE_CHECK are exempt
MAX_INFLATE_RATIO = 100
MIN_INFLATE_CHECK = 1 << 20
#: most arrays in one .npz, and the largest .npy header read
MAX_NPZ_MEMBERS = 4096
MAX_NPY_HEADER = 10_000


class LimitError(ValueError):
    """A file exceeds a bound or cannot be parsed; the message names what (the caller names the file)."""


class NotJson(LimitError):
    """The text is not JSON (or not UTF-8) at all: damaged or someone else's file, rather than a hostile one."""


# --------------------------------------------------------------------------- typed fields for the schemas
#: a budget: a finite number > 0 (NaN, inf, 0, negatives and strings are refused)
Eps = Annotated[float, Field(gt=0, allow_inf_nan=False)]
#: a training eps as a checkpoint records it (0 for a natural model)
TrainingEps = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
NumClasses = Annotated[int, Field(ge=2, le=MAX_CLASSES)]
Dim = Annotated[int, Field(ge=1, le=MAX_IMAGE_ELEMENTS)]
ClassNames = Annotated[list[str], Field(max_length=MAX_CLASSES)]
ShortText = Annotated[str, Field(max_length=4096)]


def check_image_shape(shape: Any) -> list[int]:
    """``shape`` as (C, H, W): three ints >= 1 whose product is at most ``MAX_IMAGE_ELEMENTS``."""
    if not isinstance(shape, (list, tuple)) or len(shape) != 3:
        raise ValueError("must be a list of 3 ints (C, H, W)")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape):
        raise ValueError("must hold 3 positive ints (C, H, W)")
    if math.prod(shape) > MAX_IMAGE_ELEMENTS:
        raise ValueError(f"{math.prod(shape)} values per image, more than {MAX_IMAGE_ELEMENTS}")
    return list(shape)


# --------------------------------------------------------------------------- JSON and trees
def check_tree(obj: Any, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> None:
    """Refuses containers nested deeper than ``max_depth`` or holding more than ``max_nodes`` values in
    all (shared references, e.g. YAML aliases, counted each time they appear). Iterative: no recursion."""
    stack: list[tuple[Any, int]] = [(obj, 0)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise LimitError(f"holds more than {max_nodes} values")
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        if depth >= max_depth:
            raise LimitError(f"nests deeper than {max_depth} levels")
        stack.extend((c, depth + 1) for c in children)


def loads_json(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` with the bounds above: LimitError for bad JSON, too deep or too many values."""
    if len(text) > MAX_JSON_BYTES:
        raise LimitError(f"{len(text)} characters of JSON, more than {MAX_JSON_BYTES}")
    try:
        data = json.loads(text)
    except RecursionError:
        raise LimitError(f"nests deeper than {max_depth} levels") from None
    except json.JSONDecodeError as e:
        raise NotJson(f"not valid JSON ({e})") from None
    check_tree(data, max_depth)
    return data


def read_json(path: str | Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file, bounded: LimitError for a file larger than ``max_bytes``, not UTF-8, or as ``loads_json``.
    OSError (absent, unreadable) passes through to the caller."""
    p = Path(path)
    size = p.stat().st_size
    if size > max_bytes:
        raise LimitError(f"{size} bytes, more than the {max_bytes} a ciard JSON file may have")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise NotJson("not a UTF-8 text file") from None
    return loads_json(text)


def read_json_artifact(path: str | Path, subject: str = "", limit_error: type[ArtifactError] = ArtifactError) -> Any:
    """``read_json`` of a file ciard reads as input, its problems as one-line errors naming the file
    (after ``subject``, e.g. ``"checkpoint metadata"``): ArtifactError when it cannot be read or is not
    JSON, ``limit_error`` when it exceeds the bounds above (a manifest's reader makes that ManifestInvalid)."""
    name = f"{subject} {path}" if subject else str(path)
    try:
        return read_json(path)
    except OSError as e:
        raise ArtifactError(f"{name} cannot be read: {e.strerror or e}") from None
    except NotJson as e:
        raise ArtifactError(f"{name} is not valid JSON: {e}") from None
    except LimitError as e:
        raise limit_error(f"{name}: {e}") from None


def schema_problems(err: ValidationError, shown: int = 3, missing: str = "missing the key") -> str:
    """A pydantic error as one line naming each field: ``field 'model.num_classes': Input should be a
    valid integer (got 'ten')``, ``missing the key 'attacks'``; at most ``shown`` problems, then how many more."""
    out = []
    errors = err.errors(include_url=False)
    for e in errors[:shown]:
        loc = ".".join(str(p) for p in e.get("loc", ())) or "(top level)"
        if e.get("type") == "missing":
            out.append(f"{missing} '{loc}'")
            continue
        got = e.get("input")
        text = repr(got) if isinstance(got, (str, int, float, bool)) or got is None else type(got).__name__
        if len(text) > 40:
            text = text[:37] + "..."
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        out.append(f"field '{loc}': {msg} (got {text})")
    if len(errors) > shown:
        out.append(f"and {len(errors) - shown} more")
    return "; ".join(out)


__all__ = ["ClassNames", "Dim", "Eps", "Finite", "Fraction", "LimitError", "MAX_ARTIFACTS", "MAX_ATTACKS",
           "MAX_CLASSES", "MAX_DEPTH", "MAX_EXTENDS_DEPTH", "MAX_EXTENDS_FILES", "MAX_IMAGE_ELEMENTS",
           "MAX_INFLATE_RATIO", "MAX_JSON_BYTES", "MAX_NODES", "MAX_NPY_HEADER", "MAX_NPZ_MEMBERS",
           "MAX_RECIPE_BYTES", "MIN_INFLATE_CHECK", "NotJson", "NumClasses", "ShortText", "TrainingEps", "check_image_shape",
           "check_tree", "loads_json", "read_json", "read_json_artifact", "schema_problems"]
