"""A ``ciard run`` / ``ciard quickstart`` output folder as the input of the other verbs.

    from ciard_deploy.run_folder import resolve_run_folder
    resolve_run_folder("runs/quickstart", "checkpoint")  # runs/quickstart/run/student_best.safetensors
    resolve_run_folder("runs/c10/run", "checkpoint")     # a training run dir: returned as it is

``plot``, ``eval``, ``export``, ``pack``, ``inspect`` and ``verify`` pass what they were given through
``resolve_run_folder`` with the part they need; a run folder (a folder holding ``workflow.json``)
gives that part of its layout (``workflow.Layout``), anything else is returned unchanged and read as
before. ``run_artifacts`` lists what ``ciard verify DIR`` measures: the export's artifacts, then the
quantize stage's QAT artifact (DIR/qat/, a recipe with ``quantize:``), which ``artifact_name`` names
``onnx-int8 (qat)`` as the workflow's own verify stage does. Torch-free: ``ciard verify DIR`` uses it
on the device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from ciard_deploy.errors import ArtifactError
from ciard_deploy.export.manifest import MANIFEST_NAME, load_manifest
from ciard_deploy.checkpoints import resolve_checkpoint
from ciard_deploy.workflow.state import QAT_NAME, STATE_NAME, Layout

Need = Literal["checkpoint", "metrics", "export", "qat", "pack"]

#: need -> (what it is, in words; the stage of ``ciard run`` that makes it; where a plain folder holds it)
_PARTS: dict[str, tuple[str, str, str]] = {
    "checkpoint": ("a trained student (run/student_best.safetensors)", "distill",
                   "a run dir with a checkpoint (student_best.safetensors)"),
    "metrics": ("training metrics (run/metrics.jsonl)", "distill", "a training run dir (metrics.jsonl)"),
    "export": ("exported artifacts (export/manifest.json)", "export", "an export folder (manifest.json)"),
    "qat": ("a QAT artifact (qat/manifest.json)", "quantize", "a QAT folder (manifest.json)"),
    "pack": ("a robustness pack (pack.npz)", "pack", "a pack file (.npz)"),
}


def is_run_folder(path: str | Path) -> bool:
    """``path`` is a folder that ``ciard run`` or ``ciard quickstart`` wrote (it holds ``workflow.json``)."""
    p = Path(path)
    return p.is_dir() and (p / STATE_NAME).is_file()


#: the folders of a run folder that hold artifacts: the export stage's and the quantize stage's
_ARTIFACT_FOLDERS = ("export", "qat")


def run_folder_of(artifact: str | Path) -> Path | None:
    """The run folder an exported file lies in (``DIR/export/<file>``, or the QAT artifact ``DIR/qat/<file>``),
    or None."""
    p = Path(artifact)
    if p.parent.name not in _ARTIFACT_FOLDERS:
        return None
    root = p.parent.parent
    return root if is_run_folder(root) else None


def resolve_run_folder(path: str | Path, need: Need) -> Path:
    """What a verb should read for ``need``, given ``path``.

    - a run folder: its part: ``run/<best checkpoint>`` (checkpoint), ``run/metrics.jsonl`` (metrics),
      ``export/`` (export), ``qat/`` (qat: the quantize stage's folder) or ``pack.npz`` (pack);
    - any other folder that holds the part itself (a training run dir's checkpoint or metrics.jsonl,
      an export or QAT folder's manifest.json) or any file: ``path`` unchanged.

    Raises:
        ArtifactError (exit 2): a run folder without the part (names it and the stage of ``ciard run``
            that makes it), or a folder that is neither a run folder nor holds the part itself.
    """
    p = Path(path)
    if need not in _PARTS:
        raise ValueError(f"unknown need {need!r}: one of {', '.join(_PARTS)}")
    what, stage, plain = _PARTS[need]
    if not p.is_dir():
        return p
    if not is_run_folder(p):
        if _holds(p, need):
            return p
        raise ArtifactError(f"{p} is neither {plain} nor a `ciard run` folder ({STATE_NAME})")
    layout = Layout(p)
    part = _part(layout, need)
    if part is None:
        raise ArtifactError(f"{p} is a `ciard run` folder without {what}: its {stage} stage is "
                            f"{_stage_status(p, stage)}; finish it with `ciard run RECIPE --out {p}`")
    return part


def _holds(folder: Path, need: str) -> bool:
    if need == "checkpoint":
        return _checkpoint(folder) is not None
    if need == "metrics":
        return (folder / "metrics.jsonl").is_file()
    if need in ("export", "qat"):
        return (folder / MANIFEST_NAME).is_file()
    return False  # a pack is a file


def _checkpoint(folder: Path) -> Path | None:
    try:
        return resolve_checkpoint(folder) if folder.is_dir() else None
    except ArtifactError:
        return None


def _part(layout: Layout, need: str) -> Path | None:
    if need == "checkpoint":
        return _checkpoint(layout.run)
    part = {"metrics": layout.run / "metrics.jsonl", "export": layout.export, "qat": layout.qat,
            "pack": layout.pack}[need]
    present = (part / MANIFEST_NAME).is_file() if need in ("export", "qat") else part.is_file()
    return part if present else None


def _state(root: Path) -> dict[str, Any]:
    try:
        data = json.loads((root / STATE_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _stage_status(root: Path, stage: str) -> str:
    record = (_state(root).get("stages") or {}).get(stage) or {}
    status = record.get("status") if isinstance(record, dict) else None
    if status == "done":
        return "done but its output is gone"
    return str(status or "not recorded")


def exported_artifacts(root: str | Path) -> list[Path]:
    """Every file the export manifest of run folder ``root`` lists, in its order.

    Raises:
        ArtifactError: ``root`` is not a run folder, or has no export manifest yet.
    """
    export = resolve_run_folder(root, "export") if is_run_folder(root) else None
    if export is None:
        raise ArtifactError(f"{root} is not a `ciard run` folder ({STATE_NAME})")
    return manifest_artifacts(export)


def qat_artifacts(root: str | Path) -> list[Path]:
    """The quantize stage's artifacts of run folder ``root`` (DIR/qat/, as its manifest lists them); ``[]``
    when its recipe has no ``quantize:`` section: it never had one (``workflow.json`` records no quantize
    stage), or the last ``ciard run`` ran a recipe without one (``stale_qat``: DIR/qat/ is left as it was,
    like the workflow's own verify stage and summary, ``ciard verify DIR`` leaves it out).

    Raises:
        ArtifactError: a quantize stage is recorded but DIR/qat/ holds no manifest (the stage is not done, or
            its output is gone: one line naming the stage's status and the command that finishes it).
    """
    if not _recipe_quantizes(Path(root)) or _stage_status(Path(root), "quantize") == "not recorded":
        return []
    return manifest_artifacts(resolve_run_folder(root, "qat"))


def _recipe_quantizes(root: Path) -> bool:
    """The last ``ciard run`` into ``root`` ran a recipe with ``quantize:`` (its recorded stages name it); True
    when ``workflow.json`` predates that record (the quantize stage's own record decides then)."""
    stages = (_state(root).get("recipe") or {}).get("stages")
    return not isinstance(stages, list) or "quantize" in stages


def stale_qat(root: str | Path) -> Path | None:
    """DIR/qat/ of run folder ``root`` when the recipe of its last ``ciard run`` no longer has ``quantize:`` (a
    folder an earlier recipe's quantize stage wrote: not verified, not in the summary), else None."""
    folder = Layout(Path(root)).qat
    return folder if folder.is_dir() and not _recipe_quantizes(Path(root)) else None


def run_artifacts(root: str | Path) -> list[Path]:
    """What ``ciard verify DIR`` measures in run folder ``root``: every file its export manifest lists, then
    the quantize stage's QAT artifact when it has one (``qat_artifacts``)."""
    return exported_artifacts(root) + qat_artifacts(root)


def artifact_name(artifact: str | Path) -> str:
    """How reports name an artifact: the quantize stage's artifact of a run folder (DIR/qat/<file>)
    ``onnx-int8 (qat)``, as the workflow's own verify stage and ``ciard run``'s summary do; any other its
    file name."""
    p = Path(artifact)
    return QAT_NAME if p.parent.name == "qat" and run_folder_of(p) is not None else p.name


def is_export_folder(path: str | Path) -> bool:
    """``path`` is a folder ``ciard export`` wrote (it holds ``manifest.json``)."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST_NAME).is_file()


def manifest_artifacts(export: str | Path) -> list[Path]:
    """Every file the manifest of export folder ``export`` lists, in its order.

    Raises:
        ArtifactError: no readable manifest, or one that lists no artifact.
    """
    export = Path(export)
    files = [export / a.file for a in load_manifest(export).artifacts]
    if not files:
        raise ArtifactError(f"{export / MANIFEST_NAME} lists no artifact")
    return files


def verify_settings(root: str | Path) -> dict[str, Any]:
    """What the recipe of run folder ``root`` told its verify stage, as ``workflow.json`` records it:
    ``{"gates": {name: threshold}, "policy": {allow_mismatch, strict}, "settings": {live_attacks, live_n,
    seed, provider}}``; ``{}`` when its verify stage never started (nothing recorded)."""
    record = (_state(Path(root)).get("stages") or {}).get("verify") or {}
    inputs = record.get("inputs") if isinstance(record, dict) else None
    if not isinstance(inputs, dict):
        return {}
    return {k: dict(inputs.get(k) or {}) for k in ("gates", "policy", "settings")}


__all__ = ["Need", "artifact_name", "exported_artifacts", "is_export_folder", "is_run_folder", "manifest_artifacts",
           "qat_artifacts", "resolve_run_folder", "run_artifacts", "run_folder_of", "stale_qat", "verify_settings"]
