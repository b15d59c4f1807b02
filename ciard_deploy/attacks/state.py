"""Resumable evaluation states: the state files behind ``ciard eval --state`` and ``ciard verify --state``.

A state file says what is evaluated (a key: model sha256, data, seeds, eps, ...), holds the
clean flags, and one ``AttackRecord`` per attack with its settings, per-sample robust flags,
seconds and how far it got. The evaluation fills it in and saves it (atomically) as it goes;
a later call with an equal key reuses the finished attacks, continues a partial one and runs
only what is missing. A file of another kind is never overwritten; a different evaluation is
refused, naming every difference.

``ResumableState`` and ``StateKey`` are that machinery; two kinds of file build on them:

- ``EvaluationState`` (``kind: ciard.eval_state``, key ``EvaluationKey``): ``ciard eval`` of a
  PyTorch checkpoint, filled in by ``attacks.cascade.evaluate``;
- ``verify.state.VerifyState`` (``kind: ciard.verify_state``): ``ciard verify`` on a runtime,
  filled in by ``verify.evaluate.evaluate_runtime``.

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

numpy only (no torch), like ``results``: ``ciard verify`` resumes on a device without torch.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping, Sequence, TypeVar

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


def _is_sha256(v: str) -> bool:
    return len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _short(v: Any) -> str:
    if isinstance(v, str) and _is_sha256(v):
        return v[:12] + "..."  # a sha256
    if isinstance(v, str) and v.startswith("sha256:") and _is_sha256(v[7:]):
        return v[:19] + "..."  # a "sha256:<hex>" checksum
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

#: field annotation -> how a value read from JSON is converted (``X | None`` also accepts null)
_FIELD_TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}


def _convert(annotation: Any, value: Any) -> Any:
    parts = [p.strip() for p in str(annotation).split("|")]
    optional = "None" in parts
    (base,) = [p for p in parts if p != "None"]
    if optional and value is None:
        return None
    return _FIELD_TYPES[base](value)


@dataclass(frozen=True)
class StateKey:
    """Base of a state's key: what is evaluated. Two evaluations may share results only if their keys are equal.

    A subclass is a frozen dataclass of ``str``/``int``/``float``/``bool`` fields (each may be
    ``X | None``), one of them ``n`` (the number of per-sample flags); ``FIELD_NAMES`` gives
    the words a field goes by in messages (default: its name).
    """

    FIELD_NAMES: ClassVar[Mapping[str, str]] = {}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls: type[_K], d: Mapping[str, Any]) -> _K:
        """Reads the JSON form; raises ValueError naming missing fields (TypeError/ValueError for bad values)."""
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise ValueError(f"key lacks {', '.join(missing)}")
        return cls(**{f.name: _convert(f.type, d[f.name]) for f in fields(cls)})

    def differences(self, now: "StateKey") -> list[str]:
        """``["eps 0.1 (file) vs 0.2 (now)", ...]``: every field in which ``now`` differs from this key."""
        return [f"{self.FIELD_NAMES.get(f.name, f.name)} {_short(getattr(self, f.name))} (file) vs "
                f"{_short(getattr(now, f.name))} (now)"
                for f in fields(self) if getattr(self, f.name) != getattr(now, f.name)]


_K = TypeVar("_K", bound=StateKey)


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

    FIELD_NAMES: ClassVar[Mapping[str, str]] = {"model_sha256": "model sha256", "indices_sha256": "sample indices",
                                                "data_sha256": "images/labels"}

    @classmethod
    def create(cls: type[_E], x: Any, y: Any, *, model_sha256: str, arch: str, dataset: str, split: str, seed: int,
               eps: float, indices: Any = None, **extra: Any) -> _E:
        """The key of evaluating images ``x`` and labels ``y`` (numpy arrays, or torch tensors on the CPU);
        ``extra``: the fields a subclass adds (``verify.pack_partial.PackKey``: batch size, device, torch version)."""
        return cls(model_sha256=str(model_sha256), arch=str(arch), dataset=str(dataset), split=str(split),
                   n=int(len(y)), seed=int(seed), eps=float(eps),
                   indices_sha256=None if indices is None else hash_array(np.asarray(indices, dtype=np.int64)),
                   data_sha256=data_hash(x, y), **extra)


_E = TypeVar("_E", bound=EvaluationKey)


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
        total: samples to attack (those correct on clean; for verify's Square, those of its subset).
        done: how many of them, in order, are attacked; finished when ``done == total``.
        seconds: attack wall time so far, over every call that worked on it.
        per_sample: robust flag per sample (all ``n``); only the first ``done`` attacked samples are final.
        device: where it last ran (information only).
        batch_size: images per attack call when it last ran (information only).
        queries: forward passes the model served for the ``done`` samples, where counted (verify's
            Square); ``None``: not counted (and not written).
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
    queries: int | None = None

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def to_result(self, origin: str) -> AttackResult:
        n = len(self.per_sample)
        return AttackResult(self.name, self.label, self.eps, float(self.per_sample.sum()) / n if n else 0.0,
                            self.seconds, self.per_sample.copy(), origin=origin)

    def to_dict(self) -> dict[str, Any]:
        d = {"label": self.label, "name": self.name, "eps": self.eps, "settings": _plain(self.settings),
             "total": self.total, "done": self.done, "seconds": round(float(self.seconds), 4),
             "per_sample": flags_to_str(self.per_sample), "device": self.device, "batch_size": self.batch_size}
        if self.queries is not None:
            d["queries"] = int(self.queries)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], n: int) -> "AttackRecord":
        label = str(d["label"])
        rec = cls(label=label, name=str(d["name"]), eps=float(d["eps"]), settings=dict(d.get("settings") or {}),
                  total=int(d["total"]), done=int(d["done"]), seconds=float(d.get("seconds", 0.0)),
                  per_sample=flags_from_str(d["per_sample"], n, f"per_sample of {label}"),
                  device=str(d.get("device", "")), batch_size=int(d.get("batch_size", 0)),
                  queries=None if d.get("queries") is None else int(d["queries"]))
        if not 0 <= rec.done <= rec.total or rec.seconds < 0:
            raise ValueError(f"{label}: done {rec.done} of total {rec.total} is out of range")
        if rec.queries is not None and rec.queries < 0:
            raise ValueError(f"{label}: queries {rec.queries} is negative")
        return rec


# --------------------------------------------------------------------------- the state

class StateMismatch(ArtifactError):
    """A state file holds a different evaluation than the one asked for; names every difference."""

    def __init__(self, path: Path | str | None, differences: Sequence[str],
                 hint: str = "discard it (fresh=True) or use another state file", subject: str = "evaluation") -> None:
        self.path = path
        self.differences = list(differences)
        self.hint = hint
        self.subject = subject
        super().__init__()

    def __str__(self) -> str:
        where = f"state file {self.path}" if self.path is not None else f"the {self.subject} state"
        return f"{where} holds a different {self.subject}: {'; '.join(self.differences)}; {self.hint}"


StateEventKind = Literal["reused", "resumed", "discarded"]


@dataclass(frozen=True)
class StateEvent:
    """What an evaluation took from a state instead of computing it; the CLI prints one line per event.

    Attributes:
        kind: ``"reused"`` (finished earlier, not re-run), ``"resumed"`` (continued where it stopped)
            or ``"discarded"`` (found in the state but unusable, so run again: verify's Square when
            the runtime's clean predictions differ from the state's).
        stage: ``"clean"`` or an attack label.
        done: samples already done (for ``clean``: all ``n``; 0 when discarded).
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


_S = TypeVar("_S", bound="ResumableState")

#: ``announce(kind, stage, done, total, seconds)``: tells of a ``StateEvent`` (see ``state_hooks``)
Announce = Callable[[StateEventKind, str, int, int, float], None]


def state_hooks(state: "ResumableState | None", on_state: Callable[[StateEvent], None] | None,
                log: logging.Logger) -> tuple[Announce, Callable[[], None]]:
    """``(announce, save)`` of an evaluation that may keep a ``state``.

    ``announce(kind, stage, done, total, seconds)`` passes a ``StateEvent`` about the state's file to
    ``on_state`` (nothing without one); ``save()`` writes the state where it has a path (nothing
    otherwise) and says so on ``log`` (debug).
    """
    def announce(kind: StateEventKind, stage: str, done: int, total: int, seconds: float) -> None:
        if on_state is not None:
            on_state(StateEvent(kind, stage, done, total, seconds, state.path if state is not None else None))

    def save() -> None:
        if state is not None and state.path is not None:
            state.save()
            log.debug("saved %s state to %s", state.WHAT, state.path)

    return announce, save


@dataclass
class ResumableState:
    """Base of a resumable state file: a key, clean flags, a record per attack; JSON, atomic saves.

    A subclass names its file ``KIND`` (checked on load: a file of another kind is never taken,
    nor overwritten by ``open``), its key class ``KEY`` and the words of its messages: ``WHAT``
    (``"not a valid ciard <WHAT> state"``) and ``SUBJECT`` (``"holds a different <SUBJECT>"``);
    ``validate`` adds its own consistency rules.

    Attributes:
        key: what is evaluated (a ``KEY``).
        clean_correct: bool per sample, once the clean pass ran.
        attacks: one record per attack, in the order they were first run; attacks not asked for in a
            later call stay in the file.
        info: sources, timestamps, versions; shown, never compared.
        path: where ``save()`` writes (not stored in the file); ``None`` keeps the state in memory.
    """

    key: Any
    clean_correct: np.ndarray | None = field(default=None, repr=False)
    attacks: list[AttackRecord] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)

    KIND: ClassVar[str] = ""
    SCHEMA_VERSION: ClassVar[int] = 1
    KEY: ClassVar[type[StateKey]] = StateKey
    WHAT: ClassVar[str] = "evaluation"
    SUBJECT: ClassVar[str] = "evaluation"

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

    def differences(self, key: StateKey, attacks: Iterable[Any] = ()) -> list[str]:
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

    def check(self, key: StateKey, attacks: Iterable[Any] = ()) -> None:
        """Raises ``StateMismatch`` naming every difference ``differences`` finds."""
        diffs = self.differences(key, attacks)
        if diffs:
            raise StateMismatch(self.path, diffs, subject=self.SUBJECT)

    def validate(self) -> None:
        """Raises ValueError naming the first inconsistency (called on every load)."""
        labels = [a.label for a in self.attacks]
        if len(set(labels)) != len(labels):
            raise ValueError("an attack is recorded twice")
        if self.attacks and self.clean_correct is None:
            raise ValueError("attack records without a clean pass")
        for a in self.attacks:
            if np.any(a.per_sample & ~self.clean_correct):  # type: ignore[operator]
                raise ValueError(f"{a.label}: robust flags on samples that are wrong on clean")

    # ---- JSON
    @classmethod
    def upgrade(cls, d: dict[str, Any], version: int) -> dict[str, Any]:
        """The JSON of an older schema ``version`` in this schema's form (raise ValueError if it cannot be read).

        The base reads older files as they are; a subclass whose schema changed overrides it.
        """
        return d

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "schema_version": self.SCHEMA_VERSION, "key": self.key.to_dict(),
                "info": _plain(self.info),
                "clean_correct": None if self.clean_correct is None else flags_to_str(self.clean_correct),
                "attacks": [r.to_dict() for r in self.attacks]}

    @classmethod
    def from_dict(cls: type[_S], d: Any, path: Path | str | None = None) -> _S:
        """Validates and loads; raises ValueError naming the first problem."""
        if not isinstance(d, dict) or d.get("kind") != cls.KIND:
            kind = d.get("kind") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"kind {kind!r}, expected {cls.KIND!r}")
        version = int(d.get("schema_version", 0))
        if version > cls.SCHEMA_VERSION:
            raise ValueError(f"{cls.WHAT} state schema {version} is newer than this ciard-deploy reads "
                             f"({cls.SCHEMA_VERSION}); upgrade ciard-deploy")
        if version < cls.SCHEMA_VERSION:
            d = cls.upgrade(dict(d), version)
        key = cls.KEY.from_dict(d.get("key") or {})
        n = int(key.n)  # type: ignore[attr-defined]
        clean = d.get("clean_correct")
        state = cls(key=key, clean_correct=None if clean is None else flags_from_str(clean, n, "clean_correct"),
                    attacks=[AttackRecord.from_dict(a, n) for a in d.get("attacks") or []],
                    info=dict(d.get("info") or {}), path=None if path is None else Path(path))
        state.validate()
        return state

    def save(self, path: Path | str | None = None) -> Path:
        """Writes the state atomically (temp file + rename) to ``path`` or ``self.path``; returns the path."""
        from ciard_deploy.io import atomic_write_json

        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError(f"no path to save the {self.WHAT} state to")
        self.info.setdefault("created", _now())
        self.info["updated"] = _now()
        atomic_write_json(target, self.to_dict())
        return target

    @classmethod
    def load(cls: type[_S], path: Path | str) -> _S:
        """Reads a state file; ArtifactError if it is unreadable or not a valid state of this kind."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            return cls.from_dict(d, path)
        except FileNotFoundError:
            raise ArtifactError(f"state file {path} not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{path} is not a valid ciard {cls.WHAT} state: {exc}; it was left as it is: "
                                "move it away or choose another state file") from None

    @classmethod
    def check_file(cls: type[_S], path: Path | str) -> _S | None:
        """The state at ``path`` (``None`` if there is no file yet), for refusing bad files before any work.

        Raises:
            UsageError: ``path`` is a directory.
            ArtifactError: unreadable or not a valid state of this kind.
        """
        path = Path(path)
        if path.is_dir():
            raise UsageError(f"state file {path} is a directory")
        return cls.load(path) if path.exists() else None

    @classmethod
    def open(cls: type[_S], path: Path | str, key: StateKey, attacks: Iterable[Any] = (), fresh: bool = False,
             info: Mapping[str, Any] | None = None, mismatch_hint: str | None = None) -> tuple[_S, bool]:
        """The state to evaluate ``key`` with ``attacks`` in, kept at ``path``; returns ``(state, existed)``.

        A missing file gives a new, empty state (written on its first ``save``). An existing one must
        be a valid state of this kind (else ``ArtifactError``, even with ``fresh``: a file of
        another kind is never overwritten) and, unless ``fresh``, hold the same evaluation (else
        ``StateMismatch`` naming every difference). ``fresh`` starts over from an empty state; the old
        file is replaced on the first save. Nothing is written here.

        Raises:
            UsageError: ``path`` is a directory.
            ArtifactError: unreadable or not a state of this kind.
            StateMismatch: a different evaluation (an ``ArtifactError``).
        """
        path = Path(path)
        meta = {**dict(info or {})}
        state = cls.check_file(path)
        if state is None or fresh:
            return cls(key=key, info=meta, path=path), state is not None
        diffs = state.differences(key, attacks)
        if diffs:
            raise StateMismatch(path, diffs, subject=cls.SUBJECT, **({"hint": mismatch_hint} if mismatch_hint else {}))
        state.info.update({k: v for k, v in meta.items() if k != "created"})
        return state, True


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


__all__ = [
    "AttackRecord", "EvaluationKey", "EvaluationState", "ResumableState", "SAVE_EVERY_S", "StateEvent", "StateKey",
    "StateMismatch", "data_hash", "flags_from_str", "flags_to_str", "hash_array", "open_state",
    "settings_differences", "state_hooks",
]
