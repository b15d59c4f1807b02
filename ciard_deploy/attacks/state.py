"""A resumable evaluation: the state file behind ``ciard eval --state`` (AutoAttack-style flags on disk).

An ``EvaluationState`` says what is evaluated (an ``EvaluationKey``: model sha256, dataset,
split, the samples' hashes, seed, eps), holds the clean flags, and one ``AttackRecord`` per
attack with its settings, per-sample robust flags and seconds. ``attacks.evaluate.evaluate``
fills it in and saves it (atomically) after the clean pass, after every finished attack and,
inside a long attack, every ``save_every`` seconds and on Ctrl-C; a later call with a matching
key reuses the finished attacks, continues a partial one and runs only the new ones.

The file is JSON; per-sample flags are strings of ``0``/``1``, one character per sample in
evaluation order, so a 10 000-sample evaluation stays a few kB per attack::

    {"kind": "ciard.eval_state", "schema_version": 1,
     "key": {"model_sha256": "...", "arch": "tiny_cnn", "dataset": "digits", "split": "test",
             "n": 360, "seed": 0, "eps": 0.15, "indices_sha256": "...", "data_sha256": "..."},
     "info": {"model_source": "...", "created": "...", "updated": "...", "versions": {...}},
     "clean_correct": "1101...",
     "attacks": [{"label": "pgd20@0.15", "name": "pgd20", "eps": 0.15, "settings": {...},
                  "total": 352, "done": 352, "seconds": 3.2, "per_sample": "0100...",
                  "device": "cpu", "batch_size": 256}]}

numpy only (no torch), like ``results``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np

from ciard_deploy.attacks.results import AttackResult, EvalResult
from ciard_deploy.errors import ArtifactError, UsageError

STATE_KIND = "ciard.eval_state"
STATE_SCHEMA_VERSION = 1

#: Default seconds between saves of a running attack's finished batches (0: after every batch).
SAVE_EVERY_S = 10.0


# --------------------------------------------------------------------------- helpers

def hash_array(*arrays: Any) -> str:
    """sha256 over the dtype, shape and bytes of each array (C order): equal data, equal hash."""
    h = hashlib.sha256()
    for a in arrays:
        arr = np.ascontiguousarray(np.asarray(a))
        h.update(f"{arr.dtype.str}{arr.shape};".encode())
        h.update(arr.reshape(-1).view(np.uint8) if arr.size else b"")  # no copy of large image arrays
    return h.hexdigest()


def flags_to_str(flags: np.ndarray) -> str:
    """``[True, False, True] -> "101"``."""
    bits = np.asarray(flags, dtype=bool).reshape(-1)
    return np.where(bits, ord("1"), ord("0")).astype(np.uint8).tobytes().decode("ascii")


def flags_from_str(text: str, n: int, what: str) -> np.ndarray:
    """Inverse of ``flags_to_str``; raises ValueError unless ``text`` is ``n`` characters of 0/1."""
    if not isinstance(text, str) or len(text) != n or set(text) - {"0", "1"}:
        raise ValueError(f"{what} must be a string of {n} characters 0/1")
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8) == ord("1")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _plain(obj: Any) -> Any:
    """A JSON round trip, so settings compare the way they will after being saved (tuples -> lists, ...)."""
    return json.loads(json.dumps(obj, default=str))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _short(v: Any) -> str:
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12] + "..."  # a sha256
    return json.dumps(v) if isinstance(v, str) else repr(v)


def settings_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``["options.seed 0 (file) vs None (now)", ...]`` for two ``Attack.describe()`` dicts."""
    a, b = _flatten(_plain(saved)), _flatten(_plain(now))
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            out.append(f"{k} {_short(a.get(k, '<absent>'))} (file) vs {_short(b.get(k, '<absent>'))} (now)")
    return out


# --------------------------------------------------------------------------- what is evaluated

@dataclass(frozen=True)
class EvaluationKey:
    """What is evaluated. Two evaluations may share results only if their keys are equal.

    Attributes:
        model_sha256: sha256 of the weights file.
        arch: the architecture the weights were loaded into.
        dataset: dataset name, e.g. ``"cifar10"``.
        split: ``"test"`` (or ``"train"``).
        n: number of samples evaluated.
        seed: the seed of the stratified subset.
        eps: the L-inf radius every attack of this evaluation uses.
        indices_sha256: ``hash_array`` of the samples' positions in the split (``None``: the whole split in order).
        data_sha256: ``hash_array(images, labels)`` of exactly what the model sees (float32 NCHW, int64).
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

    @classmethod
    def create(cls, x: Any, y: Any, *, model_sha256: str, arch: str, dataset: str, split: str, seed: int,
               eps: float, indices: Any = None) -> "EvaluationKey":
        """The key of evaluating images ``x`` and labels ``y`` (numpy arrays, or torch tensors on the CPU)."""
        return cls(model_sha256=str(model_sha256), arch=str(arch), dataset=str(dataset), split=str(split),
                   n=int(len(y)), seed=int(seed), eps=float(eps),
                   indices_sha256=None if indices is None else hash_array(np.asarray(indices, dtype=np.int64)),
                   data_sha256=data_hash(x, y))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EvaluationKey":
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise ValueError(f"key lacks {', '.join(missing)}")
        return cls(model_sha256=str(d["model_sha256"]), arch=str(d["arch"]), dataset=str(d["dataset"]),
                   split=str(d["split"]), n=int(d["n"]), seed=int(d["seed"]), eps=float(d["eps"]),
                   indices_sha256=None if d["indices_sha256"] is None else str(d["indices_sha256"]),
                   data_sha256=str(d["data_sha256"]))

    def differences(self, now: "EvaluationKey") -> list[str]:
        """``["eps 0.1 (file) vs 0.2 (now)", ...]``: every field in which ``now`` differs from this key."""
        names = {"model_sha256": "model sha256", "indices_sha256": "sample indices",
                 "data_sha256": "images/labels"}
        return [f"{names.get(f.name, f.name)} {_short(getattr(self, f.name))} (file) vs "
                f"{_short(getattr(now, f.name))} (now)"
                for f in fields(self) if getattr(self, f.name) != getattr(now, f.name)]


def data_hash(x: Any, y: Any) -> str:
    """``hash_array`` of float32 images and int64 labels (torch tensors are read through numpy)."""
    def arr(a: Any, dtype: Any) -> np.ndarray:
        a = a.detach().cpu().numpy() if hasattr(a, "detach") else a
        return np.asarray(a, dtype=dtype)

    return hash_array(arr(x, np.float32), arr(y, np.int64))


# --------------------------------------------------------------------------- records

@dataclass
class AttackRecord:
    """One attack of the evaluation, finished or partway.

    Attributes:
        label: name and budget, ``"pgd20@8/255"`` (unique within a state).
        name: ``"pgd20"``.
        eps: L-inf radius.
        settings: ``Attack.describe()``: a reused record must have been made with equal settings.
        total: samples to attack (those correct on clean).
        done: how many of them, in order, are attacked; finished when ``done == total``.
        seconds: attack wall time so far, over every call that worked on it.
        per_sample: robust flag per sample (all ``n``); only the first ``done`` attacked samples are final.
        device: where it last ran (information only).
        batch_size: images per attack call when it last ran (information only).
    """

    label: str
    name: str
    eps: float
    settings: dict[str, Any]
    total: int
    done: int
    seconds: float
    per_sample: np.ndarray = field(repr=False)
    device: str = ""
    batch_size: int = 0

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def to_result(self, origin: str) -> AttackResult:
        n = len(self.per_sample)
        return AttackResult(self.name, self.label, self.eps, float(self.per_sample.sum()) / n if n else 0.0,
                            self.seconds, self.per_sample.copy(), origin=origin)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "name": self.name, "eps": self.eps, "settings": _plain(self.settings),
                "total": self.total, "done": self.done, "seconds": round(float(self.seconds), 4),
                "per_sample": flags_to_str(self.per_sample), "device": self.device, "batch_size": self.batch_size}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], n: int) -> "AttackRecord":
        label = str(d["label"])
        rec = cls(label=label, name=str(d["name"]), eps=float(d["eps"]), settings=dict(d.get("settings") or {}),
                  total=int(d["total"]), done=int(d["done"]), seconds=float(d.get("seconds", 0.0)),
                  per_sample=flags_from_str(d["per_sample"], n, f"per_sample of {label}"),
                  device=str(d.get("device", "")), batch_size=int(d.get("batch_size", 0)))
        if not 0 <= rec.done <= rec.total or rec.seconds < 0:
            raise ValueError(f"{label}: done {rec.done} of total {rec.total} is out of range")
        return rec


# --------------------------------------------------------------------------- the state

class StateMismatch(ArtifactError):
    """A state file holds a different evaluation than the one asked for; names every difference."""

    def __init__(self, path: Path | str | None, differences: Sequence[str],
                 hint: str = "discard it (fresh=True) or use another state file") -> None:
        self.path = path
        self.differences = list(differences)
        self.hint = hint
        super().__init__()

    def __str__(self) -> str:
        where = f"state file {self.path}" if self.path is not None else "the evaluation state"
        return f"{where} holds a different evaluation: {'; '.join(self.differences)}; {self.hint}"


StateEventKind = Literal["reused", "resumed"]


@dataclass(frozen=True)
class StateEvent:
    """What ``evaluate`` took from a state instead of computing it; the CLI prints one line per event.

    Attributes:
        kind: ``"reused"`` (finished earlier, not re-run) or ``"resumed"`` (continued where it stopped).
        stage: ``"clean"`` or an attack label.
        done: samples already done (for ``clean``: all ``n``).
        total: samples in the stage.
        seconds: time recorded for the work taken over (0 for ``clean``).
        path: the state file, if the state has one.
    """

    kind: StateEventKind
    stage: str
    done: int
    total: int
    seconds: float
    path: Path | None


@dataclass
class EvaluationState:
    """Resumable state of one evaluation: its key, clean flags and a record per attack.

    Attributes:
        key: what is evaluated.
        clean_correct: bool per sample, once the clean pass ran.
        attacks: one record per attack, in the order they were first run; attacks not asked for in a
            later call stay in the file.
        info: model source, timestamps, versions; shown, never compared.
        path: where ``save()`` writes (not stored in the file); ``None`` keeps the state in memory.
    """

    key: EvaluationKey
    clean_correct: np.ndarray | None = field(default=None, repr=False)
    attacks: list[AttackRecord] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)

    # ---- records
    def record(self, label: str) -> AttackRecord | None:
        """The record of attack ``label``, or ``None``."""
        return next((r for r in self.attacks if r.label == label), None)

    def put(self, rec: AttackRecord) -> None:
        """Adds ``rec``, replacing a record with the same label in place."""
        for i, r in enumerate(self.attacks):
            if r.label == rec.label:
                self.attacks[i] = rec
                return
        self.attacks.append(rec)

    def differences(self, key: EvaluationKey, attacks: Iterable[Any] = ()) -> list[str]:
        """Why this state cannot serve an evaluation of ``key`` with ``attacks`` (``Attack`` objects); empty if it can.

        Attacks the state lacks or holds but are not asked for are fine (they are run, or kept);
        one it holds under the same label must have been made with equal settings.
        """
        out = self.key.differences(key)
        for attack in attacks:
            rec = self.record(attack.label)
            if rec is not None:
                out += [f"{attack.label} {d}" for d in settings_differences(rec.settings, attack.describe())]
        return out

    def check(self, key: EvaluationKey, attacks: Iterable[Any] = ()) -> None:
        """Raises ``StateMismatch`` naming every difference ``differences`` finds."""
        diffs = self.differences(key, attacks)
        if diffs:
            raise StateMismatch(self.path, diffs)

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

    # ---- JSON
    def to_dict(self) -> dict[str, Any]:
        return {"kind": STATE_KIND, "schema_version": STATE_SCHEMA_VERSION, "key": self.key.to_dict(),
                "info": _plain(self.info),
                "clean_correct": None if self.clean_correct is None else flags_to_str(self.clean_correct),
                "attacks": [r.to_dict() for r in self.attacks]}

    @classmethod
    def from_dict(cls, d: Any, path: Path | str | None = None) -> "EvaluationState":
        """Validates and loads; raises ValueError naming the first problem."""
        if not isinstance(d, dict) or d.get("kind") != STATE_KIND:
            kind = d.get("kind") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"kind {kind!r}, expected {STATE_KIND!r}")
        version = int(d.get("schema_version", 0))
        if version > STATE_SCHEMA_VERSION:
            raise ValueError(f"evaluation state schema {version} is newer than this ciard-deploy reads "
                             f"({STATE_SCHEMA_VERSION}); upgrade ciard-deploy")
        key = EvaluationKey.from_dict(d.get("key") or {})
        clean = d.get("clean_correct")
        clean_flags = None if clean is None else flags_from_str(clean, key.n, "clean_correct")
        attacks = [AttackRecord.from_dict(a, key.n) for a in d.get("attacks") or []]
        labels = [a.label for a in attacks]
        if len(set(labels)) != len(labels):
            raise ValueError("an attack is recorded twice")
        if attacks and clean_flags is None:
            raise ValueError("attack records without a clean pass")
        for a in attacks:
            if a.total != int(clean_flags.sum()):  # type: ignore[union-attr]
                raise ValueError(f"{a.label}: total {a.total} is not the {int(clean_flags.sum())} clean-correct "
                                 "samples")
            if np.any(a.per_sample & ~clean_flags):
                raise ValueError(f"{a.label}: robust flags on samples that are wrong on clean")
        return cls(key=key, clean_correct=clean_flags, attacks=attacks, info=dict(d.get("info") or {}),
                   path=None if path is None else Path(path))

    def save(self, path: Path | str | None = None) -> Path:
        """Writes the state atomically (temp file + rename) to ``path`` or ``self.path``; returns the path."""
        from ciard_deploy.io import atomic_write_json

        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("no path to save the evaluation state to")
        self.info.setdefault("created", _now())
        self.info["updated"] = _now()
        atomic_write_json(target, self.to_dict())
        return target

    @classmethod
    def load(cls, path: Path | str) -> "EvaluationState":
        """Reads a state file; ArtifactError if it is unreadable or not a valid ciard evaluation state."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            return cls.from_dict(d, path)
        except FileNotFoundError:
            raise ArtifactError(f"state file {path} not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{path} is not a valid ciard evaluation state: {exc}; it was left as it is: "
                                "move it away or choose another state file") from None


def open_state(path: Path | str, key: EvaluationKey, attacks: Iterable[Any] = (), fresh: bool = False,
               info: Mapping[str, Any] | None = None,
               mismatch_hint: str | None = None) -> tuple[EvaluationState, bool]:
    """The state to evaluate ``key`` with ``attacks`` in, kept at ``path``; returns ``(state, existed)``.

    A missing file gives a new, empty state (written on its first ``save``). An existing one must
    be a valid ciard evaluation state (else ``ArtifactError``, even with ``fresh``: a file of
    another kind is never overwritten) and, unless ``fresh``, hold the same evaluation (else
    ``StateMismatch`` naming every difference). ``fresh`` starts over from an empty state; the old
    file is replaced on the first save. Nothing is written here.

    Raises:
        UsageError: ``path`` is a directory.
        ArtifactError: unreadable or not a ciard evaluation state.
        StateMismatch: a different evaluation (an ``ArtifactError``).
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"state file {path} is a directory")
    meta = {**dict(info or {})}
    if not path.exists():
        return EvaluationState(key=key, info=meta, path=path), False
    state = EvaluationState.load(path)
    if fresh:
        return EvaluationState(key=key, info=meta, path=path), True
    diffs = state.differences(key, attacks)
    if diffs:
        raise StateMismatch(path, diffs, **({"hint": mismatch_hint} if mismatch_hint else {}))
    state.info.update({k: v for k, v in meta.items() if k != "created"})
    return state, True


__all__ = [
    "AttackRecord", "EvaluationKey", "EvaluationState", "SAVE_EVERY_S", "StateEvent", "StateMismatch",
    "data_hash", "flags_from_str", "flags_to_str", "hash_array", "open_state", "settings_differences",
]
