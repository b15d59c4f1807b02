"""Verbs that describe the installation: doctor, models, datasets, attacks."""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path
from typing import Optional

from rich.markup import escape
from rich.table import Table

from ciard_deploy.cli.app import app
from ciard_deploy.cli.common import ForceJsonOption, JsonOption, check_outputs, console, handle_errors, write_json
from ciard_deploy import __version__
from ciard_deploy.attacks import ATTACKS
from ciard_deploy.options.catalog import MODEL_FAMILIES


def environment_report() -> dict:
    """Python, torch, CUDA devices, onnxruntime providers, TensorRT: available or why not."""

    rep: dict = {"ciard_deploy": __version__, "python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        rep["torch"] = {"version": torch.__version__, "cuda_available": torch.cuda.is_available(),
                        "cuda_build": torch.version.cuda,
                        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                        if torch.cuda.is_available() else []}
    except ImportError as e:
        rep["torch"] = {"unavailable": str(e)}
    try:
        import onnxruntime as ort

        rep["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError as e:
        rep["onnxruntime"] = {"unavailable": str(e)}
    try:
        import onnx

        rep["onnx"] = {"version": onnx.__version__}
    except ImportError as e:
        rep["onnx"] = {"unavailable": str(e)}
    try:
        import tensorrt  # type: ignore[import-not-found]

        rep["tensorrt"] = {"version": tensorrt.__version__}
    except Exception as e:  # ImportError, or OSError when the native library is missing
        rep["tensorrt"] = {"unavailable": f"{type(e).__name__}: {e}", "install": "pip install 'ciard-deploy[tensorrt]' on a machine with an NVIDIA GPU"}
    return rep


@app.command()
@handle_errors
def doctor(json_out: JsonOption = None, force: ForceJsonOption = False) -> None:
    """Show Python, torch, CUDA devices, onnxruntime providers and whether TensorRT is usable (and why not)."""
    check_outputs({"--json": json_out}, force)
    rep = environment_report()
    t = Table(title="ciard doctor", show_header=True)
    t.add_column("component")
    t.add_column("status")
    t.add_row("ciard-deploy", rep["ciard_deploy"])
    t.add_row("python", f"{rep['python']} ({rep['platform']})")
    th = rep["torch"]
    if "unavailable" in th:
        t.add_row("torch", f"[red]unavailable[/]: {th['unavailable']}")
    else:
        t.add_row("torch", th["version"])
        t.add_row("cuda", ", ".join(th["devices"]) if th["cuda_available"] else f"no CUDA device (build: {th['cuda_build']})")
    o = rep["onnxruntime"]
    t.add_row("onnxruntime", f"{o['version']}; providers: {', '.join(o['providers'])}" if "version" in o
              else f"[red]unavailable[/]: {o['unavailable']}")
    trt = rep["tensorrt"]
    t.add_row("tensorrt", trt.get("version") or f"[yellow]unavailable[/]: {trt['unavailable']}")
    console.print(t)
    write_json(json_out, rep, force)


def _listing(title: str, columns: list[str], rows: list[tuple[str, ...]], right: tuple[str, ...] = (),
             json_out: Optional[Path] = None, force: bool = False, records: list[dict] | None = None) -> None:
    """A registry as a table, and as JSON (``records``, one object per row) with ``--json``."""
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right" if c in right else "left")
    for row in rows:
        t.add_row(*row)
    console.print(t)
    write_json(json_out, records, force)


def model_families() -> list[dict]:
    """One record per model family (``timm:NAME``, ``torchvision:NAME``): installed or how to install it.
    Reads package metadata only (importing timm takes seconds)."""
    records = []
    for family, extra in MODEL_FAMILIES.items():
        try:
            version: str | None = importlib.metadata.version(family)
        except importlib.metadata.PackageNotFoundError:
            version = None
        state = f"{family} {version}" if version else f"not installed: pip install 'ciard-deploy[{extra}]'"
        records.append({"name": f"{family}:<name>", "family": family, "installed": version is not None,
                        "version": version, "params_10_classes_rgb": None,
                        "role": f"any {family} architecture ({state}); fresh weights (pretrained off); "
                                "stem: cifar for its ResNets"})
    return records


@app.command()
@handle_errors
def models(json_out: JsonOption = None, force: ForceJsonOption = False) -> None:
    """List the registered model architectures and the model families (timm:NAME, torchvision:NAME)."""
    from ciard_deploy.models import MODELS

    check_outputs({"--json": json_out}, force)
    params = "params (10 classes, RGB)"
    counts = {name: e.num_params() for name, e in MODELS.items()}
    families = model_families()
    _listing("models (all take float32 NCHW in [0, 1])", ["name", params, "role"],
             [(name, f"{counts[name] / 1e6:.2f}M", e.role) for name, e in MODELS.items()]
             + [(escape(f["name"]), "-", escape(f["role"])) for f in families], right=(params,),
             json_out=json_out, force=force,
             records=[{"name": name, "params_10_classes_rgb": counts[name], "role": e.role}
                      for name, e in MODELS.items()] + families)


@app.command()
@handle_errors
def datasets(json_out: JsonOption = None, force: ForceJsonOption = False) -> None:
    """List the registered datasets."""
    from ciard_deploy.data import DATASETS

    check_outputs({"--json": json_out}, force)
    _listing("datasets", ["name", "needs --data-root", "description"],
             [(name, "yes" if e.needs_root else "no", e.description) for name, e in DATASETS.items()],
             json_out=json_out, force=force,
             records=[{"name": name, "needs_data_root": bool(e.needs_root), "description": e.description}
                      for name, e in DATASETS.items()])


@app.command()
@handle_errors
def attacks(json_out: JsonOption = None, force: ForceJsonOption = False) -> None:
    """List the attacks (names like pgd20, cw30, aa, square1000)."""

    check_outputs({"--json": json_out}, force)
    _listing("attacks (L-inf; eps given with --eps)", ["name", "needs", "description"],
             [(e.pattern, ", ".join(sorted(e.requires)), e.description) for _, e in ATTACKS.items()],
             json_out=json_out, force=force,
             records=[{"name": e.pattern, "requires": sorted(e.requires), "description": e.description}
                      for _, e in ATTACKS.items()])
