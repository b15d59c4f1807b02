"""Recipe files as plain data: bounded YAML reading, ``extends`` chains merged, relative paths resolved,
``--set a.b=value`` overrides (no validation: ``recipe.validate_recipe`` does that).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ciard_deploy.errors import RecipeError
from ciard_deploy.limits import LimitError, MAX_EXTENDS_DEPTH, MAX_EXTENDS_FILES, MAX_RECIPE_BYTES, check_tree


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


_PATH_KEYS = (("data", "data_root"), *(("teachers", role, key) for role in ("clean", "robust")
                                       for key in ("checkpoint", "recipe", "model_dir")))


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


__all__ = ["RECIPE_MAX_NODES", "apply_overrides", "deep_merge", "load_raw", "parse_override", "read_yaml"]
