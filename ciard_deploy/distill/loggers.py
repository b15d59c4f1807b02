"""Experiment trackers (``train.loggers``): TensorBoard and MLflow get the scalars of each ``metrics.jsonl`` line.

The loop calls one :class:`Trackers` where it appends to ``metrics.jsonl`` (rank 0 only) and closes it when
the run ends, stops or fails. A line's numbers become ``train/<key>`` (loss, lr, the method's temperatures and
push weight, images/s) and ``eval/<key>`` (the selection evaluation: clean, ``pgd20@8/255``, score), at step =
the epoch, as metrics.jsonl counts them. A resumed run appends and logs no epoch twice:

- TensorBoard: ``<run>/tb``; the writer reopens with ``purge_step`` = first epoch not in the saved state, so
  events of epochs that ``metrics.jsonl`` trimming drops are dropped by TensorBoard too.
- MLflow: ``$MLFLOW_TRACKING_URI`` when set, else a local file store ``file:<run>/mlruns``; experiment
  ``$MLFLOW_EXPERIMENT_NAME`` or ``ciard-deploy``, run named after the run dir, the recipe as params.
  ``<run>/mlflow_run.json`` keeps the run id, so a resumed run reopens the same MLflow run; an MLflow run
  cannot forget a point, so epochs it already holds are not logged again.

Both packages are extras, imported when a tracker opens; :func:`check_installed` refuses a missing one
(exit 3, naming the extra) before any training.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Protocol

from ciard_deploy.config import RecipeBase
from ciard_deploy.config.sections import LOGGER_NAMES
from ciard_deploy.distill.events import TrainingInterrupted
from ciard_deploy.errors import EnvironmentMissing, UsageError
from ciard_deploy.fingerprint import flatten
from ciard_deploy.io import atomic_write_json

log = logging.getLogger(__name__)

#: logger name -> (module that must be importable, the extra that installs it)
REQUIREMENTS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
TB_DIR = "tb"
MLFLOW_DIR = "mlruns"
MLFLOW_RECORD = "mlflow_run.json"
DEFAULT_EXPERIMENT = "ciard-deploy"


def check_installed(names: list[str] | tuple[str, ...]) -> None:
    """EnvironmentMissing (exit 3, one line naming the extra) for the first of ``names`` not installed here."""
    for name in names:
        module, extra = REQUIREMENTS[name]
        if importlib.util.find_spec(module) is None:
            raise EnvironmentMissing(f"train.loggers: {name} is not installed here: "
                                     f"pip install 'ciard-deploy[{extra}]'")


def scalars(line: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl line by tag: ``train/<key>`` for the epoch's own, ``eval/<key>``
    for the selection evaluation's (``epoch`` is the step, not a scalar)."""
    out: dict[str, float] = {}
    for k, v in line.items():
        if k == "epoch":
            continue
        if isinstance(v, dict):
            out.update({f"{k}/{sk}": float(sv) for sk, sv in v.items() if _is_number(sv)})
        elif _is_number(v):
            out[f"train/{k}"] = float(v)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Tracker(Protocol):
    def log_epoch(self, epoch: int, values: dict[str, float]) -> None: ...

    def close(self, error: BaseException | None) -> None: ...


class TensorBoardTracker:
    """A ``SummaryWriter`` on ``<run>/tb``; a resumed run purges the events of epochs it trains again."""

    def __init__(self, run_dir: Path, epochs_done: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # tensorboard: an extra, loaded when asked for

        self.dir = run_dir / TB_DIR
        resumed = self.dir.is_dir()
        # a resumed run writes a new event file; TensorBoard forgets every step >= purge_step of the older ones
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=epochs_done + 1 if resumed else None)

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, global_step=epoch)
        self.writer.flush()  # an open TensorBoard shows the epoch now, not after the writer's 2-minute flush

    def close(self, error: BaseException | None) -> None:
        self.writer.close()


def _mlflow_key(tag: str) -> str:
    """``tag`` in the characters MLflow accepts in a metric name (``eval/pgd20@8/255`` -> ``eval/pgd20_at_8/255``)."""
    return re.sub(r"[^/\w.\- ]", "_", tag.replace("@", "_at_"))


class MlflowTracker:
    """One MLflow run per run dir, through ``MlflowClient`` (no global active run)."""

    def __init__(self, run_dir: Path, recipe: RecipeBase) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"file:{(run_dir / MLFLOW_DIR).resolve()}"
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store behind an opt-in; a run dir's own store is the one that needs no server
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient  # mlflow: an extra, loaded when asked for
        from mlflow.exceptions import MlflowException

        self.client = MlflowClient(tracking_uri=uri)
        self.record = run_dir / MLFLOW_RECORD
        self.logged_upto = 0
        try:
            previous = self._previous_run(uri)
            if previous is not None:
                self.run_id = previous
                self.client.update_run(self.run_id, status="RUNNING")
                history = self.client.get_metric_history(self.run_id, "train/loss")
                self.logged_upto = max((m.step for m in history), default=0)
            else:
                self.run_id = self._new_run(run_dir, recipe)
        except MlflowException as e:
            raise UsageError(f"train.loggers: mlflow at {uri}: {str(e).splitlines()[0][:200]}") from None
        atomic_write_json(self.record, {"tracking_uri": uri, "run_id": self.run_id})
        log.info("mlflow: run %s at %s", self.run_id, uri)

    def _previous_run(self, uri: str) -> str | None:
        try:
            rec = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(rec, dict) or rec.get("tracking_uri") != uri or not isinstance(rec.get("run_id"), str):
            return None  # another tracking server now: this run starts there anew
        return rec["run_id"]

    def _new_run(self, run_dir: Path, recipe: RecipeBase) -> str:
        from mlflow.entities import Param, RunTag

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        run = self.client.create_run(exp_id, run_name=run_dir.name, tags={
            "ciard.recipe_hash": recipe.hash, "ciard.run_dir": str(run_dir.resolve()), "ciard.kind": recipe.kind,
            "ciard.method": recipe.method.name, "ciard.arch": recipe.model_spec.arch})
        params = [Param(k, str(v)[:6000]) for k, v in sorted(flatten(recipe.to_dict()).items())]
        for i in range(0, len(params), 100):  # MLflow takes 100 params a batch
            self.client.log_batch(run.info.run_id, params=params[i:i + 100], tags=[] if i else
                                  [RunTag("ciard.source", str(recipe.source or ""))])
        return run.info.run_id

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        if epoch <= self.logged_upto:
            return  # logged before this run was resumed
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(tag), v, now, epoch) for tag, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, error: BaseException | None) -> None:
        status = "FINISHED" if error is None else "KILLED" if isinstance(error, (TrainingInterrupted,
                                                                                  KeyboardInterrupt)) else "FAILED"
        self.client.set_terminated(self.run_id, status=status)


class Trackers:
    """The trackers of one run, logged to and closed together; empty (no-op) off rank 0 or without loggers."""

    def __init__(self, trackers: list[Tracker] | None = None) -> None:
        self.trackers = trackers or []

    @classmethod
    def open(cls, names: list[str], run_dir: Path, recipe: RecipeBase, epochs_done: int) -> "Trackers":
        """The trackers ``names`` for ``run_dir``, whose saved state holds ``epochs_done`` epochs (a fresh
        run dir holds no tracker files; a resumed one reopens them)."""
        check_installed(names)
        opened = cls()
        try:
            for name in names:
                if name == "tensorboard":
                    opened.trackers.append(TensorBoardTracker(run_dir, epochs_done))
                elif name == "mlflow":
                    opened.trackers.append(MlflowTracker(run_dir, recipe))
                else:  # pragma: no cover - recipe validation names only LOGGER_NAMES
                    raise UsageError(f"train.loggers: unknown logger {name!r} (valid: {', '.join(LOGGER_NAMES)})")
        except BaseException as e:
            opened.close(e)
            raise
        return opened

    def log_line(self, line: dict[str, Any]) -> None:
        """Sends one metrics.jsonl line to every tracker."""
        if not self.trackers:
            return
        epoch, values = int(line["epoch"]), scalars(line)
        for t in self.trackers:
            t.log_epoch(epoch, values)

    def close(self, error: BaseException | None = None) -> None:
        """Closes every tracker (once); a tracker failing to close is logged, never raised over ``error``."""
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            try:
                t.close(error)
            except Exception as e:  # noqa: BLE001 - a tracker's own failure must not hide the run's outcome
                log.warning("closing %s failed: %s", type(t).__name__, e)


__all__ = ["DEFAULT_EXPERIMENT", "MLFLOW_DIR", "MLFLOW_RECORD", "MlflowTracker", "REQUIREMENTS", "TB_DIR",
           "TensorBoardTracker", "Tracker", "Trackers", "check_installed", "scalars"]
