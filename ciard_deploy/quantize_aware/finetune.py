"""Quantization-aware robust fine-tuning: the run's student, fake-quantized, trained on with its own method.

    from ciard_deploy.quantize_aware import finetune
    result = finetune("runs/digits-ciard", epochs=2, lr=0.01)

The student of a run dir (``student_best``) and the run's ``recipe.yaml`` go in; the recipe's method
(CIARD, RSLAD, ARD, PGD-AT, ... with its teachers, taken from the teacher cache or the checkpoints the
recipe names) trains the fake-quantized copy (``fakequant.prepare_qat``) through the same step the
trainer runs (``distill.loop.train_step``), so the adversarial examples are crafted against the
fake-quantized student. SGD with the recipe's momentum and weight decay, the given ``lr`` decayed
by a cosine over the fine-tuning steps. Activation ranges start from a few clean batches and follow
a moving average of the batches seen in training mode (the attack's own forward passes, in eval
mode, leave them alone); they are frozen at the end (``fakequant.freeze``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ciard_deploy.checkpoints import CheckpointMeta, resolve_checkpoint
from ciard_deploy.config import DistillRecipe, RecipeBase, load_recipe
from ciard_deploy.config.quantize import quantize_settings
from ciard_deploy.data import iterate_batches
from ciard_deploy.distill.loop import train_step
from ciard_deploy.distill.methods import create_method
from ciard_deploy.distill.splits import prepare_data
from ciard_deploy.distill.trainer import resolve_teachers
from ciard_deploy.errors import CiardError, UsageError
from ciard_deploy.model_loader import load_model
from ciard_deploy.quantize_aware.fakequant import calibrate, freeze, learn_activation_scales, prepare_qat, scales

Progress = Callable[[dict[str, Any]], None]


@dataclass
class QatResult:
    """The frozen fake-quantized student, what it came from, and one line per epoch."""

    model: torch.nn.Module
    meta: CheckpointMeta
    recipe: RecipeBase
    source: Path
    settings: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)

    def describe(self, reproducible: bool = False) -> dict[str, Any]:
        """The settings, the per-epoch history and the learned scales. ``reproducible``: without what
        changes between identical runs (each epoch's seconds, the checkpoint's absolute path), as the
        artifact carries it, so the same fine-tuning always writes the same bytes."""
        if not reproducible:
            return {**self.settings, "history": self.history, "scales": scales(self.model)}
        history = [{k: v for k, v in line.items() if k != "time_s"} for line in self.history]
        settings = {**self.settings, "source_checkpoint": Path(self.settings["source_checkpoint"]).name}
        return {**settings, "history": history, "scales": scales(self.model)}


def run_recipe(run_dir: Path) -> RecipeBase:
    """The recipe a run dir was trained with (its resolved ``recipe.yaml``)."""
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        raise UsageError(f"{run_dir} holds no recipe.yaml: QAT fine-tunes a ciard run dir with the recipe it was "
                         "trained with")
    return load_recipe(path)


def finetune(run_dir: str | Path, *, epochs: int | None = None, lr: float | None = None,
             recipe: RecipeBase | None = None, train_subset: int | None = None, calib_batches: int | None = None,
             activation_scales: str | None = None, device: str = "cpu",
             progress: Progress | None = None) -> QatResult:
    """Fine-tunes the run's best student with INT8 fake quantization in the loop; returns it frozen.

    ``epochs``, ``lr``, ``train_subset``, ``calib_batches`` and ``activation_scales`` (observed or
    learned) default to the recipe's ``quantize`` section (then to ``QuantizeConfig``'s defaults).

    Raises:
        UsageError: no run dir / recipe, a bad setting (named, before any work), a ``train_subset`` larger than
            the training split, a layer the quantizer cannot handle (named), a loss that diverges.
    """
    run_dir = Path(run_dir)
    recipe = recipe or run_recipe(run_dir)
    subset_given = train_subset is not None
    q = quantize_settings(recipe.quantize, epochs=epochs, lr=lr, train_subset=train_subset,
                          calib_batches=calib_batches, activation_scales=activation_scales)  # before any work
    epochs, lr, train_subset, calib_batches = q.epochs, q.lr, q.train_subset, q.calib_batches
    activation_scales = q.activation_scales
    dev = torch.device(device)
    ckpt = resolve_checkpoint(run_dir)
    student, meta = load_model(run_dir)
    qmodel = prepare_qat(student).to(dev)  # refuses a layer it cannot quantize before any data is read

    data = prepare_data(recipe)
    if train_subset is not None and train_subset > len(data.train_idx):
        key = "QAT: train_subset" if subset_given else f"{recipe.source or 'recipe'}: quantize.train_subset"
        raise UsageError(f"{key} {train_subset} is more than the {len(data.train_idx)} training images of the run "
                         "(leave it out to fine-tune on all of them)")
    teachers: dict[str, torch.nn.Module] = {}
    if isinstance(recipe, DistillRecipe):
        teachers, _ = resolve_teachers(recipe, data.info, dev)
    idx = data.train_idx if train_subset is None else data.train_idx[:train_subset]
    bs = recipe.data.batch_size
    steps = len(idx) // bs + (1 if len(idx) % bs > 1 else 0)
    if steps < 1:
        raise UsageError(f"QAT: {len(idx)} training images make no batch of {bs}")
    gen = torch.Generator().manual_seed(recipe.train.seed)
    torch.manual_seed(recipe.train.seed)
    calibrate(qmodel, (x.to(dev) for i, (x, _) in zip(range(calib_batches),
                                                       iterate_batches(data.train, bs, indices=idx))))
    a = recipe.attack
    method = create_method(recipe.method.name, recipe.method.params, qmodel, teachers,
                           num_classes=data.info.num_classes, eps=a.eps, attack_steps=a.steps, step_size=a.step_size,
                           epochs=epochs, steps_per_epoch=steps)
    o = recipe.optim
    learned = learn_activation_scales(qmodel) if activation_scales == "learned" else []
    ids = {id(p) for p in learned}
    groups = [{"params": [p for p in qmodel.parameters() if id(p) not in ids]}]
    if learned:
        groups.append({"params": learned, "weight_decay": 0.0})  # LSQ: scales without weight decay
    opt = torch.optim.SGD(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    total = epochs * steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    history: list[dict[str, float]] = []
    for epoch in range(epochs):
        qmodel.train()
        method.on_epoch_start(epoch)
        order = idx[torch.randperm(len(idx), generator=gen)]
        if len(order) % bs == 1:
            order = order[:-1]  # a 1-image tail is dropped (as the trainer does)
        seen, loss_sum, tic = 0, 0.0, time.perf_counter()
        for x, y in iterate_batches(data.train, bs, generator=gen, augment=recipe.data.augment, indices=order):
            _, _, loss = train_step(method, opt, scaler, x, y, epoch, dev)
            if not math.isfinite(loss):
                raise CiardError(f"QAT: the loss became {loss} in epoch {epoch + 1}: lower quantize.lr")
            sched.step()
            seen += len(y)
            loss_sum += loss * len(y)
        line = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "images": seen,
                "time_s": round(time.perf_counter() - tic, 3)}
        history.append(line)
        if progress:
            progress(line)
    freeze(qmodel.cpu())
    settings = {"mode": "qat", "framework": "torch.ao.quantization eager-mode fake quantization (torch "
                f"{torch.__version__})", "epochs": epochs, "lr": lr, "schedule": "cosine over the steps",
                "method": recipe.method.name, "teachers": sorted(teachers), "eps": a.eps,
                "attack_steps": a.steps, "train_images": int(len(idx)), "calib_batches": calib_batches,
                "weights": "int8 per-channel symmetric", "activations": "int8 per-tensor symmetric",
                "activation_scales": activation_scales,
                "batchnorm": "folded into the preceding Conv2d before fine-tuning",
                "source_checkpoint": str(ckpt), "recipe_hash": recipe.hash}
    return QatResult(qmodel, meta, recipe, ckpt, settings, history)
