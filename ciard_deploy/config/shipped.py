"""Shipped recipes: where they are (``$CIARD_RECIPES``, the installed package, the source checkout) and
finding one by name (``quick/digits_ciard_...`` or its last part alone when unique).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import ciard_deploy
from ciard_deploy.errors import RecipeError


def recipes_dir() -> Path | None:
    """The folder of the shipped recipes, the first of:

    1. ``$CIARD_RECIPES``, when set (a RecipeError if it is not a folder);
    2. ``ciard_deploy/recipes/`` inside the installed package: a wheel carries the repository's
       top-level ``recipes/`` there (pyproject.toml maps it in at build time);
    3. ``recipes/`` of the source checkout the package is imported from (a checkout on
       ``PYTHONPATH`` or an editable install): the same files, read in place.

    None when there is none (then ``list_recipes`` is empty and only recipe files can be named).
    """
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


__all__ = ["find_recipe", "list_recipes", "recipes_dir"]
