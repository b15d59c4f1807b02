"""Resuming a training run: the run dir's checks on ``--resume`` (same recipe, same teacher files), the
``train_state.pt`` file (format tag, atomic save, a refusal in one line for anything that is not a ciard
training state) and the trimming of ``metrics.jsonl`` to the epochs the saved state holds.

What goes *into* the state (weights, optimizer, every RNG) is assembled by the loop
(``loop.TrainingLoop._state``); this module owns the file and its checks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ciard_deploy.config import RecipeBase, load_recipe
from ciard_deploy.errors import ArtifactError, RecipeError, UsageError
from ciard_deploy.checkpoints import UnreadableTorchFile, load_torch_file
from ciard_deploy.fingerprint import flatten
from ciard_deploy.io import atomic_path, atomic_write_text
from ciard_deploy.lock import entries as lock_entries

log = logging.getLogger(__name__)

STATE_FORMAT = "ciard-train-state/1"
STATE_NAME = "train_state.pt"


def recipe_differences(a: RecipeBase, b: RecipeBase, limit: int = 4) -> list[str]:
    """Dotted keys whose values differ between two recipes (for resume mismatches)."""
    fa, fb = flatten(a.to_dict()), flatten(b.to_dict())
    keys = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in keys[:limit]]


def bad_state(path: Path, reason: str) -> ArtifactError:
    """A ``train_state.pt`` that is not a ciard training state (damaged, or hostile): one line that never
    suggests loading it some other way."""
    return ArtifactError(f"{path}: not a ciard training state (corrupt or not made by ciard): "
                         f"{reason}; delete it to start over or restore it")


def check_run_dir(run_dir: Path, recipe: RecipeBase, resume: bool) -> dict[str, Any] | None:
    """Checks ``run_dir`` for a run of ``recipe``; returns its loaded train state when resuming one, None for
    a fresh start (no run dir, an empty one, or a resumed run that saved no state yet).

    Raises:
        UsageError: the run dir exists without ``resume``, or is not a ciard run dir.
        RecipeError: the run dir was started with another recipe.
        ArtifactError: its ``train_state.pt`` is not a ciard training state.
    """
    d = run_dir
    if d.exists() and not d.is_dir():
        raise UsageError(f"--out {d} is a file, not a run dir")
    nonempty = d.is_dir() and bool(lock_entries(d))  # its lock file, ours, is no content
    if nonempty and not resume:
        raise UsageError(f"run dir exists: {d}: use --resume to continue it, or another --out")
    if not nonempty:
        return None
    stored = d / "recipe.yaml"
    if not stored.exists():
        raise UsageError(f"--resume: {d} is not a ciard run dir (no recipe.yaml); use another --out")
    old = load_recipe(stored)
    if old.hash != recipe.hash:
        diff = "; ".join(recipe_differences(old, recipe))
        raise RecipeError(f"--resume: the recipe differs from the one {d} was started with ({diff}); "
                          f"resume with the same recipe, or use another --out")
    path = d / STATE_NAME
    if not path.exists():
        return None
    try:
        state = load_torch_file(path)
    except UnreadableTorchFile as e:
        raise bad_state(path, e.reason) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise bad_state(path, f"no {STATE_FORMAT} record (found {str(found)[:40]!r})")
    return state


def check_same_teachers(run_dir: Path, teacher_refs: dict[str, Any]) -> None:
    """On resume: each teacher file must be the one the run started with (a checkpoint replaced at
    the same path, or a cached teacher trained again, would silently change the run)."""
    path = run_dir / "teachers.json"
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # an unreadable record cannot be compared; the recipe hash was checked already
    for role, ref in teacher_refs.items():
        old = (before.get(role) or {}).get("sha256")
        if old and ref.get("sha256") and old != ref["sha256"]:
            raise ArtifactError(f"--resume: the {role} teacher {ref.get('path')} is not the file this run started "
                                f"with (sha256 {old[:12]}... then, {ref['sha256'][:12]}... now); put the original "
                                f"back, or start a new run with another --out")


def save_train_state(path: Path, state: dict[str, Any]) -> None:
    """Writes ``state`` (tagged :data:`STATE_FORMAT`) to ``path`` atomically: a crash mid-save keeps the old file."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def trim_metrics(run_dir: Path, epochs_done: int) -> None:
    """Keeps one metrics.jsonl line per epoch the saved state holds (``epochs_done``; 0 when none was saved).

    An epoch's line is appended before its state is saved, so a crash between the two (a full disk)
    leaves a line the resumed run writes again: it goes, as do lines a torn write left unreadable and,
    of an epoch listed twice, all but the last line."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    kept: dict[int, str] = {}
    for ln in text.splitlines():
        try:
            epoch = json.loads(ln).get("epoch")
        except (ValueError, AttributeError):
            continue  # a torn line (the disk filled up mid-write) or no record
        if isinstance(epoch, int) and 1 <= epoch <= epochs_done:
            kept[epoch] = ln
    trimmed = "".join(kept[e] + "\n" for e in sorted(kept))
    if trimmed != text:
        log.info("metrics.jsonl: keeping the lines of the %d epochs the saved state holds", len(kept))
        atomic_write_text(path, trimmed)


__all__ = ["STATE_FORMAT", "STATE_NAME", "bad_state", "check_run_dir", "check_same_teachers", "recipe_differences",
           "save_train_state", "trim_metrics"]
