"""The state of a resumable ``ciard eval``: what is evaluated (``EvaluationKey``: a model's weights on
a data sample, also the base of a pack build's ``PackKey``) and ``EvaluationState``, filled in by the
attack cascade (``attacks.cascade.run_cascade``).

numpy only (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Sequence, TypeVar

import numpy as np

from ciard_deploy.attacks.results import EvalResult
from ciard_deploy.fingerprint import array_hash, data_hash
from ciard_deploy.resume.state_file import ResumableState, StateKey

STATE_KIND = "ciard.eval_state"
STATE_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class EvaluationKey(StateKey):
    """What ``ciard eval`` evaluates.

    Attributes:
        model_sha256: sha256 of the weights file.
        arch: the architecture the weights were loaded into.
        dataset: dataset name, e.g. ``"cifar10"``.
        split: ``"test"`` (or ``"train"``).
        n: number of samples evaluated.
        seed: the seed of the stratified subset.
        eps: the L-inf radius every attack of this evaluation uses.
        indices_sha256: ``fingerprint.array_hash`` of the samples' positions in the split (``None``: the whole split in order).
        data_sha256: ``array_hash(images, labels)`` of exactly what the model sees (float32 NCHW, int64).
    """

    model_sha256: str
    arch: str
    dataset: str
    split: str
    n: int
    seed: int
    eps: float
    indices_sha256: str | None
    data_sha256: str

    FIELD_NAMES: ClassVar[Mapping[str, str]] = {"model_sha256": "model sha256", "indices_sha256": "sample indices",
                                                "data_sha256": "images/labels"}

    @classmethod
    def create(cls: type[_E], x: Any, y: Any, *, model_sha256: str, arch: str, dataset: str, split: str, seed: int,
               eps: float, indices: Any = None, **extra: Any) -> _E:
        """The key of evaluating images ``x`` and labels ``y`` (numpy arrays, or torch tensors on the CPU);
        ``extra``: the fields a subclass adds (``verify.pack_partial.PackKey``: batch size, device, torch version)."""
        return cls(model_sha256=str(model_sha256), arch=str(arch), dataset=str(dataset), split=str(split),
                   n=int(len(y)), seed=int(seed), eps=float(eps),
                   indices_sha256=None if indices is None else array_hash(np.asarray(indices, dtype=np.int64)),
                   data_sha256=data_hash(x, y), **extra)


_E = TypeVar("_E", bound=EvaluationKey)


@dataclass
class EvaluationState(ResumableState):
    """Resumable state of one ``ciard eval`` evaluation: its ``EvaluationKey``, clean flags and a record per attack.

    Every attack is run on all clean-correct samples, so a record's ``total`` is their number.
    """

    key: EvaluationKey

    KIND: ClassVar[str] = STATE_KIND
    SCHEMA_VERSION: ClassVar[int] = STATE_SCHEMA_VERSION
    KEY: ClassVar[type[StateKey]] = EvaluationKey
    WHAT: ClassVar[str] = "evaluation"
    SUBJECT: ClassVar[str] = "evaluation"

    def validate(self) -> None:
        super().validate()
        clean = 0 if self.clean_correct is None else int(self.clean_correct.sum())
        for a in self.attacks:
            if a.total != clean:
                raise ValueError(f"{a.label}: total {a.total} is not the {clean} clean-correct samples")

    def result(self, labels: Sequence[str], origins: Mapping[str, str] | None = None) -> EvalResult:
        """The ``EvalResult`` of the finished attacks ``labels`` (in that order), rebuilt from the state alone."""
        if self.clean_correct is None:
            raise ValueError("the state has no clean pass yet")
        n = self.key.n
        recs = []
        for lab in labels:
            rec = self.record(lab)
            if rec is None or not rec.finished:
                raise ValueError(f"attack {lab} is not finished in this state")
            recs.append(rec.to_result((origins or {}).get(lab, "reused")))
        worst = self.clean_correct.copy()
        for r in recs:
            worst &= r.per_sample
        return EvalResult(n=n, clean_acc=float(self.clean_correct.sum()) / n, attacks=recs,
                          worst_case_acc=float(worst.sum()) / n, clean_correct=self.clean_correct.copy())


def open_state(path: Path | str, key: EvaluationKey, attacks: Iterable[Any] = (), fresh: bool = False,
               info: Mapping[str, Any] | None = None,
               mismatch_hint: str | None = None) -> tuple[EvaluationState, bool]:
    """``EvaluationState.open``: the evaluation state of ``key`` and ``attacks`` at ``path``; ``(state, existed)``.

    See ``ResumableState.open`` (a missing file gives an empty state; another kind of file is never
    overwritten; a different evaluation raises ``StateMismatch`` unless ``fresh``).
    """
    return EvaluationState.open(path, key, attacks, fresh=fresh, info=info, mismatch_hint=mismatch_hint)


__all__ = ["EvaluationKey", "EvaluationState", "STATE_KIND", "STATE_SCHEMA_VERSION", "open_state"]
