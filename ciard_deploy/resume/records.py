"""What a resumable state holds besides its key: per-sample flags as text, one record per attack,
the events an evaluation reports when it takes work from a state, and how two settings differ.

numpy only (no torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import numpy as np

from ciard_deploy.attacks.results import AttackResult
from ciard_deploy.fingerprint import flatten


def flags_to_str(flags: np.ndarray) -> str:
    """``[True, False, True] -> "101"``."""
    bits = np.asarray(flags, dtype=bool).reshape(-1)
    return np.where(bits, ord("1"), ord("0")).astype(np.uint8).tobytes().decode("ascii")


def flags_from_str(text: str, n: int, what: str) -> np.ndarray:
    """Inverse of ``flags_to_str``; raises ValueError unless ``text`` is ``n`` characters of 0/1."""
    if not isinstance(text, str) or len(text) != n or set(text) - {"0", "1"}:
        raise ValueError(f"{what} must be a string of {n} characters 0/1")
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8) == ord("1")


def plain(obj: Any) -> Any:
    """A JSON round trip, so settings compare the way they will after being saved (tuples -> lists, ...)."""
    return json.loads(json.dumps(obj, default=str))


def _is_sha256(v: str) -> bool:
    return len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def short(v: Any) -> str:
    if isinstance(v, str) and _is_sha256(v):
        return v[:12] + "..."  # a sha256
    if isinstance(v, str) and v.startswith("sha256:") and _is_sha256(v[7:]):
        return v[:19] + "..."  # a "sha256:<hex>" checksum
    return json.dumps(v) if isinstance(v, str) else repr(v)


def settings_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``["options.seed 0 (file) vs None (now)", ...]`` for two ``Attack.describe()`` dicts."""
    a, b = flatten(plain(saved)), flatten(plain(now))
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            out.append(f"{k} {short(a.get(k, '<absent>'))} (file) vs {short(b.get(k, '<absent>'))} (now)")
    return out


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
        d = {"label": self.label, "name": self.name, "eps": self.eps, "settings": plain(self.settings),
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


#: ``announce(kind, stage, done, total, seconds)``: tells of a ``StateEvent`` (see ``state_hooks``)
Announce = Callable[[StateEventKind, str, int, int, float], None]


__all__ = ["Announce", "AttackRecord", "StateEvent", "StateEventKind", "flags_from_str", "flags_to_str", "plain",
           "settings_differences", "short"]
