"""`ciard plot`: training curves of a run dir as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ciard_deploy.cli.app import app
from ciard_deploy.cli.common import console, from_run_folder, handle_errors
from ciard_deploy.plots import training_curves


@app.command("plot")
@handle_errors
def plot_cmd(
    run_dir: Path = typer.Argument(..., help="Run dir of `ciard distill` / `ciard train` (or its metrics.jsonl), or a "
                                             "`ciard run` folder (its run/)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the PNG files (default: RUN_DIR/plots; "
                                                                 "DIR/run/plots of a `ciard run` folder)."),
) -> None:
    """Plot a run's training curves: losses, clean and robust accuracy, CIARD temperatures and weights, learning rates.

    Prints the path of each PNG written, one per line. Exit codes: 0 written, 2 no metrics.jsonl.
    """

    for path in training_curves(from_run_folder(run_dir, "metrics"), out):
        console.print(str(path), highlight=False, soft_wrap=True)
