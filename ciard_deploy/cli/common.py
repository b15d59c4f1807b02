"""What every CLI verb shares: the console, error-to-exit-code mapping, progress and JSON output.

The library never prints: it raises CiardError subclasses and calls progress callbacks; this
module turns those into one-line messages, exit codes and rich progress bars.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ciard_deploy.errors import CiardError, UsageError, file_problem, missing_dependency, too_large
from ciard_deploy.run_folder import resolve_run_folder
from ciard_deploy.checkpoints import checkpoint_paths, resolve_checkpoint
from ciard_deploy.io import atomic_write_json, json_text
from ciard_deploy.verify.report import check_report_paths

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


def _command_name(fn: Callable) -> str:
    """``ciard VERB`` of a verb function (``eval_cmd`` -> ``ciard eval``; a function of cli/recipe.py
    -> ``ciard recipe VERB``), for the line of a missing dependency."""
    verb = getattr(fn, "__name__", "command").removesuffix("_cmd")
    group = getattr(fn, "__module__", "").rpartition(".")[2]
    return f"ciard recipe {verb}" if group == "recipe" else f"ciard {verb}"


def _fail(e: CiardError) -> typer.Exit:
    if State.verbose:
        err_console.print_exception()
    err_console.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(e.exit_code)


def handle_errors(fn: Callable) -> Callable:
    """Maps CiardError to one line on stderr and its exit code; other exceptions stay bugs, except a
    module of the ``train`` extra that is not installed (torch on a device install): exit 3, one line
    saying what to install (``errors.missing_dependency``), whichever verb needed it. A verb called with
    ``--json -`` (its ``json_out``) prints its tables to stderr (:func:`json_on_stdout`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with json_on_stdout(kwargs.get("json_out")):
                return fn(*args, **kwargs)
        except CiardError as e:
            raise _fail(e) from None
        except ModuleNotFoundError as e:
            missing = missing_dependency(e, _command_name(fn))
            if missing is None:
                raise
            raise _fail(missing) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except OSError as e:  # EACCES, ENOSPC, ENAMETOOLONG, EROFS, ...: bad input or unwritable output
            raise _fail(file_problem(e)) from None
        except (RecursionError, MemoryError) as e:
            raise _fail(too_large(e)) from None

    return wrapper


#: ``--json -``: the JSON goes to stdout (and the tables people read go to stderr)
STDOUT = "-"


def is_stdout(path: str | Path | None) -> bool:
    """``--json -``: write to stdout, not to a file."""
    return path is not None and str(path) == STDOUT


@contextmanager
def json_on_stdout(json_out: str | Path | None) -> Iterator[None]:
    """With ``--json -`` (every verb's ``json_out``; :func:`handle_errors` applies this) the tables and lines
    ``console`` prints go to stderr for the verb's duration, so stdout holds the JSON document alone."""
    if not is_stdout(json_out):
        yield
        return
    old = console.stderr
    console.stderr = True
    try:
        yield
    finally:
        console.stderr = old


def check_outputs(outputs: dict[str, str | Path | None], force: bool,
                  inputs: dict[str, str | Path | None] | None = None) -> None:
    """Before any work (exit 2, one line, nothing written): every output file (``--json``, report flags)
    writable, distinct, none of them an input of the command (``inputs``; not even with ``--force``), and
    none an existing file unless ``force``. ``-`` (stdout) and None are skipped."""

    files = {flag: Path(p) for flag, p in outputs.items() if p is not None and not is_stdout(p)}
    check_report_paths(files, inputs or {})
    if not force:
        for flag, p in files.items():
            if p.exists():
                raise UsageError(f"{flag} {p} already exists; pass --force to overwrite it")


def checkpoint_inputs(source: str | Path, flag: str = "CHECKPOINT") -> dict[str, str | Path | None]:
    """The files a checkpoint argument reads, as ``inputs`` of :func:`check_outputs`: the path given and,
    where it names a checkpoint (a run dir, a ``ciard run`` folder, a weights file or its card), the weights
    and the ``.json`` card it resolves to. A source that does not resolve is left to the verb to refuse."""

    out: dict[str, str | Path | None] = {flag: source}
    try:
        weights, card = checkpoint_paths(resolve_checkpoint(resolve_run_folder(source, "checkpoint")))
    except (CiardError, OSError, ValueError):
        return out
    return {**out, f"{flag} {weights}": weights, f"the card of {flag} {weights}": card}


def artifact_inputs(path: str | Path | None, flag: str = "ARTIFACT") -> dict[str, str | Path | None]:
    """The files an artifact argument reads, as ``inputs`` of :func:`check_outputs`: the path given, the
    ``manifest.json`` beside an artifact file (or inside an export folder, with every file it holds: each
    may be one of its artifacts) and, for a checkpoint, its weights and card (:func:`checkpoint_inputs`)."""
    if path is None:
        return {}
    p = Path(path)
    out: dict[str, str | Path | None] = {flag: path}
    try:
        folder = p if p.is_dir() else p.parent
        out[f"the manifest of {flag}"] = folder / "manifest.json"
        if p.is_dir():
            out.update({f"{flag}'s {f.name}": f for f in sorted(p.iterdir()) if f.is_file()})
    except OSError:
        return out
    if p.suffix in (".safetensors", ".json", ".pt", ".pth") or p.is_dir():
        out.update(checkpoint_inputs(path, flag))
    return out


def write_json(path: str | Path | None, obj: Any, force: bool = False) -> None:
    """``--json PATH``: ``obj`` as JSON, to stdout when PATH is ``-``, else to the file (atomic; an existing
    file only with ``force``: :func:`check_outputs` refuses it before the work, this refuses it again)."""
    if path is None:
        return

    if is_stdout(path):
        sys.stdout.write(json_text(obj))
        sys.stdout.flush()
        return
    check_outputs({"--json": path}, force)
    atomic_write_json(path, obj)
    if not State.quiet:
        err_console.print(f"wrote {path}", highlight=False)


class PhaseRate:
    """The throughput of the current phase of a progress callback, as text (``"1,234 img/s"``).

    A phase is one ``stage``: the rate restarts when the stage changes (or ``done`` goes back, a
    resumed count) and is measured from the phase's first update, so it counts only that phase's
    work. Until a phase has two updates at least ``min_seconds`` apart the text is empty: one tiny
    interval gives no 71,485 img/s, a step still running gives no 0 step/s.
    """

    def __init__(self, unit: str = "img", clock: Callable[[], float] = time.perf_counter,
                 min_seconds: float = 0.5) -> None:
        self.unit = unit
        self.clock = clock
        self.min_seconds = min_seconds
        self.stage: str | None = None
        self.t0: float | None = None  # when the current phase's first update came
        self.done0 = 0
        self.new_phase = False  # did the last call start a phase?

    def seconds(self) -> float:
        """Seconds since the current phase's first update."""
        return 0.0 if self.t0 is None else self.clock() - self.t0

    def __call__(self, done: int, stage: str | None = None) -> str:
        now = self.clock()
        self.new_phase = self.t0 is None or stage != self.stage or done < self.done0
        if self.new_phase:
            self.stage, self.t0, self.done0 = stage, now, done
            return ""
        dt = now - self.t0  # type: ignore[operator]
        if dt < self.min_seconds or done <= self.done0:
            return ""
        rate = (done - self.done0) / dt
        number = f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 1 else f"{rate:.2f}"
        return f"{number} {self.unit}/s"


@contextmanager
def progress(description: str, total: int | None = None, unit: str = "img",
             clock: Callable[[], float] = time.perf_counter) -> Iterator[Callable[..., None]]:
    """A progress callback ``update(done, total=None, stage=None)`` rendered as a rich bar on a
    terminal, as a plain line every ~10 % off a terminal (CI logs), or nothing with --quiet.

    Each ``stage`` is a phase of its own (:class:`PhaseRate`): its rate and, on a terminal, the
    bar's elapsed time restart when the stage changes; off a terminal a phase's last line says how
    long it took."""
    if State.quiet:
        yield lambda *a, **k: None
        return
    rate = PhaseRate(unit, clock)
    if err_console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=err_console,
                      transient=False) as bar:
            task = bar.add_task(description, total=total, rate="")
            state = {"updates": 0}

            def update(done: int, total_: int | None = None, stage: str | None = None) -> None:
                text = rate(done, stage)
                label = f"{description} {stage}" if stage else description
                if rate.new_phase and state["updates"]:  # a new phase: its own elapsed time
                    bar.reset(task, total=total_ or total, completed=done, description=label, rate="")
                state["updates"] += 1
                bar.update(task, completed=done, total=total_ or total, description=label, rate=text)

            yield update
        return
    last = {"pct": -10.0}

    def update_plain(done: int, total_: int | None = None, stage: str | None = None) -> None:
        tot = total_ or total or 0
        pct = 100.0 * done / tot if tot else 0.0
        text = rate(done, stage)
        if rate.new_phase or pct >= last["pct"] + 10 or done == tot:
            last.update(pct=pct)
            took = f", {rate.seconds():.1f} s" if done == tot and text else ""
            err_console.print(f"{description}{' ' + stage if stage else ''}: {done}/{tot} ({pct:.0f}%)"
                              f"{' ' + text if text else ''}{took}", highlight=False)

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
#: ``--json PATH`` of the verbs that print a table (``-``: stdout; see :func:`json_on_stdout`)
JsonOption = Annotated[Optional[Path], typer.Option(
    "--json", help="Also write what is shown as JSON to this file; - writes it to stdout (the table then goes to "
                   "stderr). An existing file needs --force.")]
#: ``--force`` of the verbs whose only output is ``--json``
ForceJsonOption = Annotated[bool, typer.Option("--force", help="Overwrite an existing --json file.")]


# --------------------------------------------------------------------------- --threads and run folders
def available_cpus() -> int:
    """The CPUs this process may use: its affinity mask where the OS has one (Linux), else os.cpu_count()."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


#: ``--threads`` of eval, export, pack, verify and run (quickstart keeps its default of 1); see apply_threads
ThreadsOption = Annotated[Optional[int], typer.Option(
    "--threads", help=f"torch and onnxruntime intra-op threads (default: the CPUs this process may use, "
                      f"{available_cpus()} here; 1 is fastest for tiny models on a loaded machine).")]


def apply_threads(threads: Optional[int], *, torch: bool = True) -> int:
    """``--threads`` made explicit: checked (>= 1), ``available_cpus()`` when not given, set as torch's
    intra-op threads when ``torch`` (and torch imports; a verb that needs it says so later) and returned
    for onnxruntime's sessions, so neither library picks its own.

    Raises:
        UsageError: below 1 (exit 2).
    """
    if threads is None:
        threads = available_cpus()
    elif isinstance(threads, bool) or threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    if torch:
        try:
            import torch as _torch
        except ImportError:
            return threads
        _torch.set_num_threads(threads)
    return threads


def from_run_folder(path: Path, need: str) -> Path:
    """``path``, or the part ``need`` of the ``ciard run`` folder it names (``run_folder.resolve_run_folder``),
    with one line on stderr saying what was picked."""
    picked = resolve_run_folder(path, need)  # type: ignore[arg-type]
    if picked != Path(path):
        note(f"using {picked} from the run folder {path}")
    return picked
