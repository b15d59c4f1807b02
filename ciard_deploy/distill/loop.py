"""One training run's loop, for every method: setup (data splits, teachers, seeds, student, method, SGD and
its schedule), the epochs and their steps, the selection evaluation and checkpoints at an epoch's end, the
saved state that makes a stop resumable, and the final phase (``summary``).

:func:`train_step` is one step exactly as the loop runs it: the method's ``train_step`` under autocast, the
student's backward and SGD step through a GradScaler, then ``method.after_student_step`` (CIARD's
robust-teacher update). ``trainer.run`` is the public entry; :class:`TrainingLoop` is constructed by it.

Kept as one file: the loop's phases share one object's state (model, optimizer, scheduler, scaler, method,
best-so-far, saved position), and splitting them would pass that state around instead of reading it; the
parts that stand alone (events, signals, RNG, splits, selection, saved state, summary) have their own modules.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ciard_deploy.config import DistillRecipe, RecipeBase
from ciard_deploy.data import iterate_batches
from ciard_deploy.distill import ddp
from ciard_deploy.distill.events import Callback, RunControl, TrainEvent, TrainingInterrupted, emit
from ciard_deploy.distill.loggers import Trackers, check_installed
from ciard_deploy.distill.methods import create_method
from ciard_deploy.distill.rng import rng_state, seed_everything, set_rng_state
from ciard_deploy.distill.run_context import log_to, signals_to
from ciard_deploy.distill.schedules import lr_factor
from ciard_deploy.distill.selection import accuracy_metrics, make_attacks, selection_score
from ciard_deploy.distill.speed import compile_in_place, place_train_data, student_sgd
from ciard_deploy.distill.splits import prepare_data
from ciard_deploy.distill.summary import final_test_metrics, run_summary, student_card
from ciard_deploy.distill.train_state import (STATE_FORMAT, STATE_NAME, bad_state, check_run_dir, check_same_teachers,
                                              save_train_state, trim_metrics)
from ciard_deploy.errors import CiardError, RecipeError, UsageError
from ciard_deploy.checkpoints import CheckpointMeta, save_checkpoint
from ciard_deploy.io import atomic_write_json, atomic_write_text
from ciard_deploy.lock import entries as lock_entries, remove_new_entries
from ciard_deploy.models import create_model

log = logging.getLogger(__name__)


#: how the loop gets a distillation's teachers, ``(recipe, info, device, *, callbacks, ctx) -> (models, refs)``:
#: ``trainer.resolve_teachers``, which trains the ones missing from the cache as nested runs (passed in, so
#: this module never imports the trainer)
TeacherSource = Callable[..., tuple[dict[str, nn.Module], dict[str, Any]]]


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(method: Any, opt: torch.optim.Optimizer, scaler: Any, x: torch.Tensor, y: torch.Tensor, epoch: int,
               device: torch.device, amp: str = "off", channels_last: bool = False) -> tuple[Any, dict[str, float], float]:
    """One training step exactly as the trainer runs it: the method's step under autocast, the
    student's backward and SGD step (through the GradScaler), then ``after_student_step`` (CIARD's
    robust-teacher update). Returns (StepResult, after-step metrics, loss as a float)."""
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    opt.zero_grad(set_to_none=True)
    with _autocast(device, amp):
        res = method.train_step(x, y, epoch)
    loss = res.loss.float()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    extra = method.after_student_step()
    return res, extra, float(loss.detach())


def _recipe_header(recipe: RecipeBase) -> str:
    src = f" from {recipe.source}" if recipe.source else ""
    return (f"# resolved recipe{src} (hash {recipe.hash[:16]})\n"
            f"# resume this run: ciard {recipe.kind} <this run dir>/recipe.yaml --out <this run dir> --resume\n")


class TrainingLoop:
    """One run in its run dir, from the resume checks to the summary; ``trainer.run`` constructs it and
    holds the run dir's lock around :meth:`execute`."""

    def __init__(self, recipe: RecipeBase, run_dir: Path, device: torch.device, ctx: ddp.DistContext,
                 callbacks: list[Callback], control: RunControl, resolve_teachers: TeacherSource) -> None:
        self.recipe = recipe
        self.run_dir = run_dir
        self.device = device
        self.ctx = ctx
        self.callbacks = callbacks if ctx.is_main else []
        self.control = control
        self.resolve_teachers = resolve_teachers
        self.state_path = run_dir / STATE_NAME
        t = recipe.train
        if t.amp == "fp16" and device.type != "cuda":
            raise UsageError(f"train.amp fp16 needs CUDA (device here: {device}); use bf16 or off")
        self.phase = "setup"  # "train", then "final_eval": what a stop at once interrupts
        self.saved_at: tuple[int, int] | None = None  # (epochs done, steps done in the next) of train_state.pt
        self.robust_label: str | None = None
        self.trackers = Trackers()  # train.loggers, opened on rank 0 once the resume position is known
        if t.eval_attack is not None:
            self.robust_label = make_attacks([t.eval_attack], recipe.attack.eps, t.eval_step_size)[0].label

    # ------------------------------------------------------------------ setup
    def execute(self, resume: bool, stop_after_epoch: int | None, handle_signals: bool) -> dict[str, Any]:
        """Trains (or resumes) the run and returns its summary; what a refusal before training created in
        the run dir is removed again. The caller holds the run dir's lock."""
        check_installed(self.recipe.train.loggers)  # exit 3 before anything is written or trained
        before = {p.name for p in lock_entries(self.run_dir)} if self.run_dir.is_dir() else set()
        try:
            return self._execute_held(resume, stop_after_epoch, handle_signals)
        except (CiardError, OSError) as e:
            # a refusal before any training (a dataset not found, a teacher checkpoint missing, a disk full
            # while writing recipe.yaml): the run dir gets back what it held; an interruption keeps its files
            if self.ctx.is_main and self.phase == "setup" and not isinstance(e, TrainingInterrupted):
                removed = remove_new_entries(self.run_dir, before)
                if removed:
                    log.debug("refused before training: removed %s from %s", ", ".join(removed), self.run_dir)
            raise

    def _execute_held(self, resume: bool, stop_after_epoch: int | None, handle_signals: bool) -> dict[str, Any]:
        state = check_run_dir(self.run_dir, self.recipe, resume)
        summary_path = self.run_dir / "summary.json"
        if state is not None and summary_path.exists():
            done = json.loads(summary_path.read_text())
            if done.get("status") == "complete":
                log.info("%s is already complete; nothing to resume", self.run_dir)
                return done
        self.ctx.barrier()
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not (self.run_dir / "recipe.yaml").exists():
                atomic_write_text(self.run_dir / "recipe.yaml", _recipe_header(self.recipe) + self.recipe.to_yaml())
        self.ctx.barrier()
        log_ctx = log_to(self.run_dir / "train.log") if self.ctx.is_main else contextlib.nullcontext()
        sig_ctx = signals_to(self.control) if handle_signals else contextlib.nullcontext()
        with log_ctx, sig_ctx, self._trackers_closed():
            try:
                return self._train(state, stop_after_epoch)
            except KeyboardInterrupt:  # a second SIGINT, or any signal while there is no step to finish
                raise self._stopped_at_once(self.control.stop_reason or "SIGINT") from None

    @contextlib.contextmanager
    def _trackers_closed(self) -> Iterator[None]:
        """Closes the trackers however the run ends (MLflow records finished, killed or failed)."""
        try:
            yield
        except BaseException as e:
            self.trackers.close(e)
            raise
        self.trackers.close(None)

    def _stopped_at_once(self, reason: str) -> TrainingInterrupted:
        """The TrainingInterrupted of a stop that did not wait for a step: it names what is kept."""
        d = self.run_dir
        if self.phase == "final_eval":
            e = self.recipe.train.epochs
            return TrainingInterrupted(
                f"interrupted ({reason}) before the final evaluation finished; training is done and its checkpoints "
                f"(student_best, student_last) and state are saved in {d}: --resume runs the final evaluation",
                d, e, 0)
        if self.saved_at is None:
            return TrainingInterrupted(f"interrupted ({reason}) before any state was saved in {d}: --resume starts "
                                       f"the training from its first step", d, 0, 0)
        e, st = self.saved_at
        where = f"epoch {e + 1} step {st}" if e < self.recipe.train.epochs else "the final evaluation"
        return TrainingInterrupted(f"interrupted ({reason}) at once; the last saved state in {d} resumes at {where}",
                                   d, e + 1 if st else e, st)

    def _setup(self) -> None:
        r, t = self.recipe, self.recipe.train
        dev = self.device
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = not t.deterministic
        self.data = prepare_data(r)
        self.data.train = place_train_data(self.data.train, t.data_on_device, dev)
        info = self.data.info
        # teachers first: training one (nested run) must not shift this run's seeds
        self.teachers: dict[str, nn.Module] = {}
        self.teacher_refs: dict[str, Any] = {}
        if isinstance(r, DistillRecipe):
            self.teachers, self.teacher_refs = self.resolve_teachers(r, info, dev, callbacks=self.callbacks,
                                                                     ctx=self.ctx)
        seed_everything(t.seed)
        spec = r.model_spec
        mean, std = (info.mean, info.std) if spec.normalize else (None, None)
        self.model = create_model(spec.arch, info.num_classes, info.in_chans, mean, std, stem=spec.stem,
                                  input_shape=info.input_shape, activation=spec.activation).to(dev)
        self.channels_last = t.channels_last and dev.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            for m in self.teachers.values():
                m.to(memory_format=torch.channels_last)
        self.net = ddp.wrap_student(self.model, self.ctx, dev, t.sync_bn)
        if self.ctx.enabled and t.sync_bn and dev.type == "cuda":
            self.model = self.net.module  # the converted (SyncBatchNorm) model
        if t.compile:
            compile_in_place([self.model, *self.teachers.values()])
        # data order: one generator, seeded from the recipe, drives shuffling and augmentation
        self.data_gen = torch.Generator().manual_seed(t.seed)
        self.per_rank_batch = r.data.batch_size // self.ctx.world_size
        if self.per_rank_batch < 1:
            raise UsageError(f"data.batch_size {r.data.batch_size} is smaller than the {self.ctx.world_size} ranks")
        n_rank = len(ddp.shard(self.data.train_idx, self.ctx))
        self.steps_per_epoch = self._n_batches(n_rank)
        if self.steps_per_epoch < 1:
            raise RecipeError(f"data: {len(self.data.train_idx)} training images make no batch of "
                              f"{self.per_rank_batch}")
        a = r.attack
        self.method = create_method(r.method.name, r.method.params, self.net, self.teachers,
                                    num_classes=info.num_classes, eps=a.eps, attack_steps=a.steps,
                                    step_size=a.step_size, epochs=t.epochs, steps_per_epoch=self.steps_per_epoch)
        self.trainable = self.method.trainable_teachers()
        self.hooks = [h for m in self.trainable.values() for h in ddp.average_gradients_of(m, self.ctx)]
        self.opt = student_sgd(self.model.parameters(), r.optim, t.fused_optimizer)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda e: lr_factor(r, e))
        self.scaler = torch.amp.GradScaler("cuda", enabled=t.amp == "fp16")
        self.best: dict[str, Any] = {"score": -1.0, "epoch": 0, "metrics": {}}

    def _n_batches(self, n: int) -> int:
        b = self.per_rank_batch
        full, rest = divmod(n, b)
        return full + (1 if rest > 1 else 0)  # a 1-image tail is dropped (BatchNorm needs 2)

    def _epoch_order(self) -> torch.Tensor:
        """This epoch's (shuffled, sharded) training positions; draws from the data generator."""
        idx = self.data.train_idx
        order = idx[torch.randperm(len(idx), generator=self.data_gen)]
        order = ddp.shard(order, self.ctx)
        b = self.per_rank_batch
        if len(order) % b == 1:
            order = order[:-1]
        return order

    # ------------------------------------------------------------------ state
    def _state(self, epoch: int, step: int, epoch_gen: torch.Tensor, meters: dict[str, float]) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "recipe_hash": self.recipe.hash,
            "epoch": epoch, "step": step,  # epochs fully done; steps done in the next one
            "epoch_gen": epoch_gen,
            "meters": dict(meters),
            "student": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "teachers": {role: {k: v.detach().cpu() for k, v in m.state_dict().items()}
                         for role, m in self.trainable.items()},
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method": self.method.state_dict(),
            "best": self.best,
            "rng": rng_state(self.data_gen),
            "elapsed_s": self.elapsed,
        }

    def _save_state(self, *args: Any) -> None:
        self.saved_at = (int(args[0]), int(args[1]))
        if not self.ctx.is_main:
            return
        state = self._state(*args)
        save_train_state(self.state_path, state)

    def _load_state(self, state: dict[str, Any]) -> tuple[int, int, torch.Tensor | None, dict[str, float]]:
        if state["recipe_hash"] != self.recipe.hash:
            raise RecipeError(f"{self.state_path} belongs to another recipe (hash {state['recipe_hash'][:12]})")
        self.model.load_state_dict(state["student"])
        for role, sd in state["teachers"].items():
            self.trainable[role].load_state_dict(sd)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        self.best = state["best"]
        self.elapsed = float(state.get("elapsed_s", 0.0))
        set_rng_state(state["rng"], self.data_gen)
        self.saved_at = (int(state["epoch"]), int(state["step"]))
        return state["epoch"], state["step"], state.get("epoch_gen"), dict(state.get("meters", {}))

    def _card(self, metrics: dict[str, Any], epoch: int) -> CheckpointMeta:
        return student_card(self.recipe, self.data.info, metrics, epoch)

    # ------------------------------------------------------------------ loop
    def _train(self, state: dict[str, Any] | None, stop_after_epoch: int | None) -> dict[str, Any]:
        r, t = self.recipe, self.recipe.train
        self.elapsed = 0.0
        self._setup()
        start_epoch, start_step, epoch_gen, meters = 0, 0, None, {}
        if state is not None:
            check_same_teachers(self.run_dir, self.teacher_refs)
            try:
                start_epoch, start_step, epoch_gen, meters = self._load_state(state)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
                # the right format tag with the wrong content (missing or mistyped entries, other shapes)
                first_line = str(e).splitlines()[0][:120] if str(e) else ""
                raise bad_state(self.state_path, f"{type(e).__name__} {first_line}".strip()) from None
            log.info("resuming %s at epoch %d step %d", self.run_dir, start_epoch + 1, start_step)
        # lines of epochs the state does not hold (all of them, when no state was saved) go: no epoch twice
        if self.ctx.is_main:
            trim_metrics(self.run_dir, start_epoch)
            atomic_write_json(self.run_dir / "teachers.json", self.teacher_refs)
            self.trackers = Trackers.open(t.loggers, self.run_dir, r, start_epoch)
        log.info("%s %s: %s on %s (%d train / %d selection images), %d epochs x %d steps, device %s%s",
                 r.kind, r.method.name, r.model_spec.arch, r.data.dataset, len(self.data.train_idx),
                 len(self.data.select_y), t.epochs, self.steps_per_epoch, self.device,
                 f", {self.ctx.world_size} ranks" if self.ctx.enabled else "")
        emit(self.callbacks, TrainEvent("run_start", self.run_dir, start_epoch, t.epochs, start_step,
                                        self.steps_per_epoch, control=self.control,
                                        message=f"{r.method.name}: {r.model_spec.arch} on {r.data.dataset}",
                                        metrics={"role": "student" if isinstance(r, DistillRecipe) else "model",
                                                 "method": r.method.name, "arch": r.model_spec.arch,
                                                 "dataset": r.data.dataset}))
        self.phase = "train"
        for epoch in range(start_epoch, t.epochs):
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                log.info("stopping after epoch %d as asked (resume with --resume)", epoch)
                return self._partial(epoch)
            resume_step = start_step if epoch == start_epoch else 0
            self._run_epoch(epoch, resume_step, epoch_gen if resume_step else None, meters if resume_step else {})
        return self._finish()

    def _run_epoch(self, epoch: int, skip: int, epoch_gen: torch.Tensor | None, meters: dict[str, float]) -> None:
        r, t, dev = self.recipe, self.recipe.train, self.device
        if epoch_gen is not None:
            self.data_gen.set_state(epoch_gen)
        epoch_gen = self.data_gen.get_state()
        order = self._epoch_order()
        self.method.on_epoch_start(epoch)
        lr = self.opt.param_groups[0]["lr"]
        emit(self.callbacks, TrainEvent("epoch_start", self.run_dir, epoch + 1, t.epochs, skip,
                                        self.steps_per_epoch, control=self.control))
        batches = iterate_batches(self.data.train, self.per_rank_batch, shuffle=False, generator=self.data_gen,
                                  augment=r.data.augment, indices=order)
        meters = dict(meters) or {"images": 0.0, "loss": 0.0, "time": 0.0}
        last_extra: dict[str, float] = {}
        tic = time.perf_counter()
        for step, (x, y) in enumerate(batches):
            if step < skip:
                continue  # a resumed epoch: replay the order and augmentation draws, skip the work
            res, extra, loss_value = train_step(self.method, self.opt, self.scaler, x, y, epoch, dev, t.amp,
                                                self.channels_last)
            if not math.isfinite(loss_value):
                raise CiardError(f"the loss became {loss_value} at epoch {epoch + 1} step {step + 1}: lower optim.lr"
                                 f"{' or set train.amp: off' if t.amp != 'off' else ''}")
            n = float(len(y))
            meters["images"] += n
            meters["loss"] += loss_value * n
            for k, v in res.metrics.items():
                meters[f"m:{k}"] = meters.get(f"m:{k}", 0.0) + float(v) * n
            last_extra = extra or last_extra
            now = time.perf_counter()
            meters["time"] += now - tic
            tic = now
            emit(self.callbacks, TrainEvent("step", self.run_dir, epoch + 1, t.epochs, step + 1,
                                            self.steps_per_epoch, loss=loss_value,
                                            images_per_s=meters["images"] * self.ctx.world_size
                                            / max(meters["time"], 1e-9), control=self.control))
            if ddp.any_rank(self.control.stop_requested, self.ctx, dev):
                self.control.request_stop(self.control.stop_reason or "stop requested on another rank")
            if self.control.stop_requested and step + 1 < self.steps_per_epoch:
                self._save_state(epoch, step + 1, epoch_gen, meters)
                self.elapsed += meters["time"]
                raise TrainingInterrupted(
                    f"interrupted ({self.control.stop_reason}) at epoch {epoch + 1} step {step + 1}; "
                    f"state saved in {self.run_dir}", self.run_dir, epoch + 1, step + 1)
        self._end_epoch(epoch, meters, last_extra, lr)
        if self.control.stop_requested and epoch + 1 < t.epochs:
            raise TrainingInterrupted(f"interrupted ({self.control.stop_reason}) after epoch {epoch + 1}; "
                                      f"state saved in {self.run_dir}", self.run_dir, epoch + 1, 0)

    def _end_epoch(self, epoch: int, meters: dict[str, float], extra: dict[str, float], lr: float) -> None:
        t = self.recipe.train
        e1 = epoch + 1
        meters = ddp.all_reduce_sums(meters, self.ctx, self.device)
        if self.ctx.enabled:  # every rank ends the epoch with rank 0's student buffers and one teacher
            meters["time"] /= self.ctx.world_size
            ddp.broadcast_buffers(self.model, self.ctx)
            for m in self.trainable.values():
                ddp.average_buffers(m, self.ctx)
        self.sched.step()
        self.elapsed += meters["time"]
        images = meters["images"]
        line: dict[str, Any] = {"epoch": e1, "lr": lr, "loss": meters["loss"] / images}
        for k, v in meters.items():
            if k.startswith("m:"):
                line[k[2:]] = v / images
        line.update({k: float(v) for k, v in extra.items()})
        line.update({"images": int(images), "time_s": round(meters["time"], 3),
                     "images_per_s": round(images / max(meters["time"], 1e-9), 1)})
        do_eval = (e1 % t.eval_every == 0 or e1 == t.epochs
                   or (t.eval_dense_from is not None and e1 >= t.eval_dense_from))
        if do_eval and self.ctx.is_main:
            ev = self._evaluate_selection(e1)
            line["eval"] = ev
            score = ev["score"]
            if score > self.best["score"]:
                self.best = {"score": score, "epoch": e1, "metrics": ev}
                save_checkpoint(self.run_dir / "student_best", self.model,
                                self._card({f"{self.data.select_source}/{k}": v for k, v in ev.items()}, e1))
            emit(self.callbacks, TrainEvent("eval", self.run_dir, e1, t.epochs, metrics=ev, control=self.control))
        if self.ctx.is_main:
            save_checkpoint(self.run_dir / "student_last", self.model, self._card({}, e1))
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
            self.trackers.log_line(line)
            self._save_state(e1, 0, self.data_gen.get_state(), {})
        self.ctx.barrier()
        log.info("epoch %d/%d: loss %.4f, %s%.0f img/s", e1, t.epochs, line["loss"],
                 "".join(f"{k} {v:.3f}, " for k, v in line.get("eval", {}).items() if k != "score"),
                 line["images_per_s"])
        emit(self.callbacks, TrainEvent("epoch_end", self.run_dir, e1, t.epochs, self.steps_per_epoch,
                                        self.steps_per_epoch, loss=line["loss"], images_per_s=line["images_per_s"],
                                        metrics=line, control=self.control))

    def _evaluate_selection(self, epoch: int) -> dict[str, float]:
        t = self.recipe.train
        specs = [t.eval_attack] if t.eval_attack else []
        ev = accuracy_metrics(self.model, self.data.select_x, self.data.select_y, specs, self.recipe.attack.eps,
                              self.recipe.data.eval_batch_size, self.device, seed=t.seed + epoch,
                              step_size=t.eval_step_size)
        ev["score"] = selection_score(ev, t.select_by, self.robust_label)
        return ev

    # ------------------------------------------------------------------ the end
    def _partial(self, epochs_done: int) -> dict[str, Any]:
        summary = {"status": "partial", "epochs_done": epochs_done, "epochs": self.recipe.train.epochs,
                   "run_dir": str(self.run_dir), "recipe_hash": self.recipe.hash,
                   "best_epoch": self.best["epoch"], "best_selection": self.best["metrics"]}
        emit(self.callbacks, TrainEvent("run_end", self.run_dir, epochs_done, self.recipe.train.epochs,
                                        metrics=summary, control=self.control))
        return summary

    def _finish(self) -> dict[str, Any]:
        t = self.recipe.train
        self.phase = "final_eval"
        if ddp.any_rank(self.control.stop_requested, self.ctx, self.device):
            # asked during the last epoch: that epoch is saved; the final evaluation is not started
            raise self._stopped_at_once(self.control.stop_reason or "stop requested")
        digests = ddp.gather_objects(
            {"student": ddp.state_digest(self.model),
             **{f"teacher.{k}": ddp.state_digest(m) for k, m in self.trainable.items()}}, self.ctx)
        summary: dict[str, Any] = {}
        self.control.stop_at_once = True  # no step to finish: a signal stops the evaluation now
        try:
            if self.ctx.is_main:
                summary = self._final_summary(digests)
                atomic_write_json(self.run_dir / "summary.json", summary)
        finally:
            self.control.stop_at_once = False
        self.ctx.barrier()
        summary = ddp.broadcast_object(summary, self.ctx)
        emit(self.callbacks, TrainEvent("run_end", self.run_dir, t.epochs, t.epochs, metrics=summary,
                                        control=self.control))
        return summary

    def _final_progress(self, label: str) -> Callable[[int, int, str], None]:
        """The final evaluation's progress as ``final_eval`` events (``best pgd20@8/255``); a stop
        requested by a callback ends the evaluation at the next batch."""
        t = self.recipe.train

        def update(done: int, total: int, stage: str | None = None) -> None:
            emit(self.callbacks, TrainEvent("final_eval", self.run_dir, t.epochs, t.epochs, done, total,
                                            message=f"{label} {stage}" if stage else label, control=self.control))
            if self.control.stop_requested:
                raise self._stopped_at_once(self.control.stop_reason or "stop requested")

        return update

    def _final_summary(self, digests: list[dict[str, str]]) -> dict[str, Any]:
        results, test_n = final_test_metrics(self.recipe, self.run_dir, self.data, self.device, self.best,
                                             self._final_progress)
        return run_summary(self.recipe, self.run_dir, data=self.data, device=self.device,
                           world_size=self.ctx.world_size, results=results, test_n=test_n, best=self.best,
                           robust_label=self.robust_label, elapsed=self.elapsed, teacher_refs=self.teacher_refs,
                           digests=digests)


__all__ = ["TeacherSource", "TrainingLoop", "train_step"]
