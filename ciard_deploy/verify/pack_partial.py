"""The partial results of a resumable pack build (torch-free: the builder in ``pack_build.py`` writes
them, ``ciard pack`` finds and discards them).

Building is resumable at attack granularity (``build_pack(resume_dir=...)``): each finished
attack's images, reference logits and record are saved to a partial-results folder (by default
``PACK.partial/`` beside the pack: ``partial_dir``), and a later build with the same key
(``PackKey``: model sha256, arch, data, n, seed, eps, batch size, device type, torch version; and
equal settings for each attack it reuses) loads them instead of running the attacks again. Every
attack starts from ``torch.manual_seed(seed)``, so a resumed pack's arrays are byte-identical to an
uninterrupted build's. The folder (``PackPartial`` state, JSON, plus one ``.npz`` per attack)::

    state.json                 kind ciard.pack_partial: key, clean flags, one record per finished attack
    clean.npz                  logits_clean, checksum
    attack-<sha256(label)>.npz adv, logits_adv, label, checksum   (first 16 hex digits of the hash)
    .ciard.lock                held by the build that uses the folder (``lock.folder_lock``)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Mapping, Sequence

import numpy as np

from ciard_deploy.errors import ArtifactError, UsageError
from ciard_deploy.fingerprint import checksum_arrays
from ciard_deploy.io import atomic_path, write_blocker
from ciard_deploy.limits import LimitError, loads_json
from ciard_deploy.lock import is_lock_file
from ciard_deploy.resume import (AttackRecord, EvaluationKey, ResumableState, StateEvent, StateKey, StateMismatch)
from ciard_deploy.verify.pack import ARTIFACT_ARRAYS, EPS_TOLERANCE, ArtifactSection, reference_flags, top1_correct
from ciard_deploy.verify.pack_load import read_npz, validate_artifacts

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- partial results (resumable build)
PARTIAL_KIND = "ciard.pack_partial"
PARTIAL_SCHEMA_VERSION = 1
PARTIAL_STATE = "state.json"
PARTIAL_CLEAN = "clean.npz"
#: what ``build_pack`` does with a partial folder made for another pack
OnMismatch = Literal["refuse", "discard"]
#: the only names a build writes into its partial folder (and the temp files of their atomic writes)
_OURS = re.compile(r"^\.?(state\.json|clean\.npz|attack-[0-9a-f]{16}\.npz)(\.[A-Za-z0-9_]+\.tmp)?$")


def partial_dir(out: str | os.PathLike) -> Path:
    """``PACK.partial/``: where ``ciard pack --out PACK`` and ``ciard run`` keep finished attacks while PACK is built."""
    p = Path(out)
    return p.with_name(p.name + ".partial")


@dataclass(frozen=True)
class PackKey(EvaluationKey):
    """What a pack's arrays depend on besides each attack's own settings: partial results serve a build
    only if their keys are equal (and each reused attack's ``describe()`` is equal too).

    An ``EvaluationKey`` (model sha256, arch, dataset, split, ``n`` images in the pack, ``seed`` of
    the sample and of every attack, the pack's ``eps``, sample indices, images/labels; made by
    ``PackKey.create(x, y, ..., batch_size=..., device=..., torch_version=...)``) with three more fields.

    Attributes:
        batch_size: images per attack call (a seeded attack draws its noise per call).
        device: device type the attacks ran on (``cpu``, ``cuda``, ``mps``): numbers differ between them.
        torch_version: the PyTorch that computed them.
    """

    batch_size: int
    device: str
    torch_version: str

    FIELD_NAMES: ClassVar[Mapping[str, str]] = {**EvaluationKey.FIELD_NAMES, "batch_size": "batch size",
                                                "device": "device type", "torch_version": "torch version"}


@dataclass
class PackPartial(ResumableState):
    """The ``state.json`` of a partial folder: a ``PackKey``, the clean flags, one finished record per attack.

    A record's ``per_sample`` is the pack's reference row for it (correct on clean and under the
    attack), checked against the attack's ``.npz`` when it is loaded; ``seconds`` is its build time.
    """

    key: PackKey

    KIND: ClassVar[str] = PARTIAL_KIND
    SCHEMA_VERSION: ClassVar[int] = PARTIAL_SCHEMA_VERSION
    KEY: ClassVar[type[StateKey]] = PackKey
    WHAT: ClassVar[str] = "pack partial-results"
    SUBJECT: ClassVar[str] = "pack"

    def validate(self) -> None:
        super().validate()
        for a in self.attacks:
            if a.total != self.key.n or not a.finished:
                raise ValueError(f"{a.label}: done {a.done} of {a.total}; a pack keeps finished attacks of all "
                                 f"{self.key.n} images only")


def _attack_file(label: str) -> str:
    return f"attack-{hashlib.sha256(label.encode()).hexdigest()[:16]}.npz"


def check_partial_dir(folder: str | os.PathLike) -> Path:
    """Refuses a partial-results location that is not a build's own before any work; writes nothing.

    Raises:
        UsageError: ``folder`` is a file, or cannot be made or written.
        ArtifactError: ``folder`` holds files a pack build does not write (it is someone else's).
    """
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{p} is a file, not a pack's partial-results folder; move it away")
    if p.is_dir():
        foreign = sorted(q.name for q in p.iterdir()
                         if not (q.is_file() and (_OURS.match(q.name) or is_lock_file(q))))
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ArtifactError(f"{p} holds files a pack build does not write ({shown}): it is not a pack's "
                                "partial-results folder; it was left as it is: move it away")
    blocker = write_blocker(p)
    if blocker:
        raise UsageError(f"cannot keep partial results in {p}: {blocker}")
    return p


def read_partial(folder: str | os.PathLike) -> PackPartial | None:
    """The partial state in ``folder``, or None where there is none (or it is unreadable): for messages."""
    return PackPartial.peek(Path(folder) / PARTIAL_STATE)


def discard_partial(folder: str | os.PathLike) -> bool:
    """Removes the files a build writes into ``folder`` (its state first), then the folder if that emptied it.

    Anything else in it is left (and so is the folder); returns whether the folder is gone.
    """
    p = Path(folder)
    if not p.is_dir():
        return not p.exists()
    (p / PARTIAL_STATE).unlink(missing_ok=True)  # the commit point first: what is left is orphaned, never trusted
    for q in p.iterdir():
        if q.is_file() and _OURS.match(q.name):
            q.unlink(missing_ok=True)
    try:
        p.rmdir()
    except OSError:
        return False
    return True


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    arrays = dict(arrays)
    arrays["checksum"] = np.array([checksum_arrays(arrays)])
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)


def _read_npz(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays of one partial ``.npz``; ValueError naming the problem (missing, damaged, edited)."""
    if not path.is_file():
        raise ValueError(f"{path.name} is missing")
    try:
        arrays = read_npz(path)
    except LimitError as e:
        raise ValueError(f"{path.name}: {e}") from None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{path.name} is unreadable ({type(e).__name__})") from None
    missing = [k for k in (*keys, "checksum") if k not in arrays]
    if missing:
        raise ValueError(f"{path.name} lacks {', '.join(missing)}")
    if checksum_arrays(arrays) != str(arrays["checksum"].reshape(-1)[0]):
        raise ValueError(f"{path.name} fails its checksum")
    return arrays


class PartialFolder:
    """A build's partial folder: what can be reused from it, and saving each attack as it finishes."""

    def __init__(self, folder: Path, key: PackKey, attacks: Sequence[Any], on_mismatch: OnMismatch,
                 on_state: Callable[[StateEvent], None] | None, info: Mapping[str, Any]) -> None:
        self.folder = folder
        self.path = folder / PARTIAL_STATE
        self.key = key
        self.on_mismatch = on_mismatch
        self.on_state = on_state or (lambda ev: None)
        self.info = dict(info)
        hint = ("the folder was left as it is: delete it to start over (`ciard pack` and `ciard run` discard "
                "their own), or give another partial-results folder")
        try:
            self.state, _ = PackPartial.open(self.path, key, attacks, info=self.info, mismatch_hint=hint)
        except StateMismatch as e:
            if on_mismatch == "refuse":
                raise
            self._discard(f"it holds a different pack ({'; '.join(e.differences)})")
        except ArtifactError as e:
            if on_mismatch == "refuse" or PackPartial.holds_other_kind(self.path):
                raise  # a file of another kind is never overwritten
            self._discard(str(e))
        self.clean_saved = False

    def _discard(self, why: str) -> None:
        log.info("discarding the partial pack results in %s: %s; building from scratch", self.folder, why)
        discard_partial(self.folder)
        self.state = PackPartial(key=self.key, info=self.info, path=self.path)

    def _refuse(self, problem: str) -> None:
        """With ``on_mismatch="refuse"``, a damaged file is an error (nothing is touched); else the caller drops it."""
        if self.on_mismatch == "refuse":
            raise ArtifactError(f"partial pack results in {self.folder}: {problem}; the folder was left as it is: "
                                "delete it to start over")

    def clean(self, y: np.ndarray, num_classes: int) -> np.ndarray | None:
        """The saved clean logits (None: none saved, or unusable, and then nothing else is reused)."""
        if not self.state.attacks:
            return None
        try:
            lc = _read_npz(self.folder / PARTIAL_CLEAN, ("logits_clean",))["logits_clean"]
            if lc.dtype != np.float32 or lc.shape != (len(y), num_classes) or not np.isfinite(lc).all():
                raise ValueError(f"{PARTIAL_CLEAN} holds {lc.dtype} {lc.shape}, not float32 ({len(y)}, {num_classes})")
            if not np.array_equal(top1_correct(lc, y), self.state.clean_correct):
                raise ValueError(f"{PARTIAL_CLEAN} disagrees with the clean flags of {PARTIAL_STATE}")
        except ValueError as e:
            self._refuse(str(e))
            self._discard(str(e))
            return None
        self.clean_saved = True
        return lc

    def take(self, attack: Any, x: np.ndarray, y: np.ndarray, lc: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                                       AttackRecord] | None:
        """``attack``'s saved images, logits and record, or None when it has to run."""
        rec = self.state.record(attack.label)
        if rec is None:
            return None
        try:
            arrays = _read_npz(self.folder / _attack_file(rec.label), ("adv", "logits_adv", "label"))
            xa, la = arrays["adv"], arrays["logits_adv"]
            if str(arrays["label"].reshape(-1)[0]) != rec.label:
                raise ValueError(f"{_attack_file(rec.label)} holds {arrays['label'].reshape(-1)[0]!r}")
            if xa.dtype != np.float32 or xa.shape != x.shape or la.dtype != np.float32 or la.shape != lc.shape:
                raise ValueError(f"{rec.label} arrays have shapes {xa.shape}, {la.shape}, not {x.shape}, {lc.shape}")
            if not (np.isfinite(xa).all() and np.isfinite(la).all()) or xa.min() < 0 or xa.max() > 1:
                raise ValueError(f"{rec.label} arrays hold values outside [0, 1] or not finite")
            if np.abs(xa - x).max(initial=0.0) > float(attack.eps) + EPS_TOLERANCE:
                raise ValueError(f"{rec.label} images lie outside eps of their clean images")
            if not np.array_equal(reference_flags(y, lc, [la])[1], rec.per_sample):
                raise ValueError(f"{rec.label} logits disagree with the flags of {PARTIAL_STATE}")
        except ValueError as e:
            self._refuse(str(e))
            log.info("partial pack results in %s: %s; %s runs again", self.folder, e, attack.label)
            self.on_state(StateEvent("discarded", attack.label, 0, len(y), 0.0, self.path))
            self.state.attacks = [r for r in self.state.attacks if r.label != rec.label]
            return None
        self.on_state(StateEvent("reused", rec.label, rec.total, rec.total, rec.seconds, self.path))
        return xa, la, rec

    def take_section(self, job: "SectionJob", x: np.ndarray, y: np.ndarray) -> ArtifactSection | None:
        """A finished white-box section for ``job``'s artifact and attacks, or None when it has to run."""
        rec = self.state.record(job.label)
        if rec is None:
            return None
        try:
            keys = ("meta", *ARTIFACT_ARRAYS)
            arrays = _read_npz(self.folder / _attack_file(rec.label), keys)
            meta = loads_json(str(arrays["meta"].reshape(-1)[0]))
            if not isinstance(meta, dict) or meta.get("sha256") != job.sha256:
                raise ValueError(f"{_attack_file(rec.label)} holds another artifact's section")
            meta["index"] = job.index
            pack_arrays = {"x": x, "y": y} | {f"art_{job.index}_{k}": arrays[k] for k in ARTIFACT_ARRAYS}
            (section,) = validate_artifacts(self.folder, pack_arrays, {"eps": self.key.eps, "artifacts": [meta]},
                                             x, y, int(arrays["logits"].shape[1]))
            if not np.array_equal(section.found_by == -1, rec.per_sample):  # type: ignore[union-attr]
                raise ValueError(f"{rec.label} flags disagree with {PARTIAL_STATE}")
        except (ValueError, ArtifactError, json.JSONDecodeError, IndexError) as e:
            self._refuse(str(e))
            log.info("partial pack results in %s: %s; %s runs again", self.folder, e, job.label)
            self.on_state(StateEvent("discarded", job.label, 0, len(y), 0.0, self.path))
            self.state.attacks = [r for r in self.state.attacks if r.label != rec.label]
            return None
        self.on_state(StateEvent("reused", rec.label, rec.total, rec.total, rec.seconds, self.path))
        return section

    def save_section(self, job: "SectionJob", section: ArtifactSection, y: np.ndarray, device: str,
                     batch_size: int) -> None:
        """Saves one finished white-box section: its arrays and record, then its state record (the commit point)."""
        if section.x_adv is None:
            return  # a skipped section costs nothing to make again
        arrays = {k: a for k, a in zip(ARTIFACT_ARRAYS, section.arrays().values())}
        _write_npz(self.folder / _attack_file(job.label),
                   {**arrays, "meta": np.array([json.dumps(section.meta, sort_keys=True)])})
        n = len(y)
        self.state.put(AttackRecord(label=job.label, name="artifact", eps=float(job.eps), settings=job.describe(),
                                    total=n, done=n, seconds=float(section.meta.get("seconds", 0.0)),
                                    per_sample=section.found_by == -1, device=device,  # type: ignore[operator]
                                    batch_size=batch_size))
        self.state.save()

    def save(self, attack: Any, xa: np.ndarray, la: np.ndarray, y: np.ndarray, lc: np.ndarray, seconds: float,
             device: str, batch_size: int) -> None:
        """Saves one finished attack: clean logits (once), its arrays, then its record (the commit point)."""
        if not self.clean_saved:
            _write_npz(self.folder / PARTIAL_CLEAN, {"logits_clean": lc})
            self.clean_saved = True
        _write_npz(self.folder / _attack_file(attack.label),
                   {"adv": xa, "logits_adv": la, "label": np.array([attack.label])})
        flags = reference_flags(y, lc, [la])
        self.state.clean_correct = flags[0]
        n = len(y)
        self.state.put(AttackRecord(label=attack.label, name=attack.name, eps=float(attack.eps),
                                    settings=attack.describe(), total=n, done=n, seconds=seconds,
                                    per_sample=flags[1], device=device, batch_size=batch_size))
        self.state.save()


@dataclass
class SectionJob:
    """One artifact's white-box section as the partial folder knows it: a label and settings to compare."""

    index: int
    path: Path
    sha256: str
    eps: float
    attacks: Sequence[Any]
    allow_untrusted_twin: bool

    @property
    def label(self) -> str:
        return f"artifact {self.sha256[:16]}"

    def describe(self) -> dict[str, Any]:
        return {"artifact_sha256": self.sha256, "attacks": [a.describe() for a in self.attacks],
                "allow_untrusted_twin": self.allow_untrusted_twin}


__all__ = ["OnMismatch", "PARTIAL_KIND", "PackKey", "PackPartial", "PartialFolder", "SectionJob", "check_partial_dir",
           "discard_partial", "partial_dir", "read_partial"]
