"""``ciard recipe ls | show | validate | cp``: find, read, check and copy recipes."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer
from rich.table import Table

from ciard_deploy.cli.app import app
from ciard_deploy.cli.common import console, err_console, handle_errors

recipe_app = typer.Typer(help="List, show, validate and copy recipes (shipped ones by name, or any file).",
                         no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("ls")
@handle_errors
def ls() -> None:
    """List the shipped recipes with their kind, method, model and dataset."""
    from ciard_deploy.config import list_recipes, load_recipe, recipes_dir
    from ciard_deploy.errors import CiardError

    shipped = list_recipes()
    if not shipped:
        err_console.print("no shipped recipes found (set CIARD_RECIPES to a recipes folder)")
        return
    from rich import box

    t = Table(title=f"recipes in {recipes_dir()}", box=box.SIMPLE, pad_edge=False)
    t.add_column("name", overflow="fold")
    for col in ("kind", "method", "epochs"):
        t.add_column(col, no_wrap=True, min_width=len(col))
    for name, path in shipped.items():
        try:
            r = load_recipe(path)
        except CiardError:
            t.add_row(name, "[red]invalid[/]", "", "")
            continue
        t.add_row(name, r.kind, r.method.name, str(r.train.epochs))
    console.print(t)


@recipe_app.command("show")
@handle_errors
def show(
    name: str = typer.Argument(..., help="Shipped recipe name or a recipe file."),
    overrides: List[str] = typer.Option([], "--set", "-s", help="Override a value, e.g. --set train.epochs=2."),
    fields: bool = typer.Option(True, "--fields/--no-fields", help="Also list every field with its description."),
) -> None:
    """Print the recipe as resolved (extends merged, defaults filled in) and what each field means."""
    from ciard_deploy.config import field_docs, find_recipe, load_recipe
    from ciard_deploy.distill.methods import METHODS
    from ciard_deploy.errors import RecipeError

    path = find_recipe(name)
    r = load_recipe(path, overrides)
    try:
        digest = f"hash {r.hash[:16]}"
    except RecipeError as e:  # a teacher recipe that does not load: show the recipe anyway
        digest = f"no hash: {e}"
    console.print(f"# {path}  ({digest})", highlight=False)
    console.print(r.to_yaml(), highlight=False, markup=False, soft_wrap=True)  # YAML lines stay whole
    if not fields:
        return
    t = Table(title="fields", show_lines=False)
    t.add_column("key")
    t.add_column("type")
    t.add_column("description")
    for key, typ, desc in field_docs(type(r)):
        if key == "method":
            t.add_row("method.name", "str", f"one of {', '.join(METHODS.names())}")
            for pname, f in METHODS.get(r.method.name).Config.model_fields.items():
                t.add_row(f"method.{pname}", _type_name(f.annotation), f.description or "")
            continue
        t.add_row(key, typ, desc)
    console.print(t)


def _type_name(ann: object) -> str:
    return ann.__name__ if isinstance(ann, type) else repr(ann).replace("typing.", "")


@recipe_app.command("validate")
@handle_errors
def validate(
    paths: List[str] = typer.Argument(..., help="Recipe files or shipped names."),
    overrides: List[str] = typer.Option([], "--set", "-s", help="Override a value before validating."),
) -> None:
    """Check recipes (and the teacher recipes they name); every problem is listed. Exit 2 if any fails."""
    from ciard_deploy.config import check_recipe_tree, find_recipe, load_recipe
    from ciard_deploy.errors import CiardError, RecipeError

    failed = 0
    for ref in paths:
        try:
            path = find_recipe(ref)
            r = load_recipe(path, overrides)
            problems = check_recipe_tree(r)
            if problems:
                raise RecipeError(f"{path}: " + "; ".join(problems))
        except CiardError as e:
            failed += 1
            err_console.print(f"[red]FAIL[/] {e}", highlight=False, soft_wrap=True)
            continue
        console.print(f"[green]ok[/]   {ref}  ({r.kind} {r.method.name}, hash {r.hash[:16]})", highlight=False)
    if failed:
        raise RecipeError(f"{failed} of {len(paths)} recipe(s) invalid")


@recipe_app.command("cp")
@handle_errors
def cp(
    name: str = typer.Argument(..., help="Shipped recipe name or a recipe file."),
    dest: Path = typer.Argument(..., help="File or folder to write the copy to."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Copy a recipe to edit it: written self-contained (its `extends` chain merged in, teacher recipe
    paths made absolute), headed by its original comments."""
    import yaml

    from ciard_deploy.config import find_recipe, load_raw, validate_recipe
    from ciard_deploy.errors import UsageError
    from ciard_deploy.io import atomic_write_text

    src = find_recipe(name)
    target = dest / src.name if dest.is_dir() else dest
    if target.exists() and not force:
        raise UsageError(f"{target} exists: pass --force to overwrite it")
    raw = load_raw(src)
    validate_recipe(raw, source=src)  # never copy something that does not validate
    header = [ln for ln in src.read_text().splitlines() if ln.startswith("#")]
    header = [ln for ln in header if not ln.startswith("# ciard ")]
    text = (f"# ciard {raw.get('kind', 'distill')} {target} --out runs/{target.stem}\n"
            + "".join(ln + "\n" for ln in header)
            + f"# copied from {src} (extends merged in)\n"
            + yaml.safe_dump(raw, sort_keys=False, default_flow_style=False, width=100))
    atomic_write_text(target, text)
    console.print(f"wrote {target}", highlight=False)
