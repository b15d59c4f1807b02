"""The end of a training run: the final evaluation of ``student_best`` and ``student_last`` on the test
split (their model cards get the test numbers), the ``summary.json`` it writes, and :func:`load_summary`
to read that back. Also the model card every student checkpoint of a run carries (:func:`student_card`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch

from ciard_deploy.attacks import format_eps
from ciard_deploy.config import DistillRecipe, RecipeBase
from ciard_deploy.distill.selection import accuracy_metrics
from ciard_deploy.distill.splits import DataSplits, load_test_split
from ciard_deploy.errors import UsageError
from ciard_deploy.checkpoints import CheckpointMeta, load_weights_into, save_checkpoint
from ciard_deploy.fingerprint import sha256_file
from ciard_deploy.models import create_model

log = logging.getLogger(__name__)

#: the final evaluation's seed offset from ``train.seed`` (the selection evaluation of epoch e uses seed + e)
FINAL_EVAL_SEED_OFFSET = 10_000


def student_card(recipe: RecipeBase, info: Any, metrics: dict[str, Any], epoch: int) -> CheckpointMeta:
    """The model card of a run's ``student_best``/``student_last`` checkpoint after ``epoch`` epochs."""
    spec = recipe.model_spec
    return CheckpointMeta(
        arch=spec.arch, stem=spec.stem, activation=spec.activation, num_classes=info.num_classes,
        input_shape=tuple(info.input_shape),
        mean=tuple(info.mean) if spec.normalize else (0.0,) * info.in_chans,
        std=tuple(info.std) if spec.normalize else (1.0,) * info.in_chans,
        dataset=info.name, classes=tuple(info.classes), eps=recipe.attack.eps, recipe_hash=recipe.hash,
        role="student" if isinstance(recipe, DistillRecipe) else "model",
        metrics={"epoch": epoch, **metrics},
        extra={"method": recipe.method.name, "kind": recipe.kind, "eps_label": format_eps(recipe.attack.eps)})


def final_test_metrics(recipe: RecipeBase, run_dir: Path, data: DataSplits, device: torch.device,
                       best: dict[str, Any],
                       progress: Callable[[str], Callable[[int, int, str], None]]) -> tuple[dict[str, Any], int]:
    """Evaluates ``student_best`` and ``student_last`` of ``run_dir`` on the test split (``train.final_attacks``)
    and saves each again with its test numbers in its card; returns ({"best": metrics, "last": metrics}, the
    number of test images). The two are evaluated once when they hold the same weights.

    ``best`` is the loop's record of the best epoch; ``progress(label)`` gives the progress callback of one
    checkpoint's evaluation (``label``: ``best``, ``last`` or ``best = last``).
    """
    t = recipe.train
    tx, ty = load_test_split(recipe, data, t.final_eval_n)
    specs = list(dict.fromkeys(t.final_attacks))
    results: dict[str, Any] = {}
    paths = {w: run_dir / f"student_{w}.safetensors" for w in ("best", "last")}
    # the best epoch is often the last: the same weights are evaluated once (same seed, same numbers)
    same = paths["best"].exists() and sha256_file(paths["best"]) == sha256_file(paths["last"])
    for which in ("best", "last"):
        path = paths[which]
        if which == "best" and not path.exists():
            continue
        info = data.info
        spec = recipe.model_spec
        net = create_model(spec.arch, info.num_classes, info.in_chans, stem=spec.stem,
                           activation=spec.activation).to(device)
        load_weights_into(net, path)
        if which == "last" and same:
            test_metrics = dict(results["best"])
            log.info("final evaluation: student_last is student_best (epoch %d): its numbers are reused",
                     best["epoch"])
        else:
            label = "best = last" if same else which
            test_metrics = accuracy_metrics(net, tx, ty, specs, recipe.attack.eps, recipe.data.eval_batch_size,
                                            device, seed=t.seed + FINAL_EVAL_SEED_OFFSET, step_size=t.eval_step_size,
                                            progress=progress(label))
            log.info("final evaluation of %s on %d test images: %s", label, len(ty),
                     ", ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()))
        results[which] = test_metrics
        epoch = best["epoch"] if which == "best" else t.epochs
        sel = best["metrics"] if which == "best" else {}
        save_checkpoint(run_dir / f"student_{which}", net,
                        student_card(recipe, info, {**{f"test/{k}": v for k, v in test_metrics.items()},
                                                    **{f"{data.select_source}/{k}": v for k, v in sel.items()}},
                                     epoch))
    return results, len(ty)


def run_summary(recipe: RecipeBase, run_dir: Path, *, data: DataSplits, device: torch.device, world_size: int,
                results: dict[str, Any], test_n: int, best: dict[str, Any], robust_label: str | None,
                elapsed: float, teacher_refs: dict[str, Any], digests: list[dict[str, str]]) -> dict[str, Any]:
    """The ``summary.json`` of a finished run: what was trained how, the final test numbers (``best``,
    ``last``), the selection record, the speed, the teachers and whether every rank ended in sync."""
    r, t = recipe, recipe.train
    last_line = {}
    mpath = run_dir / "metrics.jsonl"
    if mpath.exists():
        lines = [ln for ln in mpath.read_text().splitlines() if ln.strip()]
        last_line = json.loads(lines[-1]) if lines else {}
    total_images = len(data.train_idx) // world_size * world_size * t.epochs
    return {
        "status": "complete",
        "kind": r.kind,
        "method": r.method.name,
        "arch": r.model_spec.arch,
        "dataset": r.data.dataset,
        "eps": r.attack.eps,
        "eps_label": format_eps(r.attack.eps),
        "epochs": t.epochs,
        "seed": t.seed,
        "recipe_hash": r.hash,
        "device": str(device),
        "amp": t.amp,
        "world_size": world_size,
        "test_n": test_n,
        "selection": {"on": data.select_source, "n": len(data.select_y), "by": t.select_by,
                      "attack": robust_label, "best_epoch": best["epoch"], "best": best["metrics"]},
        "best": results.get("best", {}),
        "last": results.get("last", {}),
        "train_time_s": round(elapsed, 2),
        "images_per_s": round(total_images / max(elapsed, 1e-9), 1),
        "final_train_metrics": {k: v for k, v in last_line.items() if k != "eval"},
        "teachers": teacher_refs,
        "ranks": {"digests": digests, "in_sync": all(dg == digests[0] for dg in digests)},
        "run_dir": str(run_dir),
    }


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    """The ``summary.json`` of a finished run."""
    p = Path(run_dir) / "summary.json"
    if not p.exists():
        raise UsageError(f"{run_dir} has no summary.json (not a finished run)")
    return json.loads(p.read_text())


__all__ = ["FINAL_EVAL_SEED_OFFSET", "final_test_metrics", "load_summary", "run_summary", "student_card"]
