"""What every CLI verb shares: the console, error-to-exit-code mapping, progress and JSON output.

The library never prints: it raises CiardError subclasses and calls progress callbacks; this
module turns those into one-line messages, exit codes and rich progress bars.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ciard_deploy.errors import CiardError

console = Console()
err_console = Console(stderr=True)


class State:
    verbose: bool = False
    quiet: bool = False


def setup_logging(verbose: bool, quiet: bool = False) -> None:
    from rich.logging import RichHandler

    logger = logging.getLogger("ciard_deploy")
    logger.handlers.clear()
    handler = RichHandler(console=err_console, show_path=False, show_time=False, rich_tracebacks=True)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def handle_errors(fn: Callable) -> Callable:
    """Maps CiardError to one line on stderr and its exit code; other exceptions stay bugs."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CiardError as e:
            if State.verbose:
                err_console.print_exception()
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def write_json(path: Path | None, obj: Any) -> None:
    if path is None:
        return
    from ciard_deploy.io import atomic_write_json

    atomic_write_json(path, obj)
    if not State.quiet:
        err_console.print(f"wrote {path}")


@contextmanager
def progress(description: str, total: int | None = None, unit: str = "img") -> Iterator[Callable[..., None]]:
    """A progress callback ``update(done, total=None, stage=None)`` rendered as a rich bar on a
    terminal, as a plain line every ~10 % off a terminal (CI logs), or nothing with --quiet."""
    if State.quiet:
        yield lambda *a, **k: None
        return
    if err_console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        start = time.perf_counter()
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=err_console,
                      transient=False) as bar:
            task = bar.add_task(description, total=total, rate="")

            def update(done: int, total_: int | None = None, stage: str | None = None) -> None:
                rate = done / max(time.perf_counter() - start, 1e-9)
                bar.update(task, completed=done, total=total_ or total,
                           description=f"{description} {stage}" if stage else description,
                           rate=f"{rate:,.0f} {unit}/s")

            yield update
        return
    start = time.perf_counter()
    last = {"pct": -10.0, "stage": None}

    def update_plain(done: int, total_: int | None = None, stage: str | None = None) -> None:
        tot = total_ or total or 0
        pct = 100.0 * done / tot if tot else 0.0
        if stage != last["stage"] or pct >= last["pct"] + 10 or done == tot:
            last.update(pct=pct, stage=stage)
            rate = done / max(time.perf_counter() - start, 1e-9)
            err_console.print(f"{description}{' ' + stage if stage else ''}: {done}/{tot} ({pct:.0f}%) "
                              f"{rate:,.0f} {unit}/s", highlight=False)

    yield update_plain


def note(msg: str) -> None:
    """``msg`` as one plain line on stderr (no markup, not wrapped), unless --quiet."""
    if not State.quiet:
        err_console.print(escape(msg), highlight=False, soft_wrap=True)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


# --------------------------------------------------------------------------- options shared by verbs
#: ``--set a.b=value`` of every verb that reads a recipe (distill, train, run)
SetOption = Annotated[List[str], typer.Option(
    "--set", "-s", help="Override a recipe value, e.g. --set train.epochs=2 or --set deploy.gates.min_clean=0.9 "
                        "(repeatable; values parsed as YAML).")]
#: ``--device`` of the verbs that train or attack on a torch device
DeviceOption = Annotated[Optional[str], typer.Option(
    "--device", help="auto, cpu, cuda, cuda:N or mps (default: the recipe's).")]
#: ``--quiet`` of the long-running verbs
QuietOption = Annotated[bool, typer.Option(
    "--quiet", "-q", help="No progress output (the final table and errors still print).")]
