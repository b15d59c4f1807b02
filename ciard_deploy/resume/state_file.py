"""The resumable state file: a key (what is evaluated), clean flags and a record per attack; JSON,
atomic saves, refusals that name every difference. ``EvaluationState`` (``resume.evaluation``),
``verify.state.VerifyState`` and ``verify.pack_partial.PackPartial`` are its kinds.

numpy only (no torch).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence, TypeVar

import numpy as np

from ciard_deploy.errors import ArtifactError, UsageError
from ciard_deploy.io import atomic_write_json
from ciard_deploy.resume.records import (Announce, AttackRecord, StateEvent, StateEventKind, flags_from_str,
                                         flags_to_str, plain, settings_differences, short)

#: Default seconds between saves of a running attack's finished batches (0: after every batch).
SAVE_EVERY_S = 10.0

#: What a mismatching ``--state`` file's error ends with (the way out ``ciard eval`` and ``ciard verify`` offer).
FRESH_HINT = "the file was left as it is: pass --fresh to discard it, or give another --state file"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_state_json(path: Path | str) -> Any:
    """The JSON a state file holds: the one reader of state files (raises OSError, UnicodeDecodeError, JSONDecodeError)."""
    return json.loads(Path(path).read_text())


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
        return [f"{self.FIELD_NAMES.get(f.name, f.name)} {short(getattr(self, f.name))} (file) vs "
                f"{short(getattr(now, f.name))} (now)"
                for f in fields(self) if getattr(self, f.name) != getattr(now, f.name)]


_K = TypeVar("_K", bound=StateKey)


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


_S = TypeVar("_S", bound="ResumableState")


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
                "info": plain(self.info),
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
            return cls.from_dict(read_state_json(path), path)
        except FileNotFoundError:
            raise ArtifactError(f"state file {path} not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{path} is not a valid ciard {cls.WHAT} state: {exc}; it was left as it is: "
                                "move it away or choose another state file") from None

    @classmethod
    def peek(cls: type[_S], path: Path | str) -> _S | None:
        """The state at ``path``, or ``None`` where there is no file or it is not a valid state of this kind
        (for messages and clean-ups, which never fail on a bad file)."""
        if not Path(path).is_file():
            return None
        try:
            return cls.load(path)
        except ArtifactError:
            return None

    @classmethod
    def holds_other_kind(cls, path: Path | str) -> bool:
        """Whether ``path`` holds readable JSON that is not a state of this kind: a file never to overwrite.

        An unreadable or unparseable file is not "another kind" (a damaged state of ours may be replaced).
        """
        try:
            d = read_state_json(path)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
        return not (isinstance(d, dict) and d.get("kind") == cls.KIND)

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


__all__ = ["FRESH_HINT", "ResumableState", "SAVE_EVERY_S", "StateKey", "StateMismatch", "read_state_json",
           "state_hooks"]
