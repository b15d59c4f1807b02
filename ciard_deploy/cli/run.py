"""`ciard run` (one recipe: distill -> export -> pack -> verify) and `ciard quickstart` (the same on the
bundled digits data). Both parse, call ``ciard_deploy.workflow.run`` and render its result."""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ciard_deploy import workflow
from ciard_deploy.cli.app import app
from ciard_deploy.cli.common import (DeviceOption, ForceJsonOption, JsonOption, QuietOption, SetOption, State,
                                     ThreadsOption, apply_threads, check_outputs, console, err_console, handle_errors,
                                     write_json)
from ciard_deploy.cli.distill import TrainProgress, console_logs_at
from ciard_deploy.cli.verify import StagedProgress
from ciard_deploy.config import find_recipe
from ciard_deploy.errors import GateFailed
from ciard_deploy.signals import interrupt_name, terminate_as_interrupt
from ciard_deploy.verify.render import gates_table
from ciard_deploy.verify.report import VerifyReport
from ciard_deploy.workflow import QUICKSTART_RECIPE, check_out_dir, quickstart_recipe
from ciard_deploy.distill.events import TrainingInterrupted

_ACTION_STYLE = {"ran": "green", "resumed": "green", "rejudged": "cyan", "skipped": "dim"}


class StageLines:
    """Stage events as one line each on stderr (the table and the verdict go to stdout).

    ``close_live`` ends the live bars of the stage before (export, pack and verify keep their last
    bar open until the next one starts): each line prints below them, never above a bar still drawn.
    """

    def __init__(self, quiet: bool, close_live: Callable[[], None] | None = None) -> None:
        self.quiet = quiet
        self.close_live = close_live

    def __call__(self, ev: Any) -> None:
        if self.quiet:
            return
        if self.close_live is not None:
            self.close_live()
        if ev.kind == "skip":
            err_console.print(f"[dim]{ev.stage}: skipped ({escape(ev.reason)})[/]", highlight=False, soft_wrap=True)
        elif ev.kind == "start":
            verb = {"run": "running", "resume": "resuming", "rejudge": "re-judging"}.get(ev.action, ev.action)
            err_console.print(f"[bold]{ev.stage}[/]: {verb} ({escape(ev.reason)})", highlight=False, soft_wrap=True)
        elif ev.kind == "end":
            err_console.print(f"{ev.stage}: [{_ACTION_STYLE.get(ev.action, 'green')}]{ev.action}[/] in "
                              f"{ev.seconds:.1f} s", highlight=False)


# --------------------------------------------------------------------------- rendering (no logic)
def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * float(v):.1f}%"


def _size(n: Any) -> str:
    if not n:
        return "—"
    return f"{n / 1024:,.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):,.2f} MiB"


def render_result(result: Any) -> None:
    """The artifact table (PyTorch reference first), failing gates, the report paths and the verdict."""
    rows, ref = result.rows, result.reference
    recipe = result.state.get("recipe", {})
    labels = sorted({str(r["worst_case"]["label"]) for r in rows})
    t = Table(title=f"{recipe.get('method')} {recipe.get('arch')} on {recipe.get('dataset')} (n={ref.get('n')}, "
                    f"eps {ref.get('eps_label')}), verified on each runtime", title_justify="left",
              box=box.SIMPLE_HEAD, pad_edge=False)
    t.add_column("artifact", no_wrap=True)
    t.add_column("precision")
    t.add_column("size", justify="right")
    t.add_column("clean", justify="right")
    t.add_column("worst\ncase*", justify="right")
    t.add_column("agree", justify="right")
    t.add_column("gates", overflow="fold")
    t.add_row("PyTorch student", ref["precision"], _size(ref["size"]), _pct(ref["clean"]),
              f"{_pct(ref['worst_case']['acc'])}†", "—", "—", style="dim")
    for r in rows:
        g, warned = r["gates"], r.get("failed_warnings", [])
        if r["export_status"] != "passed":
            verdict = "[bold red]export check failed[/]"
        elif g["failed"]:
            verdict = f"[bold red]FAIL {g['passed']}/{g['total']}[/] {', '.join([*g['failed'], *warned])}"
        elif warned:
            verdict = f"[bold red]FAIL[/] {', '.join(warned)}" + (f" (gates {g['passed']}/{g['total']})"
                                                                 if g["total"] else "")
        elif g["total"] == 0:
            verdict = "[yellow]not gated[/]"
        else:
            verdict = f"[green]pass {g['passed']}/{g['total']}[/]"
        mark = "" if len(labels) == 1 else f" ({labels.index(str(r['worst_case']['label'])) + 1})"
        bound = "‡" if r["worst_case"].get("upper_bound") else ""
        t.add_row(Path(r["file"]).name, r["precision"], _size(r["size"]), _pct(r["clean"]),
                  _pct(r["worst_case"]["acc"]) + bound + mark, _pct(r["agreement"]), verdict)
    console.print(t)
    n_sq = ", ".join(str(n) for n in sorted({r["worst_case"]["n"] for r in rows}))
    named = labels[0] if len(labels) == 1 else "; ".join(f"({i + 1}) {lab}" for i, lab in enumerate(labels))
    covers = sorted({str(r["worst_case"].get("covers") or "") for r in rows} - {""})
    how = (f"covering {covers[0]}" if len(covers) == 1 else
           "white-box attacks on each artifact where the pack has them, the pack's attacks transferred from "
           "PyTorch, the live query-only attacks on the runtime")
    bounds = [r for r in rows if r["worst_case"].get("upper_bound")]
    bound_line = (f"\n‡ upper bound only: {bounds[0]['worst_case'].get('upper_bound_reason')} "
                  "(transferred and query-only attacks)" if bounds else "")
    console.print(Text(f"* worst case on the runtime, per sample: {named} ({how}; n={n_sq})\n"
                       f"† PyTorch on the pack: {ref['worst_case']['label']} (white-box, n={ref.get('n')}); "
                       f"agree: top-1 agreement with PyTorch on clean images{bound_line}", style="dim"),
                  soft_wrap=True)
    for r in rows:
        if r["gates"]["failed"] or r.get("failed_warnings"):
            rep = VerifyReport.from_json(result.out_dir / r["reports"]["json"])
            table = gates_table(rep)
            if table is not None:
                table.title = f"gates of {r['file']}"
                console.print(table)
    root = result.out_dir
    console.print("reports:", highlight=False)
    for r in rows:
        files = ", ".join(str(root / p) for p in r["reports"].values())
        console.print(f"  {r['name']}: {files}", highlight=False, soft_wrap=True, markup=False)
    paths = result.to_dict()["paths"]
    qat = f"QAT manifest {paths['qat_manifest']}, " if "qat_manifest" in paths else ""
    console.print(f"  manifest {paths['manifest']}, {qat}pack {paths['pack']}, training curves {paths['plots']}, "
                  f"state {paths['state']}", highlight=False, soft_wrap=True, markup=False)
    n = len(rows)
    artifacts = f"{n} artifact{'s' if n != 1 else ''}"
    if result.status == "passed":
        console.print(f"[bold green]PASSED[/]: every gate of {artifacts} passed", highlight=False)
    elif result.status == "not_gated":
        console.print(f"[bold yellow]NOT GATED[/]: no gates set for {artifacts} (deploy.gates), so nothing was "
                      "judged; set deploy.gates (e.g. min_clean, min_robust) to gate a release", highlight=False,
                      soft_wrap=True)


def _execute(recipe_path: Path, out: Path, overrides: List[str], from_stage: Optional[str], device: Optional[str],
             threads: Optional[int], quiet: bool, json_out: Optional[Path], entry: str, resume_hint: str,
             force: bool = False) -> None:

    if quiet:
        State.quiet = True
    quiet = State.quiet
    check_outputs({"--json": json_out}, force, {"RECIPE": recipe_path})
    start = time.perf_counter()
    training = TrainProgress(quiet)
    try:
        # SIGTERM (a CI cancel) as Ctrl-C: the pack's finished attacks and verify's states are kept, exit 130
        with terminate_as_interrupt(), console_logs_at(logging.DEBUG if State.verbose else logging.WARNING), \
                StagedProgress("run") as update:

            def close_live() -> None:
                training.close()
                update.close()

            try:
                result = workflow.run(recipe_path, out, overrides=overrides, from_stage=from_stage, device=device,
                                      threads=threads, entry=entry, on_event=StageLines(quiet, close_live),
                                      train_callbacks=[training], progress=update)
            finally:
                close_live()  # no live bar above the lines that follow (an interruption, the table)
    except TrainingInterrupted as e:
        err_console.print(f"[yellow]{escape(str(e))}[/]\nresume with: {resume_hint}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM in export, pack or verify: finished work is kept in --out
        how = "interrupted" if interrupt_name(e) == "SIGINT" else f"interrupted ({interrupt_name(e)})"
        err_console.print(f"[yellow]{how}[/]: finished work is kept in {escape(str(out))}\nresume with: "
                          f"{escape(resume_hint)}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    render_result(result)
    write_json(json_out, result.to_dict(), force)
    if not quiet:
        err_console.print(f"done in {time.perf_counter() - start:.0f} s", highlight=False)
    if result.failed:
        raise GateFailed("; ".join(result.failures))


@app.command("run")
@handle_errors
def run_cmd(
    recipe: str = typer.Argument(..., help="Recipe file with a deploy: section, or a shipped recipe name (`ciard recipe ls`)."),
    out: Path = typer.Option(..., "--out", "-o", help="Workflow dir: new, empty, or one `ciard run` made (then finished stages are skipped)."),
    overrides: SetOption = [],
    from_stage: Optional[str] = typer.Option(None, "--from", help="Force this stage and every later one: distill, export, quantize (a recipe with quantize:), pack or verify."),
    device: DeviceOption = None,
    threads: ThreadsOption = None,
    quiet: QuietOption = False,
    json_out: Optional[Path] = typer.Option(
        None, "--json", help="Also write the result (stages, artifacts, failures) as JSON to this file; - writes it to "
                             "stdout (the table then goes to stderr). An existing file needs --force."),
    force: ForceJsonOption = False,
) -> None:
    """Run a recipe end to end: distill -> export -> pack -> verify, skipping stages whose inputs did not change.

    Writes DIR/run (training), DIR/export (artifacts + manifest.json), with a quantize: section DIR/qat (the QAT
    INT8 artifact + manifest.json), DIR/pack.npz, DIR/verify/<format>.{json,xml,md} and DIR/workflow.json (each
    stage's input and output hashes). An interrupted stage resumes on the next call:
    training from its last saved step, the pack from its finished attacks, verify from its live attacks' last batches.

    Without deploy.gates nothing is judged: the result is NOT GATED (exit 0), never passed. A verify
    warning saying the numbers are not about the artifact (V103, V104, V105, V109) fails the run
    unless deploy.allow_mismatch; deploy.strict fails on every warning.

    Exit codes: 0 every gate passed (or no gates: NOT GATED), 1 a gate, a warning (as above) or an export
    check failed, 2 bad input, 3 environment missing.
    """
    path = find_recipe(recipe)
    sets = "".join(f" --set {o}" for o in overrides)
    # workflow.run sets torch's threads itself, once the recipe is known to be good
    _execute(path, out, overrides, from_stage, device, apply_threads(threads, torch=False), quiet, json_out, "run",
             f"ciard run {recipe} --out {out}{sets}", force=force)


@app.command("quickstart")
@handle_errors
def quickstart_cmd(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", "-o", help="Workflow dir (re-running on it skips finished stages)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps (default: cpu)."),
    threads: int = typer.Option(1, "--threads", help="torch and onnxruntime threads (1: fastest for these tiny models)."),
    quiet: QuietOption = False,
    json_out: JsonOption = None,
    force: ForceJsonOption = False,
) -> None:
    """The whole chain on the bundled digits data, on CPU in a few minutes: two teachers, a CIARD student,
    ONNX FP32 and INT8, a robustness pack, verification of each artifact with gates, and the reports.

    Runs the shipped recipe quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15 (see `ciard recipe show`).
    Exit codes as `ciard run`.
    """
    path = quickstart_recipe()
    check_out_dir(out, entry="quickstart")  # refused before anything is printed
    importlib.import_module("ciard_deploy.distill.trainer")  # torch: a device install stops here, one line, exit 3
    if not (quiet or State.quiet):
        err_console.print(f"quickstart: {QUICKSTART_RECIPE} -> {out} (digits: teachers, CIARD student, ONNX FP32 + "
                          f"INT8, pack, verify)", highlight=False, soft_wrap=True)
    _execute(path, out, [], None, device, apply_threads(threads, torch=False), quiet, json_out, "quickstart",
             f"ciard quickstart --out {out}", force=force)
