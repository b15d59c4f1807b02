"""`ciard qat`: quantization-aware robust fine-tuning of a run's student, exported as an INT8 QDQ ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ciard_deploy.cli.app import app
from ciard_deploy.cli.common import ThreadsOption, apply_threads, console, handle_errors
from ciard_deploy.config.quantize import QuantizeConfig, quantize_settings
from ciard_deploy.errors import GateFailed, UsageError
from ciard_deploy.run_folder import is_run_folder, resolve_run_folder
from ciard_deploy.signals import terminate_as_interrupt

_DEFAULT = QuantizeConfig()  # the defaults the help states


@app.command("qat")
@handle_errors
def qat_cmd(
    run_dir: Path = typer.Argument(..., help="A training run dir (its student_best and recipe.yaml), or a `ciard run` "
                                             "folder (its run/)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for model.qat.int8.onnx and manifest.json."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help=f"Fine-tuning epochs (default: the recipe's quantize.epochs, else {_DEFAULT.epochs})."),
    lr: Optional[float] = typer.Option(None, "--lr", help=f"Learning rate, cosine to 0 (default: the recipe's quantize.lr, else {_DEFAULT.lr:g})."),
    activation_scales: Optional[str] = typer.Option(None, "--activation-scales", help="observed (moving-average min/max) or learned (trained by gradient, LSQ) (default: the recipe's quantize.activation_scales, else observed)."),
    train_subset: Optional[int] = typer.Option(None, "--train-subset", help="Fine-tune on this many of the run's training images (default: the recipe's quantize.train_subset, else all)."),
    n: int = typer.Option(512, "--n", help="Test images of the check against the fake-quantized PyTorch student."),
    threads: ThreadsOption = None,
    force: bool = typer.Option(False, "--force", help="Overwrite model.qat.int8.onnx and manifest.json in --out."),
) -> None:
    """Fine-tune a run's student with INT8 fake quantization in the loop (its own method, teachers and
    attack, the adversarial examples crafted against the fake-quantized student), then export an INT8 QDQ
    ONNX with the learned scales and check it in onnxruntime. `ciard pack --artifact` and `ciard verify`
    measure it like any export.

        ciard qat runs/digits-ciard --out runs/digits-ciard-qat --epochs 5
    """
    from ciard_deploy.quantize_aware.export import check_qat_output, export_qat, refuse_without_int8  # imports torch
    from ciard_deploy.quantize_aware.finetune import finetune, run_recipe  # imports torch

    if not run_dir.is_dir():
        raise UsageError(f"RUN_DIR {run_dir} is not a run dir (a folder with student_best and recipe.yaml)")
    if is_run_folder(run_dir):  # a `ciard run` folder: its training run dir (DIR/run)
        run_dir = resolve_run_folder(run_dir, "checkpoint").parent
    if n < 1:
        raise UsageError(f"--n {n}: the check needs at least 1 test image")
    threads = apply_threads(threads)
    recipe = run_recipe(run_dir)
    if recipe.deploy is not None:
        refuse_without_int8(list(recipe.deploy.formats))
    # every setting and --out refused before the fine-tuning (minutes), not after it
    quantize_settings(recipe.quantize, flags=True, epochs=epochs, lr=lr, train_subset=train_subset,
                      activation_scales=activation_scales)
    check_qat_output(out, force, run_dir)
    with terminate_as_interrupt():
        result = finetune(run_dir, recipe=recipe, epochs=epochs, lr=lr, train_subset=train_subset,
                          activation_scales=activation_scales,
                          progress=lambda line: console.print(
                              f"qat epoch {line['epoch']}: loss {line['loss']:.4f} ({line['images']} images, "
                              f"{line['time_s']:.1f} s)", highlight=False))
        manifest = export_qat(result, out, n=n, force=force, threads=threads, check=False)
    rec = manifest.artifacts[0]
    console.print(f"wrote {out / rec.file} ({rec.size / 1024:.1f} KiB) and manifest.json: "
                  f"{rec.parity['clean']['summary']}", highlight=False)
    if not rec.passed:
        raise GateFailed(f"{rec.file}: {rec.parity['clean']['summary']} (kept, marked failed in the manifest)")
