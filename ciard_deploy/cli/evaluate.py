"""`ciard eval`: white-box robustness of a PyTorch checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ciard_deploy.cli.app import app
from ciard_deploy.cli.common import console, handle_errors, progress, write_json


@app.command("eval")
@handle_errors
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="Run dir, ciard checkpoint (.safetensors + .json), or a plain .pt/.pth with --arch."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset (default: the one in the checkpoint's metadata)."),
    attacks: str = typer.Option("pgd20,cw30", "--attacks", "-a", help="Comma-separated attacks: fgsm, pgd20, cw30, aa, square1000, ..."),
    n: int = typer.Option(1000, "--n", help="Test images (seeded, class-stratified)."),
    eps: str = typer.Option("8/255", "--eps", help="L-inf budget, e.g. 8/255 or 0.03."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N, mps."),
    batch_size: int = typer.Option(256, "--batch-size", "-b"),
    seed: int = typer.Option(0, "--seed"),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture, for a plain state dict without metadata."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where the dataset files are."),
    download: bool = typer.Option(False, "--download", help="Download the dataset if absent (torchvision datasets)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON."),
) -> None:
    """Clean and per-attack robust accuracy of a checkpoint, plus the per-sample worst case."""
    from ciard_deploy import evaluate
    from ciard_deploy.attacks import parse_eps

    eps_value = parse_eps(eps)
    names = [a.strip() for a in attacks.split(",") if a.strip()]
    with progress("eval", unit="img") as update:
        rep = evaluate.run(checkpoint, names, eps_value, n=n, dataset=dataset, data_root=data_root,
                           download=download, arch=arch, device=device, batch_size=batch_size, seed=seed,
                           progress=update)
    render_eval(rep)
    write_json(json_out, rep)


def render_eval(rep: dict) -> None:
    t = Table(title=f"{rep['model']['arch']} on {rep['dataset']} test (n={rep['n']}, seed {rep['seed']})")
    t.add_column("evaluation")
    t.add_column("accuracy", justify="right")
    t.add_column("seconds", justify="right")
    t.add_row("clean", f"{rep['clean_acc']:.4f}", "")
    for a in rep["attacks"]:
        t.add_row(a["label"], f"{a['robust_acc']:.4f}", f"{a.get('seconds', 0):.1f}")
    if rep["attacks"]:
        t.add_row("[bold]worst case[/]", f"[bold]{rep['worst_case_acc']:.4f}[/]", "")
    console.print(t)
