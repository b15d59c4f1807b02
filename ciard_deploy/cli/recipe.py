"""``ciard recipe ls | show | validate | cp``: find, read, check and copy recipes."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer
from rich.table import Table

from ciard_deploy.cli.app import app
from ciard_deploy.cli.common import (ForceJsonOption, JsonOption, check_outputs, console, err_console, handle_errors,
                                     write_json)
from ciard_deploy.config import check_recipe_tree, field_docs, find_recipe, list_recipes, load_raw, load_recipe, recipes_dir, validate_recipe
from ciard_deploy.errors import CiardError, RecipeError, UsageError
from ciard_deploy.io import atomic_write_text

recipe_app = typer.Typer(help="List, show, validate and copy recipes (shipped ones by name, or any file).",
                         no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("ls")
@handle_errors
def ls(json_out: JsonOption = None, force: ForceJsonOption = False) -> None:
    """List the shipped recipes: kind, method, model (the student or the trained model), dataset, epochs,
    and whether it has a deploy: section (then `ciard run` takes it)."""

    check_outputs({"--json": json_out}, force)
    shipped = list_recipes()
    if not shipped:
        err_console.print("no shipped recipes found (set CIARD_RECIPES to a recipes folder)")
        write_json(json_out, [], force)
        return
    from rich import box

    t = Table(title=f"recipes in {recipes_dir()}", box=box.SIMPLE, pad_edge=False)
    t.add_column("name", overflow="fold")
    cols = ("kind", "method", "model", "dataset", "epochs", "deploy")
    for col in cols:
        t.add_column(col, no_wrap=True, min_width=len(col))
    records = []
    for name, path in shipped.items():
        try:
            r = load_recipe(path)
        except CiardError as e:
            t.add_row(name, "[red]invalid[/]", *[""] * (len(cols) - 1))
            records.append({"name": name, "path": str(path), "valid": False, "error": str(e)})
            continue
        row = {"kind": r.kind, "method": r.method.name, "model": r.model_spec.arch, "dataset": r.data.dataset,
               "epochs": r.train.epochs, "deploy": r.deploy is not None}
        t.add_row(name, *(("yes" if v else "no") if k == "deploy" else str(v) for k, v in row.items()))
        records.append({"name": name, "path": str(path), "valid": True, **row})
    # a pipe has no width: rows stay whole there (a terminal folds the names to fit)
    if console.is_terminal:
        console.print(t)
    else:
        from rich.console import Console

        wide = console.measure(t, options=console.options.update_width(10_000)).maximum
        Console(file=console.file, width=max(console.width, wide)).print(t)
    write_json(json_out, records, force)


@recipe_app.command("show")
@handle_errors
def show(
    name: str = typer.Argument(..., help="Shipped recipe name or a recipe file."),
    overrides: List[str] = typer.Option([], "--set", "-s", help="Override a value, e.g. --set train.epochs=2."),
    fields: bool = typer.Option(True, "--fields/--no-fields", help="Also list every field with its description."),
    json_out: JsonOption = None,
    force: ForceJsonOption = False,
) -> None:
    """Print the recipe as resolved (extends merged, defaults filled in) and what each field means."""
    from ciard_deploy.distill.methods import METHODS

    path = find_recipe(name)
    check_outputs({"--json": json_out}, force, {"NAME": path})
    r = load_recipe(path, overrides)
    try:
        recipe_hash: str | None = r.hash
        digest = f"hash {r.hash[:16]}"
    except RecipeError as e:  # a teacher recipe that does not load: show the recipe anyway
        recipe_hash, digest = None, f"no hash: {e}"
    console.print(f"# {path}  ({digest})", highlight=False)
    console.print(r.to_yaml(), highlight=False, markup=False, soft_wrap=True)  # YAML lines stay whole
    rows: list[tuple[str, str, str]] = []
    for key, typ, desc in field_docs(type(r)) if fields else []:
        if key == "method":
            rows.append(("method.name", "str", f"one of {', '.join(METHODS.names())}"))
            for pname, f in METHODS.get(r.method.name).Config.model_fields.items():
                rows.append((f"method.{pname}", _type_name(f.annotation), f.description or ""))
            continue
        rows.append((key, typ, desc))
    if rows:
        t = Table(title="fields", show_lines=False)
        t.add_column("key")
        t.add_column("type")
        t.add_column("description")
        for row in rows:
            t.add_row(*row)
        console.print(t)
    write_json(json_out, {"path": str(path), "hash": recipe_hash, "recipe": r.to_dict(),
                          "fields": [{"key": k, "type": typ, "description": d} for k, typ, d in rows]}, force)


def _type_name(ann: object) -> str:
    return ann.__name__ if isinstance(ann, type) else repr(ann).replace("typing.", "")


@recipe_app.command("validate")
@handle_errors
def validate(
    paths: List[str] = typer.Argument(..., help="Recipe files or shipped names."),
    overrides: List[str] = typer.Option([], "--set", "-s", help="Override a value before validating."),
) -> None:
    """Check recipes (and the teacher recipes they name); every problem is listed. Exit 2 if any fails."""

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


    src = find_recipe(name)
    target = dest / src.name if dest.is_dir() else dest
    if target.resolve() == src.resolve():
        raise UsageError(f"{target} is the recipe being copied: give another destination")
    if target.exists() and not force:
        raise UsageError(f"{target} already exists; pass --force to overwrite it")
    raw = load_raw(src)
    validate_recipe(raw, source=src)  # never copy something that does not validate
    text = (copy_header(src, target, raw)
            + f"# copied from {src} (extends merged in)\n"
            + yaml.safe_dump(raw, sort_keys=False, default_flow_style=False, width=100))
    atomic_write_text(target, text)
    console.print(f"wrote {target}", highlight=False)


def copy_header(src: Path, target: Path, raw: dict) -> str:
    """The comment lines heading a copy of ``src`` written to ``target``: the command that runs it, then
    the source's own leading comments with every command naming the source (its path or shipped name)
    rewritten to name ``target`` (``ciard run`` lines also get their own ``--out``)."""
    import re

    kind = raw.get("kind", "distill")
    lines = src.read_text().splitlines()
    header = []
    for ln in lines:  # the leading comment block; comments further down belong to their keys
        if not ln.startswith("#"):
            break
        header.append(ln)
    names_src = re.compile(r"(?<!\S)\S*" + re.escape(src.stem) + r"(?:\.ya?ml)?(?!\S)")
    out = [f"# ciard {kind} {target} --out runs/{target.stem}"]
    for ln in header:
        if ln.startswith("# ciard ") and not ln.startswith("# ciard run "):
            continue  # replaced by the first line
        ln = names_src.sub(lambda _: str(target), ln)
        if "ciard run " in ln:
            ln = re.sub(r"--out \S+", f"--out runs/{target.stem}-deploy", ln)
        out.append(ln)
    if raw.get("deploy") is not None and not any("ciard run " in ln for ln in out):
        out.append(f"# the whole chain (export, pack, verify): ciard run {target} --out runs/{target.stem}-deploy")
    return "".join(ln + "\n" for ln in out)
