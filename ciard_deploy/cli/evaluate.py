"""`ciard eval`: white-box robustness of a PyTorch checkpoint, or a paper's whole table (`--protocol ciard`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from ciard_deploy.cli.app import app
from ciard_deploy.cli.common import (ForceJsonOption, JsonOption, ThreadsOption, apply_threads, check_outputs,
                                     checkpoint_inputs, console, err_console, from_run_folder, handle_errors, note,
                                     progress, write_json)
from ciard_deploy.errors import UsageError


@app.command("eval")
@handle_errors
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="Run dir, `ciard run` folder, ciard checkpoint (.safetensors + .json), or a plain .pt/.pth with --arch."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset (default: the one in the checkpoint's metadata)."),
    attacks: Optional[str] = typer.Option(None, "--attacks", "-a", help="Comma-separated attacks: fgsm, pgd20, cw30, aa, square1000, ... (default pgd20,cw30)."),
    protocol: Optional[str] = typer.Option(
        None, "--protocol",
        help="A paper's whole table instead of --attacks, printed with the paper's column names. ciard: Clean, "
             "FGSM, PGD-SAT (PGD-20, step 2/255), PGD-TRADES (PGD-20, step 0.003), CW-inf (30 steps), AA "
             "(AutoAttack standard), BB-PGD and BB-CW (PGD-20 / CW-30 of step 0.003 crafted on --transfer-from), "
             "Square (100 queries)."),
    transfer_from: Optional[str] = typer.Option(
        None, "--transfer-from",
        help="Protocol's black-box columns: the model they are crafted on (the original robust teacher): a ciard "
             "checkpoint or run dir, a plain state dict with --transfer-arch (fed [0, 1] pixels, as the TRADES "
             "release expects), or robustbench:ID."),
    transfer_arch: Optional[str] = typer.Option(None, "--transfer-arch", help="Architecture of a plain --transfer-from state dict."),
    n: int = typer.Option(1000, "--n", help="Test images (seeded, class-stratified)."),
    eps: Optional[str] = typer.Option(
        None, "--eps",
        help="L-inf budget, e.g. 8/255 or 0.03 (default: the training eps recorded in the checkpoint; another "
             "value is allowed and the table and JSON say it differs)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N, mps."),
    batch_size: int = typer.Option(256, "--batch-size", "-b"),
    threads: ThreadsOption = None,
    seed: int = typer.Option(0, "--seed"),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture, for a plain state dict without metadata."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where the dataset files are."),
    download: bool = typer.Option(False, "--download", help="Download the dataset if absent (torchvision datasets)."),
    json_out: JsonOption = None,
    force: ForceJsonOption = False,
    state: Optional[Path] = typer.Option(
        None, "--state",
        help="Resumable evaluation state (JSON; none unless given). Created if absent and saved after the clean "
             "pass, after each finished attack and every ~10 s inside one (also on Ctrl-C). If it exists it must "
             "hold the same evaluation (model sha256, arch, dataset, samples, seed, eps, attack settings): its "
             "finished attacks are reused, not re-run (a line on stderr says so), a partial one continues, new "
             "ones run and are added. A different evaluation is an error (exit 2) and the file is left as it is."),
    fresh: bool = typer.Option(False, "--fresh",
                               help="With --state: discard what the state file holds and start over."),
) -> None:
    """Clean and per-attack robust accuracy of a checkpoint, plus the per-sample worst case.

    Rerunning with --state FILE and more attacks runs only the new ones; after Ctrl-C, the same
    command continues where it stopped.
    """
    from ciard_deploy import checkpoint_eval  # imports torch: `ciard --help` stays torch-free

    if protocol is not None and attacks is not None:
        raise UsageError(f"--protocol {protocol} names its own attacks: leave out --attacks")
    if transfer_from is not None and protocol is None:
        raise UsageError("--transfer-from feeds a protocol's black-box columns: give --protocol too")
    names = [] if protocol is not None else [a.strip() for a in (attacks or "pgd20,cw30").split(",") if a.strip()]
    if state is not None and json_out is not None and state.resolve() == json_out.resolve():
        raise UsageError(f"--state and --json name the same file ({state}): give them different paths")
    inputs = checkpoint_inputs(checkpoint)
    check_outputs({"--state": state}, True, inputs)  # an existing state is resumed; never the checkpoint or card
    check_outputs({"--json": json_out}, force, {**inputs, "--state": state})
    checkpoint = from_run_folder(checkpoint, "checkpoint")
    apply_threads(threads)
    try:
        with progress("eval", unit="img") as update:
            rep = checkpoint_eval.run(checkpoint, names, eps, n=n, dataset=dataset, data_root=data_root,
                               download=download, arch=arch, device=device, batch_size=batch_size, seed=seed,
                               progress=update, state_path=state, fresh=fresh, on_state=_state_line,
                               protocol=protocol, transfer_from=transfer_from, transfer_arch=transfer_arch)
    except KeyboardInterrupt:
        if state is not None and state.exists():
            err_console.print(f"[yellow]interrupted[/]: finished work is in {escape(str(state))}; run the same "
                              "command again to continue", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        raise
    if rep.get("protocol"):
        render_protocol(rep)
    render_eval(rep)
    write_json(json_out, rep, force)


def _state_line(ev: Any) -> None:
    """One stderr line per stage taken from the state file (not with --quiet)."""
    if ev.kind == "reused" and ev.stage == "clean":
        note(f"state: reusing the clean pass from {ev.path}")
    elif ev.kind == "reused":
        note(f"state: reusing {ev.stage} from {ev.path} (finished earlier in {ev.seconds:.1f} s; not re-run)")
    else:
        note(f"state: resuming {ev.stage} at {ev.done}/{ev.total} from {ev.path}")


def render_eval(rep: dict) -> None:
    t = Table(title=f"{rep['model']['arch']} on {rep['dataset']} test (n={rep['n']}, seed {rep['seed']})")
    t.add_column("evaluation")
    t.add_column("accuracy", justify="right")
    t.add_column("seconds", justify="right")
    t.add_row("clean", f"{rep['clean_acc']:.4f}", "")
    for a in rep["attacks"]:
        origin = a.get("origin", "ran")
        note = "" if origin == "ran" else f" ({origin})"
        t.add_row(a["label"], f"{a['robust_acc']:.4f}", f"{a.get('seconds', 0):.1f}{note}")
    if rep["attacks"]:
        t.add_row("[bold]worst case[/]", f"[bold]{rep['worst_case_acc']:.4f}[/]", "")
    console.print(t)
    console.print(_eps_caption(rep), highlight=False, soft_wrap=True)


def render_protocol(rep: dict) -> None:
    """The paper's row: one column per paper column, accuracies in %, then which attack each column ran."""
    p = rep["protocol"]
    t = Table(title=f"--protocol {p['name']}: {rep['model']['arch']} on {rep['dataset']} test (n={rep['n']}, "
                    f"eps {rep['eps_label']}), accuracy %", box=box.SIMPLE_HEAD,
              collapse_padding=True, pad_edge=False)  # no rules between columns: fits 80 wide
    for c in p["columns"]:
        t.add_column(c["column"], justify="right", no_wrap=True, min_width=len(c["column"]))
    t.add_row(*(f"{100 * c['accuracy']:.2f}" for c in p["columns"]))
    console.print(t)
    src = p.get("transfer_from") or {}
    where = src.get("robustbench") or src.get("path")
    console.print(", ".join(f"{escape(c['column'])} = {escape(c['label'])}" for c in p["columns"][1:])
                  + (f"; transfer-* crafted on {escape(str(where))}" if where else ""), highlight=False, soft_wrap=True)


def _eps_caption(rep: dict) -> str:
    """Which budget the attacks used and why: the training eps, or a warning that it differs."""
    if rep.get("eps_warning"):
        return f"[bold yellow]warning: {escape(rep['eps_warning'])}[/]"
    if rep.get("eps_source") == "metadata":
        return f"eps {escape(rep['eps_label'])}: the training eps recorded in the checkpoint"
    if rep.get("training_eps") is None:
        return f"eps {escape(rep['eps_label'])} (--eps; the checkpoint records no training eps)"
    return f"eps {escape(rep['eps_label'])} (--eps, the training eps recorded in the checkpoint)"
