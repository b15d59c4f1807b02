"""The workflow dir of ``ciard run``: where everything lives in it (``Layout``), its state file
``workflow.json`` (format, reading, atomic writes) and the rule that refuses a folder that is not a
workflow's own.

Light and torch-free: ``run_folder`` (``ciard verify DIR`` on a device) reads a workflow dir through it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ciard_deploy import __version__, lock
from ciard_deploy.errors import UsageError
from ciard_deploy.io import atomic_write_json

STAGES = ("distill", "export", "pack", "verify")
QAT_STAGES = ("distill", "export", "quantize", "pack", "verify")  # a recipe with a quantize: section
QAT_REPORT = "onnx-int8-qat"  # the report name of the quantize stage's artifact (the export's is onnx-int8)
QAT_NAME = "onnx-int8 (qat)"  # how summaries and reports name it (the export's INT8 artifact is onnx-int8)
STATE_NAME = "workflow.json"
STATE_FORMAT = "ciard-workflow/1"
Stage = Literal["distill", "export", "quantize", "pack", "verify"]
Action = Literal["run", "resume", "rejudge", "skip"]


@dataclass(frozen=True)
class Layout:
    """Where everything lives in a workflow dir."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / STATE_NAME

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def qat(self) -> Path:
        return self.root / "qat"

    @property
    def pack(self) -> Path:
        return self.root / "pack.npz"

    @property
    def verify(self) -> Path:
        return self.root / "verify"

    def rel(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()


def stages_of(recipe: Any) -> tuple[str, ...]:
    """The stages a recipe runs: with a ``quantize:`` section, ``quantize`` after ``export``."""
    return QAT_STAGES if getattr(recipe, "quantize", None) is not None else STAGES


def paths_of(layout: Layout, qat: bool = False) -> dict[str, str]:
    """Every part of the workflow dir by name (for ``WorkflowResult.to_dict``); ``qat`` (a recipe with
    ``quantize:``): the quantize stage's folder and manifest too."""
    paths = {"state": str(layout.state), "recipe": str(layout.recipe), "run": str(layout.run),
             "plots": str(layout.run / "plots"), "export": str(layout.export),
             "manifest": str(layout.export / "manifest.json")}
    if qat:
        paths.update(qat=str(layout.qat), qat_manifest=str(layout.qat / "manifest.json"))
    return {**paths, "pack": str(layout.pack), "verify": str(layout.verify)}


def report_paths(layout: Layout, name: str) -> dict[str, Path]:
    """The report files of one artifact (by export format name)."""
    base = layout.verify / name
    return {"json": base.with_suffix(".json"), "junit": base.with_suffix(".xml"), "markdown": base.with_suffix(".md")}


def state_path(layout: Layout, name: str) -> Path:
    """Where the verify stage keeps the resumable state of one artifact (by export format name) while it runs."""
    return layout.verify / f"{name}.state.json"


def load_state(out_dir: str | Path) -> dict[str, Any] | None:
    """The ``workflow.json`` of ``out_dir`` (None when there is none).

    Raises:
        UsageError: the file exists but is not a ciard workflow state.
    """
    path = Path(out_dir) / STATE_NAME
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is not a readable workflow state ({type(e).__name__}); use another --out") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("stages"), dict):
        raise UsageError(f"{path} is not a {STATE_FORMAT} file; use another --out")
    return state


def check_out_dir(out_dir: str | Path, entry: str = "run") -> dict[str, Any] | None:
    """Refuses an output folder that is not this workflow's to write; returns its state, if any.

    A missing or empty folder is fine (a new workflow); a folder with ``workflow.json`` is a
    workflow's own (``entry="quickstart"`` also requires it to have been made by the quickstart);
    anything else (a file, a folder of someone else's files) is a UsageError: nothing is overwritten.
    """
    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise UsageError(f"--out {d} is a file, not a folder")
    if not d.is_dir() or not lock.entries(d):  # a lock file alone (lock.LOCK_NAME) is no content
        return None
    state = load_state(d)
    if state is None:
        raise UsageError(f"--out {d} exists and is not a ciard workflow dir (no {STATE_NAME}); nothing is "
                         f"overwritten: use a new or empty folder")
    if entry == "quickstart" and state.get("entry") != "quickstart":
        raise UsageError(f"--out {d} is a `ciard {state.get('entry', 'run')}` workflow dir, not a quickstart one; "
                         f"use another --out")
    return state


class StateFile:
    """``workflow.json``, written atomically after every change."""

    def __init__(self, layout: Layout, state: dict[str, Any]) -> None:
        self.layout = layout
        self.data = state

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(name, {"status": "pending"})

    def save(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(self.layout.state, self.data)


def new_state(entry: str) -> dict[str, Any]:
    """The ``workflow.json`` of a new workflow dir (every stage pending)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return {"format": STATE_FORMAT, "tool": f"ciard-deploy {__version__}", "entry": entry, "created": now,
            "updated": now, "status": "running", "recipe": {}, "stages": {s: {"status": "pending"} for s in STAGES}}


__all__ = ["Action", "Layout", "QAT_NAME", "QAT_REPORT", "QAT_STAGES", "STAGES", "STATE_FORMAT", "STATE_NAME", "Stage",
           "StateFile", "check_out_dir", "load_state", "new_state", "paths_of", "report_paths", "stages_of",
           "state_path"]
