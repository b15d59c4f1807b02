"""Verbs that train: ``ciard distill`` (a student from teachers) and ``ciard train`` (a teacher or a
no-teacher baseline). Both parse, call ``ciard_deploy.distill.trainer.run`` and render.

Torch-free at import: the trainer (torch) is imported when a verb runs."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Any, Iterator, List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ciard_deploy.cli.app import app
from ciard_deploy.cli.common import ForceJsonOption, JsonOption, check_outputs, write_json
from ciard_deploy.cli.common import (DeviceOption, QuietOption, SetOption, State, console, err_console, handle_errors,
                                     progress)
from ciard_deploy.config import find_recipe, load_recipe
from ciard_deploy.distill.events import TrainingInterrupted
from ciard_deploy.errors import UsageError
from ciard_deploy.plots import safe_training_curves


class TrainProgress:
    """Renders trainer events: a heading per trained model (each teacher, then the student), a line
    per teacher reused from the cache, a rich bar per epoch on a terminal (step, loss, img/s), one
    plain line per epoch off a terminal (CI logs), the final evaluation's progress per phase
    (``final eval best pgd20@8/255``), nothing with --quiet. ``close()`` ends any live bar."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = err_console.is_terminal
        self.bar: Any = None
        self.task: Any = None
        self.runs: list[bool] = []  # the runs under way, innermost last: True for a teacher trained inside
        self.teacher_dirs: set[Path] = set()  # announced by ``teacher`` events
        self.final: contextlib.ExitStack | None = None
        self.final_update: Any = None

    def _prefix(self) -> str:
        return "teacher " if self.runs and self.runs[-1] else ""

    def __call__(self, ev: Any) -> None:
        if self.quiet:
            return
        if ev.kind == "teacher":
            self.teacher_dirs.add(Path(ev.run_dir))
            err_console.print(f"[bold]{escape(ev.message)}[/]", highlight=False, soft_wrap=True)
        elif ev.kind == "teacher_reused":
            err_console.print(escape(ev.message), highlight=False, soft_wrap=True)
        elif ev.kind == "run_start":
            teacher = Path(ev.run_dir) in self.teacher_dirs
            self.runs.append(teacher)
            m = ev.metrics or {}
            if not teacher and m.get("arch"):  # a teacher got its heading from its ``teacher`` event
                who = "the student: " if m.get("role") == "student" else ""
                err_console.print(f"[bold]training {who}{escape(str(m.get('method')))} {escape(str(m['arch']))} on "
                                  f"{escape(str(m.get('dataset')))} ({ev.epochs} epochs) -> "
                                  f"{escape(str(ev.run_dir))}[/]", highlight=False, soft_wrap=True)
            if ev.epoch >= ev.epochs > 0:
                err_console.print(f"{self._prefix()}resuming: training finished earlier, running the final "
                                  "evaluation", highlight=False)
            elif ev.epoch or ev.step:
                err_console.print(f"{self._prefix()}resuming at epoch {ev.epoch + 1} step {ev.step}", highlight=False)
        elif ev.kind == "epoch_start" and self.tty:
            self._close_bar()
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err_console,
                                transient=True)
            self.bar.start()
            self.task = self.bar.add_task(f"{self._prefix()}epoch {ev.epoch}/{ev.epochs}", total=ev.steps,
                                          completed=ev.step, info="")
        elif ev.kind == "step" and self.bar is not None:
            self.bar.update(self.task, completed=ev.step,
                            info=f"loss {ev.loss:.4f}  {ev.images_per_s:,.0f} img/s")
        elif ev.kind == "epoch_end":
            self._close_bar()
            m = ev.metrics
            evals = "".join(f"  {k} {v:.4f}" for k, v in m.get("eval", {}).items() if k != "score")
            err_console.print(f"{self._prefix()}epoch {ev.epoch}/{ev.epochs}  loss {m['loss']:.4f}  lr {m['lr']:.4g}"
                              f"{evals}  {m['images_per_s']:,.0f} img/s", highlight=False)
        elif ev.kind == "final_eval":
            self._close_bar()
            if self.final_update is None:
                self.final = contextlib.ExitStack()
                self.final_update = self.final.enter_context(progress(f"{self._prefix()}final eval", unit="img"))
            self.final_update(ev.step, ev.steps, stage=ev.message)
        elif ev.kind == "run_end":
            self.close()
            if self.runs:
                self.runs.pop()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def close(self) -> None:
        """Ends the live epoch bar and the final evaluation's progress, if any (safe to call twice)."""
        self._close_bar()
        if self.final is not None:
            self.final.close()
        self.final, self.final_update = None, None


def render_summary(summary: dict[str, Any]) -> None:
    """A table of the final numbers (test split), robust ones named by attack and budget."""
    if summary.get("status") != "complete":
        console.print(f"stopped after epoch {summary.get('epochs_done')} of {summary.get('epochs')} "
                      f"(resume with --resume): {summary.get('run_dir')}")
        return
    t = Table(title=f"{summary['method']} {summary['arch']} on {summary['dataset']} (test, n={summary['test_n']})")
    t.add_column("checkpoint")
    labels = list(dict.fromkeys(k for which in ("best", "last") for k in summary.get(which, {})))
    for lab in labels:
        t.add_column(lab, justify="right")
    sel = summary["selection"]
    for which in ("best", "last"):
        row = summary.get(which)
        if row:
            name = f"best (epoch {sel['best_epoch']}, by {sel['on']})" if which == "best" else "last"
            t.add_row(name, *(f"{100 * row[lab]:.2f}%" if lab in row else "-" for lab in labels))
    console.print(t)
    console.print(f"{summary['run_dir']}  ({summary['train_time_s']:.0f} s, {summary['images_per_s']:,.0f} img/s)",
                  highlight=False)


@contextlib.contextmanager
def console_logs_at(level: int) -> Iterator[None]:
    """The progress display shows epochs; the console log handler keeps to warnings meanwhile (the run's
    train.log still gets every INFO line)."""
    handlers = [h for h in logging.getLogger("ciard_deploy").handlers if not isinstance(h, logging.FileHandler)]
    old = [h.level for h in handlers]
    for h in handlers:
        h.setLevel(level)
    try:
        yield
    finally:
        for h, lvl in zip(handlers, old):
            h.setLevel(lvl)


def _train_verb(kind: str, recipe: str, out: Path, overrides: List[str], resume: bool, device: Optional[str],
                quiet: bool, json_out: Optional[Path] = None, force: bool = False) -> None:
    from ciard_deploy.distill.trainer import run  # torch: imported when a verb runs, not with the CLI

    path = find_recipe(recipe)
    rec = load_recipe(path, overrides)
    if rec.kind != kind:
        other = "distill" if kind == "train" else "train"
        raise UsageError(f"{path} is a kind {rec.kind!r} recipe: run it with `ciard {other}`")
    check_outputs({"--json": json_out}, force, {"RECIPE": path})
    quiet = quiet or State.quiet
    start = time.perf_counter()
    shown = TrainProgress(quiet)
    try:
        with console_logs_at(logging.DEBUG if State.verbose else logging.WARNING):
            try:
                summary = run(rec, out, resume=resume, device=device, callbacks=[shown])
            finally:
                shown.close()  # no live bar above the lines that follow (an interruption, the table)
    except TrainingInterrupted as e:
        sets = "".join(f" --set {shlex.quote(o)}" for o in overrides)  # train.loggers=[tensorboard]: not markup
        err_console.print(f"[yellow]{escape(str(e))}[/]\nresume with: {escape(f'ciard {kind} {recipe} --out {out}{sets}')} --resume",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 alone reports
    render_summary(summary)
    write_json(json_out, summary, force)
    plots = safe_training_curves(out)  # logs instead of failing: a finished run never breaks on a plot
    if not quiet:
        if plots:
            err_console.print(f"training curves: {plots[0].parent}", highlight=False)
        err_console.print(f"done in {time.perf_counter() - start:.0f} s", highlight=False)


def _register_training_verb(kind: str, recipe_help: str, doc: str) -> None:
    """`ciard distill` and `ciard train`: the same options, one definition; each checks its recipe's kind."""

    def verb(
        recipe: str = typer.Argument(..., help=recipe_help),
        out: Path = typer.Option(..., "--out", "-o", help="Run dir to create (or to continue with --resume)."),
        overrides: SetOption = [],
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last saved state."),
        device: DeviceOption = None,
        quiet: QuietOption = False,
        json_out: JsonOption = None,
        force: ForceJsonOption = False,
    ) -> None:
        _train_verb(kind, recipe, out, overrides, resume, device, quiet, json_out, force)

    verb.__name__ = verb.__qualname__ = kind
    verb.__doc__ = doc
    app.command(kind)(handle_errors(verb))


_register_training_verb(
    "distill", "Recipe file, or a shipped recipe name (`ciard recipe ls`).",
    """Distill a student from its teachers (teachers given by recipe are trained first and cached).

    Multi-GPU: torchrun --nproc_per_node N -m ciard_deploy distill RECIPE --out DIR
    """)
_register_training_verb(
    "train", "A kind 'train' recipe: a teacher (natural, pgd_at, trades) or a baseline.",
    """Train a teacher or a no-teacher baseline (natural, PGD-AT, TRADES) on its own.""")
