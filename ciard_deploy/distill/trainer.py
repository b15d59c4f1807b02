"""One training loop for every method: distillation (CIARD, MTARD, RSLAD, ARD) and plain training
(natural, PGD-AT, TRADES, the teachers).

    from ciard_deploy.config import load_recipe
    from ciard_deploy.distill.trainer import run
    summary = run(load_recipe("recipes/quick/...yaml"), "runs/ciard-digits")

What one call does, in order: takes the run dir's lock (``lock.folder_lock``: a second process
training into it is refused, exit 2), checks the run dir (never overwrites; ``resume=True`` continues
it), loads or trains the teachers, seeds everything, builds the student, the method, SGD and
its schedule, then loops over epochs: each step is ``method.train_step`` under autocast, the
student's backward and step (through a GradScaler for fp16), then ``method.after_student_step``
(CIARD's robust-teacher update). Every ``train.eval_every`` epochs (and the last) it evaluates
clean and ``train.eval_attack`` accuracy on a fixed held-out subset and keeps the best
checkpoint by (clean + robust) / 2; the last one is kept too. At each epoch end it appends to
``metrics.jsonl`` and atomically saves ``train_state.pt`` (every RNG state included), so an
interrupted run resumes bit-exactly on CPU. SIGINT/SIGTERM finish the current step, save a
mid-epoch state and raise :class:`TrainingInterrupted`. After the last epoch it evaluates
``student_best`` and ``student_last`` on the test split (``train.final_attacks``; once when they
are the same weights), reporting progress as ``final_eval`` events; a stop requested there ends it
at once (the checkpoints are saved already; ``--resume`` runs the final evaluation again). A second
SIGINT, or a ``KeyboardInterrupt``, stops at once too, keeping the last saved state.

Run dir::

    recipe.yaml            the recipe as resolved (every default filled in)
    student_best.*         best checkpoint by the selection score (safetensors + json model card)
    student_last.*         last epoch's checkpoint
    teachers.json          which teachers were used: path, sha256, recipe hash
    train_state.pt         resume state (torch.save; loaded with weights_only=True)
    metrics.jsonl          one line per epoch
    summary.json           final numbers on the test split, robust ones named like pgd20@8/255
    train.log              the run's log

The library never prints: progress goes to ``callbacks`` (see :class:`TrainEvent`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn

from ciard_deploy.config import DistillRecipe, Recipe, RecipeBase, load_recipe
from ciard_deploy.distill import ddp
from ciard_deploy.errors import ArtifactError, CiardError, InUse, RecipeError, UsageError
from ciard_deploy.checkpoints import CheckpointMeta, UnreadableTorchFile, load_torch_file, save_checkpoint
from ciard_deploy.io import atomic_path, atomic_write_json, atomic_write_text
from ciard_deploy.lock import entries as lock_entries, folder_lock, remove_new_entries

log = logging.getLogger(__name__)

STATE_FORMAT = "ciard-train-state/1"
EventKind = Literal["run_start", "teacher", "teacher_reused", "epoch_start", "step", "epoch_end", "eval",
                    "final_eval", "run_end"]


# --------------------------------------------------------------------------- control and events
class TrainingInterrupted(CiardError):
    """A stop was requested (SIGINT/SIGTERM or a callback); the state is saved for ``--resume``."""

    exit_code = 130

    def __init__(self, message: str, run_dir: Path, epoch: int, step: int) -> None:
        super().__init__(message)
        self.run_dir = run_dir
        self.epoch = epoch
        self.step = step


class RunControl:
    """Lets a signal handler or a callback ask the loop to stop after the current step.

    ``stop_at_once`` is set while there is no step to finish (the final evaluation): a signal then
    stops the run immediately instead of waiting for the phase to end.
    """

    def __init__(self) -> None:
        self.stop_reason: str | None = None
        self.stop_at_once = False

    def request_stop(self, reason: str = "stop requested") -> None:
        self.stop_reason = reason

    @property
    def stop_requested(self) -> bool:
        return self.stop_reason is not None


@dataclass
class TrainEvent:
    """What callbacks receive. ``epoch`` is 1-based; ``step`` counts steps done in the epoch.

    Kinds: ``run_start`` (``metrics``: ``role`` student or model, ``method``, ``arch``, ``dataset``),
    ``teacher`` (a teacher is being trained: ``message`` says which), ``teacher_reused`` (a teacher
    taken from the cache: ``message`` names it and its folder), ``epoch_start``, ``step``,
    ``epoch_end`` (``metrics`` = the metrics.jsonl line), ``eval`` (the selection evaluation),
    ``final_eval`` (progress of the final test evaluation: ``step`` images done of ``steps`` in the
    phase ``message``, e.g. ``best pgd20@8/255``), ``run_end`` (``metrics`` = the summary).
    """

    kind: EventKind
    run_dir: Path
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    loss: float | None = None
    images_per_s: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    control: RunControl | None = field(default=None, repr=False)


Callback = Callable[[TrainEvent], None]


# --------------------------------------------------------------------------- schedules
def lr_factor(recipe: RecipeBase, epoch_index: int) -> float:
    """The student lr multiplier in epoch ``epoch_index`` (0-based) for the recipe's schedule.

    ``ciard``: 1 up to ``decay_start`` of the run, then (0.5 + 0.5 cos(pi t)) exp(-0.01 t^2)
    reaching exactly 0 at the last epoch, as the reference counts epochs (1-based).
    """
    from ciard_deploy.distill.schedules import delayed_cosine_exp

    o, epochs = recipe.optim, recipe.train.epochs
    if o.schedule == "ciard":
        return delayed_cosine_exp(epoch_index + 1, round(o.decay_start * epochs), epochs)
    if o.schedule == "step":
        return o.gamma ** sum(1 for m in o.milestones if m <= epoch_index)
    if o.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch_index / epochs))
    return 1.0


# --------------------------------------------------------------------------- RNG state (weights_only-safe)
def rng_state(data_gen: torch.Generator) -> dict[str, Any]:
    """Every RNG the loop uses, as tensors and plain python values (loads with weights_only=True)."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss": py_gauss},
        "data": data_gen.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any], data_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))
    data_gen.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _signals_to(control: RunControl) -> Iterator[None]:
    """SIGINT/SIGTERM request a stop after the current step; a second SIGINT, or any while
    ``control.stop_at_once`` (no step to finish), stops at once with a KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if control.stop_at_once or (control.stop_requested and signum == signal.SIGINT):
            log.info("%s received: stopping now", name)
            control.request_stop(control.stop_reason or name)
            raise KeyboardInterrupt
        log.warning("%s received: finishing the current step, then saving", name)
        control.request_stop(name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def _log_to(path: Path | None) -> Iterator[None]:
    """Copies the package's log records (INFO and up) into ``path`` for the duration of a run."""
    if path is None:
        yield
        return
    pkg = logging.getLogger("ciard_deploy")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    old_level, old_propagate, effective = pkg.level, pkg.propagate, pkg.getEffectiveLevel()
    added: list[logging.Handler] = [handler]
    if effective > logging.INFO:
        # the file wants INFO; whoever listens above the package keeps seeing only what it saw before
        pkg.setLevel(logging.INFO)
        if old_propagate:
            pkg.propagate = False
            added.append(_Forward(effective))
    for h in added:
        pkg.addHandler(h)
    try:
        yield
    finally:
        for h in added:
            pkg.removeHandler(h)
        handler.close()
        pkg.setLevel(old_level)
        pkg.propagate = old_propagate


class _Forward(logging.Handler):
    """Passes records at or above ``level`` on to the root logger's handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger().handle(record)


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


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_differences(a: RecipeBase, b: RecipeBase, limit: int = 4) -> list[str]:
    """Dotted keys whose values differ between two recipes (for resume mismatches)."""
    fa, fb = _flat(a.to_dict()), _flat(b.to_dict())
    keys = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in keys[:limit]]


def _emit(callbacks: Sequence[Callback], event: TrainEvent) -> None:
    for cb in callbacks:
        cb(event)


# --------------------------------------------------------------------------- data
@dataclass
class DataSplits:
    """The datasets of one run: training positions, the fixed selection subset, the test split."""

    train: Any  # ArrayDataset (after train_subset)
    train_idx: torch.Tensor  # positions in ``train`` used for training (holdout removed)
    select_x: torch.Tensor
    select_y: torch.Tensor
    select_source: str  # "holdout" or "test"
    info: Any  # DatasetInfo
    test: Any = None  # ArrayDataset, loaded lazily

    @property
    def num_classes(self) -> int:
        return self.info.num_classes


def prepare_data(recipe: RecipeBase) -> DataSplits:
    """Loads the training split, takes the subset and holdout, and the fixed selection subset."""
    from ciard_deploy.data import create_dataset, stratified_indices

    d = recipe.data
    train = create_dataset(d.dataset, "train", d.data_root, d.download, n=d.train_subset, seed=d.split_seed)
    n = len(train)
    n_hold = int(round(d.holdout * n)) if d.holdout < 1 else int(d.holdout)
    if n_hold >= n:
        raise RecipeError(f"data.holdout: {n_hold} held-out images leave none of the {n} for training")
    hold_idx = stratified_indices(train.labels, n_hold, seed=d.split_seed) if n_hold else torch.empty(0, dtype=torch.long)
    mask = torch.ones(n, dtype=torch.bool)
    mask[hold_idx] = False
    train_idx = mask.nonzero().flatten()
    if recipe.train.selection == "holdout":
        hold = train.subset(hold_idx)
        pick = stratified_indices(hold.labels, recipe.train.eval_n, seed=d.split_seed)
        sx, sy = hold.tensors(pick)
        test = None
    else:
        test = create_dataset(d.dataset, "test", d.data_root, d.download)
        pick = stratified_indices(test.labels, recipe.train.eval_n, seed=d.split_seed)
        sx, sy = test.tensors(pick)
    return DataSplits(train, train_idx, sx, sy, recipe.train.selection, train.info, test)


def make_attacks(specs: Sequence[str], eps: float, step_size: float | None = None) -> list[Any]:
    """Evaluation attacks; ``step_size`` (if given) replaces the default of the attacks that take one."""
    import inspect

    from ciard_deploy.attacks import create_attack
    from ciard_deploy.attacks.base import parse_attack_spec

    out = []
    for spec in specs:
        kw = {}
        if step_size is not None and "step_size" in inspect.signature(parse_attack_spec(spec)[0].load()).parameters:
            kw["step_size"] = step_size
        out.append(create_attack(spec, eps, **kw))
    return out


def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack_specs: Sequence[str], eps: float,
                   batch_size: int, device: torch.device, seed: int,
                   step_size: float | None = None,
                   progress: Callable[[int, int, str], None] | None = None) -> dict[str, float]:
    """``{"clean": acc, "<attack>@<eps>": acc, ...}`` with a fixed seed that leaves the caller's RNG alone;
    ``progress(done, total, stage)`` as in ``attacks.evaluate``."""
    from ciard_deploy.attacks import evaluate

    attacks = make_attacks(attack_specs, eps, step_size)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        res = evaluate(model, x, y, attacks, batch_size=batch_size, device=device, progress=progress)
    out = {"clean": res.clean_acc}
    for a in res.attacks:
        out[a.label] = a.robust_acc
    if len(res.attacks) > 1:
        out[res.worst_case_label] = res.worst_case_acc
    return out


def selection_score(metrics: dict[str, float], select_by: str, robust_label: str | None) -> float:
    if select_by == "clean" or robust_label is None:
        return metrics["clean"]
    if select_by == "robust":
        return metrics[robust_label]
    return 0.5 * (metrics["clean"] + metrics[robust_label])


# --------------------------------------------------------------------------- the run
def run(recipe: Recipe | str | Path, out_dir: str | Path, *, resume: bool = False, device: str | None = None,
        callbacks: Sequence[Callback] | Callback | None = None, overrides: Sequence[str] = (),
        stop_after_epoch: int | None = None, control: RunControl | None = None,
        handle_signals: bool = True) -> dict[str, Any]:
    """Trains the recipe's model (kind distill: the student from its teachers; kind train: a
    teacher or baseline) into ``out_dir`` and returns the summary (also in ``summary.json``).

    Args:
        recipe: a validated recipe, or a recipe file (then ``overrides`` apply).
        out_dir: the run dir; must not exist (or be empty) unless ``resume``.
        resume: continue the run in ``out_dir`` from its last saved state (a missing or empty
            ``out_dir`` starts fresh, so a job can always pass it).
        device: overrides ``train.device`` (auto, cpu, cuda, cuda:N, mps).
        callbacks: called with a :class:`TrainEvent` at run/epoch/step boundaries.
        overrides: ``a.b=value`` strings applied when ``recipe`` is a path.
        stop_after_epoch: stop (state saved, status ``partial``) once this many epochs are done.
        control: a :class:`RunControl` to request a stop from outside (else one is made).
        handle_signals: turn SIGINT/SIGTERM into a clean stop (main thread only).

    Returns:
        the summary dict; ``status`` is ``complete`` or ``partial``.

    Raises:
        UsageError: the run dir exists without ``resume``; bad device/amp combination.
        InUse: another process is training into ``out_dir`` (it holds the folder's lock; exit 2).
        RecipeError: the recipe does not validate, or differs from the one a resumed run used.
        TrainingInterrupted: a stop was requested mid-run; the state is saved (exit code 130).
    """
    if not isinstance(recipe, RecipeBase):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise UsageError("overrides apply to a recipe file; apply them before validating a Recipe object")
    if callable(callbacks):
        callbacks = [callbacks]
    from ciard_deploy.devices import resolve_device

    dev = resolve_device(device or recipe.train.device)
    ctx = ddp.init_from_env(dev.type)
    if ctx.enabled and dev.type == "cuda":
        dev = torch.device("cuda", ctx.local_rank)
    pkg_log = logging.getLogger("ciard_deploy")
    old_level = pkg_log.level
    if not ctx.is_main:
        pkg_log.setLevel(logging.ERROR)  # rank 0 alone logs
    trainer: _Trainer | None = None
    try:
        trainer = _Trainer(recipe, Path(out_dir), dev, ctx, list(callbacks or []), control or RunControl())
        return trainer.execute(resume=resume, stop_after_epoch=stop_after_epoch, handle_signals=handle_signals)
    finally:
        pkg_log.setLevel(old_level)
        if ctx.owns_group:
            # the DDP reducer and gloo work objects go before the process group, not at interpreter exit
            del trainer
            import gc

            gc.collect()
        ctx.close()


class _Trainer:
    """State of one run; :func:`run` is its public face."""

    def __init__(self, recipe: RecipeBase, run_dir: Path, device: torch.device, ctx: ddp.DistContext,
                 callbacks: list[Callback], control: RunControl) -> None:
        self.recipe = recipe
        self.run_dir = run_dir
        self.device = device
        self.ctx = ctx
        self.callbacks = callbacks if ctx.is_main else []
        self.control = control
        self.state_path = run_dir / "train_state.pt"
        t = recipe.train
        if t.amp == "fp16" and device.type != "cuda":
            raise UsageError(f"train.amp fp16 needs CUDA (device here: {device}); use bf16 or off")
        self.phase = "setup"  # "train", then "final_eval": what a stop at once interrupts
        self.saved_at: tuple[int, int] | None = None  # (epochs done, steps done in the next) of train_state.pt
        self.robust_label: str | None = None
        if t.eval_attack is not None:
            self.robust_label = make_attacks([t.eval_attack], recipe.attack.eps, t.eval_step_size)[0].label

    # ------------------------------------------------------------------ run dir
    def _check_run_dir(self, resume: bool) -> dict[str, Any] | None:
        """Returns a loaded train state when resuming one, None for a fresh start."""
        d = self.run_dir
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
        if old.hash != self.recipe.hash:
            diff = "; ".join(recipe_differences(old, self.recipe))
            raise RecipeError(f"--resume: the recipe differs from the one {d} was started with ({diff}); "
                              f"resume with the same recipe, or use another --out")
        if not self.state_path.exists():
            return None
        try:
            state = load_torch_file(self.state_path)
        except UnreadableTorchFile as e:
            raise self._bad_state(e.reason) from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise self._bad_state(f"no {STATE_FORMAT} record (found {str(found)[:40]!r})")
        return state

    def _bad_state(self, reason: str) -> ArtifactError:
        """A ``train_state.pt`` that is not a ciard training state (damaged, or hostile): one line that never
        suggests loading it some other way."""
        return ArtifactError(f"{self.state_path}: not a ciard training state (corrupt or not made by ciard): "
                             f"{reason}; delete it to start over or restore it")

    def _check_same_teachers(self) -> None:
        """On resume: each teacher file must be the one the run started with (a checkpoint replaced at
        the same path, or a cached teacher trained again, would silently change the run)."""
        path = self.run_dir / "teachers.json"
        if not path.is_file():
            return
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError):
            return  # an unreadable record cannot be compared; the recipe hash was checked already
        for role, ref in self.teacher_refs.items():
            old = (before.get(role) or {}).get("sha256")
            if old and ref.get("sha256") and old != ref["sha256"]:
                raise ArtifactError(f"--resume: the {role} teacher {ref.get('path')} is not the file this run started "
                                    f"with (sha256 {old[:12]}... then, {ref['sha256'][:12]}... now); put the original "
                                    f"back, or start a new run with another --out")

    # ------------------------------------------------------------------ setup
    def execute(self, resume: bool, stop_after_epoch: int | None, handle_signals: bool) -> dict[str, Any]:
        """Runs holding the run dir's lock (``lock.folder_lock``, taken by rank 0 before anything in the folder
        is read): a second process training into the same folder is refused (``InUse``, exit 2, naming the
        holder's pid) and the holder's files are never mixed with its own."""
        d = self.run_dir
        if d.exists() and not d.is_dir():
            raise UsageError(f"--out {d} is a file, not a run dir")
        with contextlib.ExitStack() as held:
            refused: CiardError | None = None
            if self.ctx.is_main:
                try:
                    held.enter_context(folder_lock(d, hint="wait for it or use another --out"))
                except CiardError as e:
                    refused = e
            message = ddp.broadcast_object(None if refused is None else str(refused), self.ctx)
            if message is not None:
                raise refused if refused is not None else InUse(message)
            return self._execute(resume, stop_after_epoch, handle_signals)

    def _execute(self, resume: bool, stop_after_epoch: int | None, handle_signals: bool) -> dict[str, Any]:
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
        state = self._check_run_dir(resume)
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
        log_ctx = _log_to(self.run_dir / "train.log") if self.ctx.is_main else contextlib.nullcontext()
        sig_ctx = _signals_to(self.control) if handle_signals else contextlib.nullcontext()
        with log_ctx, sig_ctx:
            try:
                return self._train(state, stop_after_epoch)
            except KeyboardInterrupt:  # a second SIGINT, or any signal while there is no step to finish
                raise self._stopped_at_once(self.control.stop_reason or "SIGINT") from None

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
        info = self.data.info
        # teachers first: training one (nested run) must not shift this run's seeds
        self.teachers: dict[str, nn.Module] = {}
        self.teacher_refs: dict[str, Any] = {}
        if isinstance(r, DistillRecipe):
            from ciard_deploy.distill.teachers import resolve_teachers

            self.teachers, self.teacher_refs = resolve_teachers(r, info, dev, callbacks=self.callbacks,
                                                                ctx=self.ctx)
        seed_everything(t.seed)
        from ciard_deploy.models import create_model

        spec = r.model_spec
        mean, std = (info.mean, info.std) if spec.normalize else (None, None)
        self.model = create_model(spec.arch, info.num_classes, info.in_chans, mean, std).to(dev)
        self.channels_last = t.channels_last and dev.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            for m in self.teachers.values():
                m.to(memory_format=torch.channels_last)
        self.net = ddp.wrap_student(self.model, self.ctx, dev, t.sync_bn)
        if self.ctx.enabled and t.sync_bn and dev.type == "cuda":
            self.model = self.net.module  # the converted (SyncBatchNorm) model
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
        from ciard_deploy.distill.methods import create_method

        a = r.attack
        self.method = create_method(r.method.name, r.method.params, self.net, self.teachers,
                                    num_classes=info.num_classes, eps=a.eps, attack_steps=a.steps,
                                    step_size=a.step_size, epochs=t.epochs, steps_per_epoch=self.steps_per_epoch)
        self.trainable = self.method.trainable_teachers()
        self.hooks = [h for m in self.trainable.values() for h in ddp.average_gradients_of(m, self.ctx)]
        o = r.optim
        self.opt = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum,
                                   weight_decay=o.weight_decay, nesterov=o.nesterov and o.momentum > 0)
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
        with atomic_path(self.state_path) as tmp:
            torch.save(state, tmp)

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

    def _meta(self, metrics: dict[str, Any], epoch: int) -> CheckpointMeta:
        info, r = self.data.info, self.recipe
        spec = r.model_spec
        return CheckpointMeta(
            arch=spec.arch, num_classes=info.num_classes, input_shape=tuple(info.input_shape),
            mean=tuple(info.mean) if spec.normalize else (0.0,) * info.in_chans,
            std=tuple(info.std) if spec.normalize else (1.0,) * info.in_chans,
            dataset=info.name, classes=tuple(info.classes), eps=r.attack.eps, recipe_hash=r.hash,
            role="student" if isinstance(r, DistillRecipe) else "model",
            metrics={"epoch": epoch, **metrics},
            extra={"method": r.method.name, "kind": r.kind, "eps_label": _eps_label(r.attack.eps)})

    # ------------------------------------------------------------------ loop
    def _train(self, state: dict[str, Any] | None, stop_after_epoch: int | None) -> dict[str, Any]:
        r, t = self.recipe, self.recipe.train
        self.elapsed = 0.0
        self._setup()
        start_epoch, start_step, epoch_gen, meters = 0, 0, None, {}
        if state is not None:
            self._check_same_teachers()
            try:
                start_epoch, start_step, epoch_gen, meters = self._load_state(state)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
                # the right format tag with the wrong content (missing or mistyped entries, other shapes)
                raise self._bad_state(f"{type(e).__name__} {str(e).splitlines()[0][:120] if str(e) else ''}".strip()) \
                    from None
            log.info("resuming %s at epoch %d step %d", self.run_dir, start_epoch + 1, start_step)
        # lines of epochs the state does not hold (all of them, when no state was saved) go: no epoch twice
        self._trim_metrics(start_epoch)
        if self.ctx.is_main:
            atomic_write_json(self.run_dir / "teachers.json", self.teacher_refs)
        log.info("%s %s: %s on %s (%d train / %d selection images), %d epochs x %d steps, device %s%s",
                 r.kind, r.method.name, r.model_spec.arch, r.data.dataset, len(self.data.train_idx),
                 len(self.data.select_y), t.epochs, self.steps_per_epoch, self.device,
                 f", {self.ctx.world_size} ranks" if self.ctx.enabled else "")
        _emit(self.callbacks, TrainEvent("run_start", self.run_dir, start_epoch, t.epochs, start_step,
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
        from ciard_deploy.data import iterate_batches

        r, t, dev = self.recipe, self.recipe.train, self.device
        if epoch_gen is not None:
            self.data_gen.set_state(epoch_gen)
        epoch_gen = self.data_gen.get_state()
        order = self._epoch_order()
        self.method.on_epoch_start(epoch)
        lr = self.opt.param_groups[0]["lr"]
        _emit(self.callbacks, TrainEvent("epoch_start", self.run_dir, epoch + 1, t.epochs, skip,
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
            _emit(self.callbacks, TrainEvent("step", self.run_dir, epoch + 1, t.epochs, step + 1,
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
                                self._meta({f"{self.data.select_source}/{k}": v for k, v in ev.items()}, e1))
            _emit(self.callbacks, TrainEvent("eval", self.run_dir, e1, t.epochs, metrics=ev, control=self.control))
        if self.ctx.is_main:
            save_checkpoint(self.run_dir / "student_last", self.model, self._meta({}, e1))
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
            self._save_state(e1, 0, self.data_gen.get_state(), {})
        self.ctx.barrier()
        log.info("epoch %d/%d: loss %.4f, %s%.0f img/s", e1, t.epochs, line["loss"],
                 "".join(f"{k} {v:.3f}, " for k, v in line.get("eval", {}).items() if k != "score"),
                 line["images_per_s"])
        _emit(self.callbacks, TrainEvent("epoch_end", self.run_dir, e1, t.epochs, self.steps_per_epoch,
                                         self.steps_per_epoch, loss=line["loss"], images_per_s=line["images_per_s"],
                                         metrics=line, control=self.control))

    def _evaluate_selection(self, epoch: int) -> dict[str, float]:
        t = self.recipe.train
        specs = [t.eval_attack] if t.eval_attack else []
        ev = evaluate_model(self.model, self.data.select_x, self.data.select_y, specs, self.recipe.attack.eps,
                            self.recipe.data.eval_batch_size, self.device, seed=t.seed + epoch,
                            step_size=t.eval_step_size)
        ev["score"] = selection_score(ev, t.select_by, self.robust_label)
        return ev

    def _trim_metrics(self, epochs_done: int) -> None:
        """Keeps one metrics.jsonl line per epoch the saved state holds (``epochs_done``; 0 when none was saved).

        An epoch's line is appended before its state is saved, so a crash between the two (a full disk)
        leaves a line the resumed run writes again: it goes, as do lines a torn write left unreadable and,
        of an epoch listed twice, all but the last line."""
        path = self.run_dir / "metrics.jsonl"
        if not self.ctx.is_main or not path.exists():
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

    # ------------------------------------------------------------------ the end
    def _partial(self, epochs_done: int) -> dict[str, Any]:
        summary = {"status": "partial", "epochs_done": epochs_done, "epochs": self.recipe.train.epochs,
                   "run_dir": str(self.run_dir), "recipe_hash": self.recipe.hash,
                   "best_epoch": self.best["epoch"], "best_selection": self.best["metrics"]}
        _emit(self.callbacks, TrainEvent("run_end", self.run_dir, epochs_done, self.recipe.train.epochs,
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
        _emit(self.callbacks, TrainEvent("run_end", self.run_dir, t.epochs, t.epochs, metrics=summary,
                                         control=self.control))
        return summary

    def _final_progress(self, label: str) -> Callable[[int, int, str], None]:
        """The final evaluation's progress as ``final_eval`` events (``best pgd20@8/255``); a stop
        requested by a callback ends the evaluation at the next batch."""
        t = self.recipe.train

        def update(done: int, total: int, stage: str | None = None) -> None:
            _emit(self.callbacks, TrainEvent("final_eval", self.run_dir, t.epochs, t.epochs, done, total,
                                             message=f"{label} {stage}" if stage else label, control=self.control))
            if self.control.stop_requested:
                raise self._stopped_at_once(self.control.stop_reason or "stop requested")

        return update

    def _final_summary(self, digests: list[dict[str, str]]) -> dict[str, Any]:
        from ciard_deploy.data import create_dataset, stratified_indices
        from ciard_deploy.checkpoints import load_weights_into
        from ciard_deploy.fingerprint import sha256_file

        r, t, d = self.recipe, self.recipe.train, self.recipe.data
        test = self.data.test or create_dataset(d.dataset, "test", d.data_root, d.download)
        idx = stratified_indices(test.labels, t.final_eval_n, seed=d.split_seed) if t.final_eval_n else None
        tx, ty = test.tensors(idx)
        specs = list(dict.fromkeys(t.final_attacks))
        results = {}
        paths = {w: self.run_dir / f"student_{w}.safetensors" for w in ("best", "last")}
        # the best epoch is often the last: the same weights are evaluated once (same seed, same numbers)
        same = paths["best"].exists() and sha256_file(paths["best"]) == sha256_file(paths["last"])
        for which in ("best", "last"):
            path = paths[which]
            if which == "best" and not path.exists():
                continue
            from ciard_deploy.models import create_model

            info = self.data.info
            net = create_model(r.model_spec.arch, info.num_classes, info.in_chans).to(self.device)
            load_weights_into(net, path)
            if which == "last" and same:
                test_metrics = dict(results["best"])
                log.info("final evaluation: student_last is student_best (epoch %d): its numbers are reused",
                         self.best["epoch"])
            else:
                label = "best = last" if same else which
                test_metrics = evaluate_model(net, tx, ty, specs, r.attack.eps, d.eval_batch_size, self.device,
                                              seed=t.seed + 10_000, step_size=t.eval_step_size,
                                              progress=self._final_progress(label))
                log.info("final evaluation of %s on %d test images: %s", label, len(ty),
                         ", ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()))
            results[which] = test_metrics
            epoch = self.best["epoch"] if which == "best" else t.epochs
            sel = self.best["metrics"] if which == "best" else {}
            save_checkpoint(self.run_dir / f"student_{which}", net,
                            self._meta({**{f"test/{k}": v for k, v in test_metrics.items()},
                                        **{f"{self.data.select_source}/{k}": v for k, v in sel.items()}}, epoch))
        last_line = {}
        mpath = self.run_dir / "metrics.jsonl"
        if mpath.exists():
            lines = [ln for ln in mpath.read_text().splitlines() if ln.strip()]
            last_line = json.loads(lines[-1]) if lines else {}
        total_images = len(self.data.train_idx) // self.ctx.world_size * self.ctx.world_size * t.epochs
        return {
            "status": "complete",
            "kind": r.kind,
            "method": r.method.name,
            "arch": r.model_spec.arch,
            "dataset": r.data.dataset,
            "eps": r.attack.eps,
            "eps_label": _eps_label(r.attack.eps),
            "epochs": t.epochs,
            "seed": t.seed,
            "recipe_hash": r.hash,
            "device": str(self.device),
            "amp": t.amp,
            "world_size": self.ctx.world_size,
            "test_n": len(ty),
            "selection": {"on": self.data.select_source, "n": len(self.data.select_y), "by": t.select_by,
                          "attack": self.robust_label, "best_epoch": self.best["epoch"],
                          "best": self.best["metrics"]},
            "best": results.get("best", {}),
            "last": results.get("last", {}),
            "train_time_s": round(self.elapsed, 2),
            "images_per_s": round(total_images / max(self.elapsed, 1e-9), 1),
            "final_train_metrics": {k: v for k, v in last_line.items() if k != "eval"},
            "teachers": self.teacher_refs,
            "ranks": {"digests": digests, "in_sync": all(dg == digests[0] for dg in digests)},
            "run_dir": str(self.run_dir),
        }


def _eps_label(eps: float) -> str:
    from ciard_deploy.attacks import format_eps

    return format_eps(eps)


def _recipe_header(recipe: RecipeBase) -> str:
    src = f" from {recipe.source}" if recipe.source else ""
    return (f"# resolved recipe{src} (hash {recipe.hash[:16]})\n"
            f"# resume this run: ciard {recipe.kind} <this run dir>/recipe.yaml --out <this run dir> --resume\n")


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    """The ``summary.json`` of a finished run."""
    p = Path(run_dir) / "summary.json"
    if not p.exists():
        raise UsageError(f"{run_dir} has no summary.json (not a finished run)")
    return json.loads(p.read_text())


__all__ = ["Callback", "DataSplits", "RunControl", "TrainEvent", "TrainingInterrupted", "evaluate_model",
           "load_summary", "lr_factor", "make_attacks", "prepare_data", "recipe_differences", "run", "seed_everything",
           "train_step"]
