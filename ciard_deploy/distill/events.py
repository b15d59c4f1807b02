"""What a training run tells its caller, and how the caller steers it: :class:`TrainEvent` for the
callbacks, :class:`RunControl` to ask for a stop, :class:`TrainingInterrupted` when a run stopped early.

Torch-free: the CLI, ``workflow`` and the teacher cache use these without loading the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from ciard_deploy.errors import CiardError

EventKind = Literal["run_start", "teacher", "teacher_reused", "epoch_start", "step", "epoch_end", "eval",
                    "final_eval", "run_end"]


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


def emit(callbacks: Sequence[Callback], event: TrainEvent) -> None:
    """Hands ``event`` to every callback, in order."""
    for cb in callbacks:
        cb(event)


__all__ = ["Callback", "EventKind", "RunControl", "TrainEvent", "TrainingInterrupted", "emit"]
