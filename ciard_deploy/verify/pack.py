"""The robustness pack: what a device needs to re-measure a model's robustness on its runtime.

Built on the machine with PyTorch (``build_pack``), checked and read anywhere (``load_pack``,
numpy only). One ``.npz`` file, written atomically, never pickled::

    x                float32 (N, C, H, W) in [0, 1]   clean test images (seeded, class-stratified)
    y                int64   (N,)                     labels
    logits_clean     float32 (N, K)                   the PyTorch model's logits on x
    adv_<i>          float32 (N, C, H, W)             attack i's images, crafted on the PyTorch model,
                                                      each within eps_i (L-inf) of its clean image
    logits_adv_<i>   float32 (N, K)                   the PyTorch model's logits on adv_<i>
    ref_correct      bool    (1 + A, N)               row 0: clean correct; row 1 + i: correct on clean
                                                      and on adv_<i> (AutoAttack's per-sample flags)
    art_<j>_adv      float32 (N, C, H, W)             (schema 2) white-box attacks on exported artifact j: per sample
                                                      the first image its runtime misclassified (else the clean one)
    art_<j>_logits   float32 (N, K)                   that runtime's logits on art_<j>_adv when the pack was built
    art_<j>_logits_clean float32 (N, K)               that runtime's logits on x
    art_<j>_found_by int8    (N,)                     index of the attack that broke the sample; -1 robust, -2 clean wrong
    meta             <U      (1,)                     JSON metadata (below)
    checksum         <U      (1,)                     "sha256:<hex>" over every other array

``meta`` holds: ``format``, ``schema_version``, ``tool``, ``created``; ``model`` (source,
checkpoint, sha256, metadata_sha256, arch, recipe_hash, role, num_classes, classes,
input_shape, dataset, eps); ``data`` (dataset, split, n, seed, sampling, indices); ``eps``,
``eps_label``; ``attacks`` (index, name, label, eps, settings, seconds, source);
``reference`` (backend, device, precision, clean_acc, robust_acc by label,
worst_case_label, worst_case_acc); ``versions``; (schema 2) ``artifacts``: one record per
exported artifact the pack attacked white-box (``name``, ``sha256``, ``precision``, ``runtime``,
``eps``, ``label``, ``attacks`` with per-attack records, ``twin`` with its measured fidelity,
``clean_acc``, ``robust_acc``, ``seconds``; a record with ``skipped`` says why no white-box
attack was possible, e.g. an op the twin cannot reproduce). Schema 1 packs are still read.
Attack ``i`` is ``adv_<i>``: labels such as ``pgd20@8/255`` hold a ``/`` and are not used as array names.

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
import inspect
import json
import logging
import math
import os
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ciard_deploy.attacks.state import (AttackRecord, EvaluationKey, ResumableState, StateEvent, StateKey,
                                       StateMismatch)
from ciard_deploy.errors import ArtifactError, UsageError
from ciard_deploy.limits import (MAX_ATTACKS, MAX_ARTIFACTS, MAX_INFLATE_RATIO, MAX_NPY_HEADER, MAX_NPZ_MEMBERS,
                                 MIN_INFLATE_CHECK, ClassNames, Eps, Finite, Fraction, LimitError, NumClasses,
                                 ShortText, TrainingEps, check_image_shape, loads_json, schema_problems)
from ciard_deploy.lock import holding, is_lock_file

log = logging.getLogger(__name__)

FORMAT = "ciard-robustness-pack"
SCHEMA_VERSION = 2
#: slack on the L-inf budget for float32 rounding of ``x +- eps`` (as in attacks.cascade)
EPS_TOLERANCE = 1e-6

Progress = Callable[..., None]


def worst_case_label(attacks: Sequence[dict[str, Any]]) -> str:
    """``worst(fgsm+pgd20)@0.1`` (or each label when budgets differ), as ``EvalResult`` names it."""
    from ciard_deploy.attacks.base import format_eps

    if not attacks:
        return "worst()"
    eps = {format_eps(float(a["eps"])) for a in attacks}
    if len(eps) == 1:
        return f"worst({'+'.join(a['name'] for a in attacks)})@{eps.pop()}"
    return f"worst({'+'.join(a['label'] for a in attacks)})"


def _accuracy(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.asarray(logits).argmax(1) == y


def reference_flags(y: np.ndarray, logits_clean: np.ndarray, logits_adv: Sequence[np.ndarray]) -> np.ndarray:
    """(1 + A, N) bool: clean correct, then correct on clean *and* under each attack."""
    clean = _accuracy(logits_clean, y)
    rows = [clean] + [clean & _accuracy(la, y) for la in logits_adv]
    return np.stack(rows).astype(bool) if rows else np.zeros((1, len(y)), bool)


@dataclass
class RobustnessPack:
    """A pack in memory: images, labels, the reference logits and the metadata.

    Attributes:
        x: clean images, float32 NCHW in [0, 1].
        y: int64 labels.
        logits_clean: the PyTorch model's logits on ``x``.
        adv: one array of adversarial images per attack, in ``meta["attacks"]`` order.
        logits_adv: the PyTorch model's logits on each ``adv`` array.
        meta: the metadata dict (see the module docstring).
        path: the file it was loaded from or saved to.
        checksum: ``"sha256:<hex>"`` of the arrays and metadata (set by ``save_pack``/``load_pack``).
    """

    x: np.ndarray
    y: np.ndarray
    logits_clean: np.ndarray
    adv: list[np.ndarray]
    logits_adv: list[np.ndarray]
    meta: dict[str, Any]
    path: Path | None = None
    checksum: str = ""
    file_sha256: str = field(default="", repr=False)
    artifacts: list["ArtifactSection"] = field(default_factory=list)

    # ---------------------------------------------------------------- views
    @property
    def n(self) -> int:
        return int(len(self.y))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(self.meta["model"]["num_classes"])

    @property
    def eps(self) -> float:
        return float(self.meta["eps"])

    @property
    def attacks(self) -> list[dict[str, Any]]:
        return list(self.meta["attacks"])

    @property
    def attack_labels(self) -> list[str]:
        return [a["label"] for a in self.meta["attacks"]]

    @property
    def model_sha256(self) -> str:
        return str(self.meta["model"].get("sha256") or "")

    @property
    def reference(self) -> dict[str, Any]:
        return dict(self.meta["reference"])

    @property
    def ref_flags(self) -> np.ndarray:
        """(1 + A, N) bool per-sample reference flags (clean correct; robust under each attack)."""
        return reference_flags(self.y, self.logits_clean, self.logits_adv)

    def artifact_for(self, sha256: str | None) -> "ArtifactSection | None":
        """The white-box section made for the artifact with this sha256 (None: the pack has none)."""
        if not sha256:
            return None
        return next((a for a in self.artifacts if a.sha256 == sha256), None)

    def summary(self) -> dict[str, Any]:
        """Everything but the arrays: for reports (path, hashes, sample, model, attacks, reference)."""
        return {"path": str(self.path) if self.path else None, "file_sha256": self.file_sha256 or None,
                "checksum": self.checksum or None, "format": self.meta.get("format"),
                "schema_version": self.meta.get("schema_version"), "n": self.n, "eps": self.eps,
                "eps_label": self.meta.get("eps_label"), **self._training_eps(),
                "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "model": self.meta["model"],
                "data": {k: v for k, v in self.meta["data"].items() if k != "indices"},
                "attacks": self.attacks, "artifacts": list(self.meta.get("artifacts", [])),
                "reference": self.reference, "versions": self.meta.get("versions", {}),
                "created": self.meta.get("created"), "tool": self.meta.get("tool")}

    def _training_eps(self) -> dict[str, Any]:
        """``training_eps`` (what the source checkpoint records, or None) and ``eps_warning`` when the
        pack's budget differs from it."""
        from ciard_deploy.attacks.base import EpsChoice

        recorded = (self.meta.get("model") or {}).get("eps")
        choice = EpsChoice(self.eps, None if recorded is None else float(recorded), True)
        return {"training_eps": choice.training_eps, "eps_warning": choice.warning}

    # ---------------------------------------------------------------- arrays
    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays as stored (without ``checksum``)."""
        out: dict[str, np.ndarray] = {"x": self.x, "y": self.y, "logits_clean": self.logits_clean}
        for i, (a, la) in enumerate(zip(self.adv, self.logits_adv)):
            out[f"adv_{i}"] = a
            out[f"logits_adv_{i}"] = la
        out["ref_correct"] = self.ref_flags
        for sec in self.artifacts:
            if sec.x_adv is not None:
                out.update(sec.arrays())
        out["meta"] = np.array([json.dumps(self.meta, sort_keys=True)])
        return out


@dataclass
class ArtifactSection:
    """White-box attacks made for one exported artifact (``meta["artifacts"][index]``, arrays ``art_<index>_*``).

    Attributes:
        meta: the record (name, sha256, precision, runtime, eps, label, attacks, twin, ...; or ``skipped``).
        x_adv: per sample the first image the artifact's runtime misclassified (else the clean one); None
            when the section is ``skipped``.
        logits: the runtime's logits on ``x_adv`` when the pack was built.
        logits_clean: the runtime's logits on the clean images then.
        found_by: int8 per sample: the attack index that broke it, -1 robust, -2 clean already wrong.
    """

    meta: dict[str, Any]
    x_adv: np.ndarray | None = None
    logits: np.ndarray | None = None
    logits_clean: np.ndarray | None = None
    found_by: np.ndarray | None = None

    @property
    def index(self) -> int:
        return int(self.meta["index"])

    @property
    def sha256(self) -> str:
        return str(self.meta.get("sha256") or "")

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or "")

    @property
    def skipped(self) -> str | None:
        """Why no white-box attack was made for the artifact (None: it was)."""
        return self.meta.get("skipped") or None

    def arrays(self) -> dict[str, np.ndarray]:
        j = self.index
        return {f"art_{j}_adv": self.x_adv, f"art_{j}_logits": self.logits,  # type: ignore[dict-item]
                f"art_{j}_logits_clean": self.logits_clean, f"art_{j}_found_by": self.found_by}


ARTIFACT_ARRAYS = ("adv", "logits", "logits_clean", "found_by")


# --------------------------------------------------------------------------- checksum
def checksum_arrays(arrays: dict[str, np.ndarray]) -> str:
    """``"sha256:<hex>"`` over each array's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        if key == "checksum":
            continue
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return f"sha256:{h.hexdigest()}"


# --------------------------------------------------------------------------- save
def check_output(path: str | os.PathLike, force: bool = False, flag: str = "--out") -> Path:
    """Refuses an output path that exists (without ``force``), is a folder, or cannot be written."""
    from ciard_deploy.verify.report import check_writable

    p = Path(path)
    if p.exists() and not p.is_dir() and not force:
        raise UsageError(f"{flag} {p} already exists; pass --force to overwrite it")
    check_writable(p, flag)
    return p


def save_pack(pack: RobustnessPack, path: str | os.PathLike, force: bool = False) -> Path:
    """Writes ``pack`` to ``path`` atomically (temp file + rename; plain ``.npz``, no pickle).

    Raises:
        UsageError: ``path`` exists and ``force`` is false, or cannot be written.
    """
    from ciard_deploy.io import atomic_path, sha256_file

    p = check_output(path, force)
    arrays = pack.arrays()
    arrays["checksum"] = np.array([checksum_arrays(arrays)])
    with atomic_path(p) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)
    pack.path, pack.checksum, pack.file_sha256 = p, str(arrays["checksum"][0]), sha256_file(p)
    return p


# --------------------------------------------------------------------------- bounded reading (hostile files)
#: dtype kinds a pack (or a partial-results file) may hold: numbers, bools and text; never objects
_NPZ_KINDS = "fiubU"


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz``, each member's ``.npy`` header checked before anything is allocated.

    Refuses (``LimitError``, naming the array): a dtype that is not a plain number, bool or text type
    (pickled objects, structures); a header whose declared shape and dtype do not fill exactly the
    member's size as the zip records it (a 10^13-element declaration in a small file); a compressed
    member that inflates more than ``MAX_INFLATE_RATIO`` times its compressed size; members that claim
    more bytes than the file holds; an array stored twice; more than ``MAX_NPZ_MEMBERS`` arrays.
    ``zipfile.BadZipFile``, ``OSError`` and ``EOFError`` pass through.
    """
    p = Path(path)
    size = p.stat().st_size
    with zipfile.ZipFile(p) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_NPZ_MEMBERS:
            raise LimitError(f"holds {len(infos)} arrays, more than {MAX_NPZ_MEMBERS}")
        if sum(i.compress_size for i in infos) > size:
            raise LimitError("its members claim more bytes than the file holds")
        plan: list[tuple[str, zipfile.ZipInfo]] = []
        for info in infos:
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if any(key == k for k, _ in plan):
                raise LimitError(f"holds the array {key!r} twice")
            if info.compress_type != zipfile.ZIP_STORED \
                    and info.file_size > max(MIN_INFLATE_CHECK, MAX_INFLATE_RATIO * info.compress_size):
                raise LimitError(f"array {key!r} inflates from {info.compress_size} to {info.file_size} bytes, more "
                                 f"than {MAX_INFLATE_RATIO} times (a zip bomb?)")
            with zf.open(info) as f:
                try:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=MAX_NPY_HEADER)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=MAX_NPY_HEADER)
                    else:
                        raise LimitError(f"array {key!r} is in .npy format {version}, which packs do not use")
                except LimitError:
                    raise
                except (ValueError, TypeError, SyntaxError) as e:
                    raise LimitError(f"array {key!r} has no valid .npy header ({str(e).splitlines()[0][:80]})") from None
                offset = f.tell()
            if dtype.hasobject:
                raise LimitError(f"array {key!r} holds pickled objects (dtype {dtype}); packs are plain arrays "
                                 "(refusing to load it)")
            if dtype.kind not in _NPZ_KINDS or dtype.fields is not None or dtype.subdtype is not None:
                raise LimitError(f"array {key!r} has dtype {dtype}, not a plain number, bool or text type")
            declared = math.prod(shape) * dtype.itemsize
            if offset + declared != info.file_size:
                raise LimitError(f"array {key!r} declares shape {tuple(shape)} {dtype} ({declared} bytes) but holds "
                                 f"{info.file_size - offset} bytes")
            plan.append((key, info))
        out: dict[str, np.ndarray] = {}
        for key, info in plan:
            with zf.open(info) as f:
                out[key] = np.lib.format.read_array(f, allow_pickle=False, max_header_size=MAX_NPY_HEADER)
    return out


class _Typed(BaseModel):
    """Typed where a field is present (strict: no "10" for 10, no NaN budgets); unknown keys are kept."""

    model_config = ConfigDict(strict=True, extra="allow")


class _PackModelInfo(_Typed):
    num_classes: NumClasses
    input_shape: list[int]
    sha256: ShortText | None = None
    eps: TrainingEps | None = None
    classes: ClassNames | None = None
    dataset: ShortText | None = None
    arch: ShortText | None = None

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, v: list[int]) -> list[int]:
        return check_image_shape(v)


class _PackData(_Typed):
    dataset: ShortText | None = None
    split: ShortText | None = None
    n: int | None = Field(default=None, ge=0)
    seed: int | None = None
    indices: list[int] | None = None


class _PackAttack(_Typed):
    name: ShortText
    label: ShortText
    eps: Eps
    settings: dict[str, Any] = Field(default_factory=dict)
    seconds: Finite | None = None


class _PackReference(_Typed):
    clean_acc: Fraction
    robust_acc: dict[str, Fraction] = Field(default_factory=dict)
    worst_case_label: ShortText | None = None
    worst_case_acc: Fraction | None = None


class _PackArtifactRecord(_Typed):
    index: int
    sha256: ShortText
    name: ShortText | None = None
    label: ShortText | None = None
    eps: Eps | None = None
    skipped: ShortText | None = None
    attacks: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_ATTACKS)
    twin: dict[str, Any] | None = None
    clean_acc: Fraction | None = None
    robust_acc: Fraction | None = None
    seconds: Finite | None = None


class PackMetadata(_Typed):
    """The schema of a pack's ``meta`` (see the module docstring): every field the code reads is typed
    and bounded; ``load_pack`` refuses a pack whose metadata does not validate, naming the field."""

    format: str
    schema_version: int
    model: _PackModelInfo
    data: _PackData
    eps: Eps
    eps_label: ShortText | None = None
    attacks: list[_PackAttack] = Field(max_length=MAX_ATTACKS)
    reference: _PackReference
    versions: dict[str, Any] = Field(default_factory=dict)
    artifacts: list[_PackArtifactRecord] = Field(default_factory=list, max_length=MAX_ARTIFACTS)
    tool: ShortText | None = None
    created: ShortText | None = None


# --------------------------------------------------------------------------- load
def _bad(path: Path, what: str) -> ArtifactError:
    return ArtifactError(f"robustness pack {path.name}: {what}")


def load_pack(path: str | os.PathLike) -> RobustnessPack:
    """Reads and validates a pack; any problem is an ``ArtifactError`` (exit 2) with one line.

    Checks, in order: the file is a readable ``.npz`` without pickled objects, each array's
    declared shape and dtype filling exactly what the archive holds (``read_npz``: nothing is
    allocated for a header that lies); it is a ciard pack of a schema this version reads; the
    checksum; the metadata against ``PackMetadata`` (types, sizes, nesting; every eps finite and
    > 0, no attack's above the pack's); dtypes and shapes against the metadata; every image
    finite and in [0, 1]; labels in range; every adversarial image within its attack's eps (L-inf,
    1e-6 slack) of its clean image; the stored per-sample flags agree with the stored logits.
    """
    from ciard_deploy.io import sha256_file

    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"robustness pack not found: {p}" + (" (a folder)" if p.is_dir() else "")
                            + "; build one with ciard pack")
    if not zipfile.is_zipfile(p):
        raise _bad(p, "not a valid .npz archive; truncated or corrupt? rebuild it with ciard pack")
    try:
        arrays = read_npz(p)  # every header checked against the file before an array is allocated
    except LimitError as e:
        raise _bad(p, str(e)) from None
    except ValueError as e:
        raise _bad(p, f"not a valid .npz archive ({e}); truncated or corrupt? rebuild it with ciard pack") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise _bad(p, f"not a valid .npz archive ({type(e).__name__}: {e}); truncated or corrupt? "
                      "rebuild it with ciard pack") from None
    for key in ("meta", "checksum", "x", "y", "logits_clean"):
        if key not in arrays:
            raise _bad(p, f"has no {key!r} array; not a ciard robustness pack")
    try:
        meta = loads_json(str(arrays["meta"].reshape(-1)[0]))
        stored = str(arrays["checksum"].reshape(-1)[0])
    except (LimitError, IndexError, TypeError, ValueError) as e:
        raise _bad(p, f"unreadable metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _bad(p, f"not a ciard robustness pack (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise _bad(p, f"schema version {version} is newer than this ciard-deploy reads ({SCHEMA_VERSION}); upgrade")
    actual = checksum_arrays(arrays)
    if actual != stored:
        raise _bad(p, "checksum mismatch (damaged, or edited after it was built); rebuild it with ciard pack")
    try:
        PackMetadata.model_validate(meta)  # typed and bounded; the dict itself is kept (its checksum is over it)
    except ValidationError as e:
        raise _bad(p, f"metadata {schema_problems(e, missing='lacks the key')}") from None
    try:
        pack = _validate(p, arrays, meta)
    except KeyError as e:
        raise _bad(p, f"metadata lacks {e}") from None
    pack.checksum, pack.file_sha256 = stored, sha256_file(p)
    return pack


def _validate(p: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> RobustnessPack:
    model, attacks = meta["model"], meta["attacks"]
    pack_eps = float(meta["eps"])
    x, y, lc = arrays["x"], arrays["y"], arrays["logits_clean"]
    shape = tuple(int(v) for v in model["input_shape"])
    k = int(model["num_classes"])
    if x.dtype != np.float32 or x.ndim != 4:
        raise _bad(p, f"images x must be float32 NCHW, got {x.dtype} {x.shape}")
    if tuple(x.shape[1:]) != shape:
        raise _bad(p, f"images have shape {tuple(x.shape[1:])} but the metadata says {shape}")
    n = len(x)
    if n == 0:
        raise _bad(p, "holds no images")
    if meta["data"].get("n") not in (None, n):
        raise _bad(p, f"holds {n} images but the metadata says {meta['data']['n']}")
    if y.dtype != np.int64 or y.shape != (n,):
        raise _bad(p, f"labels y must be int64 of shape ({n},), got {y.dtype} {y.shape}")
    if k < 2 or y.min() < 0 or y.max() >= k:
        raise _bad(p, f"labels outside 0..{k - 1}")
    _check_images(p, "x", x)
    _check_logits(p, "logits_clean", lc, n, k)
    adv, ladv = [], []
    for i, a in enumerate(attacks):
        ka, kl = f"adv_{i}", f"logits_adv_{i}"
        if ka not in arrays or kl not in arrays:
            raise _bad(p, f"lists attack {a.get('label', i)!r} but has no {ka}/{kl} arrays")
        xa = arrays[ka]
        if xa.dtype != np.float32 or xa.shape != x.shape:
            raise _bad(p, f"{a['label']} images must be float32 {x.shape}, got {xa.dtype} {xa.shape}")
        _check_images(p, f"{a['label']} images", xa)
        eps = float(a["eps"])  # finite and > 0 (PackMetadata)
        if eps > pack_eps + EPS_TOLERANCE:
            raise _bad(p, f"attack {a['label']} records eps {_eps_text(eps)}, above the pack's eps "
                          f"{_eps_text(pack_eps)}; not a valid attack record")
        dist = np.abs(xa - x).reshape(n, -1).max(axis=1)
        over = np.flatnonzero(dist > eps + EPS_TOLERANCE)
        if len(over):
            raise _bad(p, f"{len(over)} {a['label']} image(s) lie outside eps {_eps_text(eps)} of their clean image "
                          f"(max L-inf distance {float(dist.max()):.6g}, e.g. image {int(over[0])}); not a valid attack")
        _check_logits(p, kl, arrays[kl], n, k)
        adv.append(xa)
        ladv.append(arrays[kl])
    listed = {f"adv_{i}" for i in range(len(attacks))} | {f"logits_adv_{i}" for i in range(len(attacks))}
    sections = _validate_artifacts(p, arrays, meta, x, y, k)
    listed |= {key for sec in sections if sec.x_adv is not None for key in sec.arrays()}
    extra = sorted(key for key in arrays if key.startswith(("adv_", "logits_adv_", "art_")) and key not in listed)
    if extra:
        raise _bad(p, f"has arrays {', '.join(extra)} that its metadata does not list")
    pack = RobustnessPack(x=x, y=y, logits_clean=lc, adv=adv, logits_adv=ladv, meta=meta, path=p, artifacts=sections)
    if "ref_correct" in arrays and not np.array_equal(arrays["ref_correct"].astype(bool), pack.ref_flags):
        raise _bad(p, "stored per-sample reference flags disagree with the stored logits")
    return pack


def _validate_artifacts(p: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any], x: np.ndarray, y: np.ndarray,
                        k: int) -> list[ArtifactSection]:
    """The ``artifacts`` records and their arrays, each checked (shapes, range, eps ball, flags vs logits)."""
    records = meta.get("artifacts", [])
    if not isinstance(records, list):
        raise _bad(p, "metadata 'artifacts' is not a list")
    n = len(x)
    pack_eps = float(meta["eps"])
    out, seen = [], set()
    for j, rec in enumerate(records):
        if not isinstance(rec, dict) or rec.get("index") != j or not isinstance(rec.get("sha256"), str):
            raise _bad(p, f"artifact record {j} is malformed (needs index {j} and a sha256)")
        if rec["sha256"] in seen:
            raise _bad(p, f"two artifact records for sha256 {rec['sha256'][:12]}")
        seen.add(rec["sha256"])
        name = rec.get("name") or f"artifact {j}"
        keys = {f"art_{j}_{a}" for a in ARTIFACT_ARRAYS}
        if rec.get("skipped"):
            if keys & set(arrays):
                raise _bad(p, f"{name}: marked skipped but has arrays")
            out.append(ArtifactSection(meta=rec))
            continue
        missing = sorted(keys - set(arrays))
        if missing:
            raise _bad(p, f"lists white-box attacks on {name} but has no {', '.join(missing)} arrays")
        xa, la, lc = arrays[f"art_{j}_adv"], arrays[f"art_{j}_logits"], arrays[f"art_{j}_logits_clean"]
        fb = arrays[f"art_{j}_found_by"]
        if xa.dtype != np.float32 or xa.shape != x.shape:
            raise _bad(p, f"{name} white-box images must be float32 {x.shape}, got {xa.dtype} {xa.shape}")
        _check_images(p, f"{name} white-box images", xa)
        try:
            eps = float(rec["eps"])
        except (KeyError, TypeError, ValueError):
            raise _bad(p, f"{name}: white-box record has no valid eps") from None
        if not np.isfinite(eps) or eps <= 0 or eps > pack_eps + EPS_TOLERANCE:
            raise _bad(p, f"{name}: white-box eps {eps!r} is not within the pack's eps {_eps_text(pack_eps)}")
        dist = np.abs(xa - x).reshape(n, -1).max(axis=1)
        over = np.flatnonzero(dist > eps + EPS_TOLERANCE)
        if len(over):
            raise _bad(p, f"{len(over)} {name} white-box image(s) lie outside eps {_eps_text(eps)} of their clean image "
                          f"(max L-inf distance {float(dist.max()):.6g}); not a valid attack")
        _check_logits(p, f"art_{j}_logits", la, n, k)
        _check_logits(p, f"art_{j}_logits_clean", lc, n, k)
        if fb.dtype != np.int8 or fb.shape != (n,):
            raise _bad(p, f"art_{j}_found_by must be int8 of shape ({n},), got {fb.dtype} {fb.shape}")
        n_attacks = len(rec.get("attacks") or [])
        clean_ok = lc.argmax(1) == y
        adv_ok = la.argmax(1) == y
        expect = np.where(~clean_ok, -2, np.where(adv_ok, -1, 0))
        if ((fb < -2) | (fb >= n_attacks)).any() or not np.array_equal(np.minimum(fb, 0), expect):
            raise _bad(p, f"art_{j}_found_by disagrees with the stored runtime logits of {name}")
        out.append(ArtifactSection(meta=rec, x_adv=xa, logits=la, logits_clean=lc, found_by=fb))
    return out


def _check_images(p: Path, what: str, a: np.ndarray) -> None:
    if not np.isfinite(a).all():
        raise _bad(p, f"{what} hold NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:
        raise _bad(p, f"{what} lie in [{lo:.4g}, {hi:.4g}], outside [0, 1]")


def _check_logits(p: Path, key: str, a: np.ndarray, n: int, k: int) -> None:
    if a.dtype != np.float32 or a.shape != (n, k):
        raise _bad(p, f"{key} must be float32 of shape ({n}, {k}), got {a.dtype} {a.shape}")
    if not np.isfinite(a).all():
        raise _bad(p, f"{key} hold NaN or infinite values")


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
    from ciard_deploy.io import write_blocker

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
    path = Path(folder) / PARTIAL_STATE
    if not path.is_file():
        return None
    try:
        return PackPartial.load(path)
    except ArtifactError:
        return None


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
    from ciard_deploy.io import atomic_path

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


class _Partial:
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
            if on_mismatch == "refuse" or self._other_kind():
                raise  # a file of another kind is never overwritten
            self._discard(str(e))
        self.clean_saved = False

    def _other_kind(self) -> bool:
        try:
            d = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False  # unparseable, in a folder of only our own names: our own, damaged
        return not (isinstance(d, dict) and d.get("kind") == PARTIAL_KIND)

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
            if not np.array_equal(_accuracy(lc, y), self.state.clean_correct):
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

    def take_section(self, job: "_SectionJob", x: np.ndarray, y: np.ndarray) -> ArtifactSection | None:
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
            (section,) = _validate_artifacts(self.folder, pack_arrays, {"eps": self.key.eps, "artifacts": [meta]},
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

    def save_section(self, job: "_SectionJob", section: ArtifactSection, y: np.ndarray, device: str,
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
class _SectionJob:
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


# --------------------------------------------------------------------------- build (needs torch)
def _make_attack(spec: str, eps: float, seed: int, step_size: float | None = None) -> Any:
    """``create_attack`` with the pack's seed (and step size) for the attacks that take them."""
    from ciard_deploy.attacks.base import create_attack, parse_attack_spec

    entry, _ = parse_attack_spec(spec)
    try:
        params = inspect.signature(entry.load().__init__).parameters
    except Exception:  # noqa: BLE001  the attack cannot load here; create_attack says why
        params = {}
    options: dict[str, Any] = {"seed": seed} if "seed" in params else {}
    if step_size is not None and "step_size" in params:
        options["step_size"] = step_size
    return create_attack(spec, eps, **options)


#: the pack's attacks when none are named, by the device type they run on: what finishes in reasonable time
#: there (APGD-CE and APGD-T at reference strength on a CPU; FAB-T too on a GPU). Full AutoAttack (``aa``)
#: adds Square 5000 and is for when its hours are affordable.
DEFAULT_ATTACKS: dict[str, tuple[str, ...]] = {"cpu": ("apgd-ce", "apgd-t"), "mps": ("apgd-ce", "apgd-t"),
                                              "cuda": ("apgd-ce", "apgd-t", "fab-t")}


def default_attacks(device_type: str) -> list[str]:
    """The attacks a pack runs when none are named, for a torch device type (``cpu``, ``cuda``, ``mps``)."""
    return list(DEFAULT_ATTACKS.get(device_type, DEFAULT_ATTACKS["cpu"]))


@dataclass(frozen=True)
class PackPlan:
    """What ``build_pack`` is about to do, once every input has been checked (``on_plan`` hears it).

    Attributes:
        attacks: the attack specs it runs on the PyTorch model.
        attacks_default: True when they are ``default_attacks(device)`` (none were named).
        device: the torch device type it runs on (``cpu``, ``cuda``, ``mps``).
        eps: the budget and where it came from (``eps.warning`` when it differs from the training eps).
    """

    attacks: list[str]
    attacks_default: bool
    device: str
    eps: Any


def _check_labels(labels: Sequence[str]) -> None:
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise UsageError(f"attack(s) listed twice: {', '.join(dupes)}")


@holding("resume_dir", hint="wait for it or use another --out")
def build_pack(source: str | os.PathLike, *, dataset: str | None = None, n: int = 1000,
               attacks: Sequence[str] | None = None, eps: float | str | None = None, seed: int = 0,
               data_root: str | None = None, download: bool = False, device: str = "auto", batch_size: int = 256,
               arch: str | None = None, step_size: float | str | None = None,
               progress: Progress | None = None, resume_dir: str | os.PathLike | None = None,
               on_mismatch: OnMismatch = "refuse",
               on_state: Callable[[StateEvent], None] | None = None,
               artifacts: Sequence[str | os.PathLike] = (), artifact_attacks: Sequence[str] | None = None,
               allow_untrusted_twin: bool = False, threads: int | None = None,
               on_plan: Callable[[PackPlan], None] | None = None) -> RobustnessPack:
    """Builds a pack on the machine with PyTorch: sample, attack, record the reference.

    With ``resume_dir`` the build is resumable at attack granularity: after each finished attack
    its images, reference logits and record are saved there (atomically: the arrays, then the
    record in ``state.json``); a later call with an equal ``PackKey`` (model sha256, arch, data and
    sample indices, n, seed, eps, batch size, device type, torch version) loads the attacks it
    finished instead of running them, and runs only the others (an interrupted attack starts
    over; attacks not asked for stay in the folder). Every attack starts from
    ``torch.manual_seed(seed)``, so the arrays equal an uninterrupted build's, byte for byte.

    A folder made for another pack (another key, or an attack of the same label made with other
    settings: ``Attack.describe()``, e.g. another step size) is refused by default
    (``on_mismatch="refuse"``: ``StateMismatch``, exit 2, naming every difference, the folder left
    as it is), as ``ciard eval --state`` refuses a state file that someone may have spent hours on
    and may still want. ``on_mismatch="discard"`` is for a folder the caller owns as temp data
    (``ciard pack`` and ``ciard run`` keep ``PACK.partial/``, which nobody names or reads): it is
    emptied with a log line and the build starts over, since its contents are only a cache of
    what this call recomputes anyway. Either way a folder holding files a build does not write,
    or a ``state.json`` of another kind, is never touched. The folder is not removed here: call
    ``discard_partial`` once the pack is saved. The call holds the folder's lock (``lock.folder_lock``):
    another build with the same ``resume_dir`` meanwhile is refused (``InUse``, exit 2); a caller that
    saves and discards after the build holds it around all three (``ciard pack`` does).

    Args:
        source: run dir (its best student), ciard checkpoint, or a plain state dict with ``arch``.
        dataset: dataset of the test sample (default: the checkpoint's).
        n: test images (seeded, class-stratified; all of the split if it has fewer).
        attacks: attack specs (``pgd20``, ``cw30``, ``fgsm``, ``aa``, ...), each run on every image
            (None: ``default_attacks`` for the device: apgd-ce, apgd-t on CPU; fab-t too on CUDA).
        eps: L-inf budget, e.g. ``"8/255"`` or 0.1 (None: the training eps the checkpoint records;
            a budget that differs from it is used, and the pack's summary says so: ``eps_warning``).
        seed: seed of the sample and of every attack's randomness.
        data_root, download: where the dataset lives / fetch it if absent (torchvision sets).
        device: where the model and attacks run (``auto``, ``cpu``, ``cuda``, ...).
        batch_size: images per attack call.
        arch: architecture of a plain state dict without ciard metadata.
        step_size: step of the iterative attacks that take one (pgd, cw; default: each attack's own,
            2/255, made for 8/255 on CIFAR: at larger budgets pass about eps/4, or the attack cannot
            reach the edge of the ball in its steps). ``"2/255"`` strings are accepted.
        progress: ``callback(done, total, stage=...)``; stages ``"clean"`` and each attack label
            (neither for what is taken from ``resume_dir``).
        resume_dir: partial-results folder (made on the first save); None keeps everything in memory.
        on_mismatch: ``"refuse"`` or ``"discard"`` a ``resume_dir`` made for another pack (above).
        on_state: ``callback(StateEvent)`` for each attack taken from ``resume_dir`` (``"reused"``)
            or found there damaged and run again (``"discarded"``).
        artifacts: exported files (``.onnx``) to attack white-box through their twins, each scored on
            its own runtime (``verify.pack_artifacts``); each gets a section keyed by its sha256.
        artifact_attacks: the white-box cascade on each artifact (default
            ``attacks.artifact.ARTIFACT_ATTACKS``: apgd-ce, apgd-t, fab-t, mtpgd100).
        allow_untrusted_twin: attack through a twin below the fidelity threshold instead of refusing.
        threads: onnxruntime threads for the artifacts' runtimes (None: its default).
        on_plan: ``callback(PackPlan)`` once every input is checked, before any attack runs: the
            attacks, whether they are the device's defaults, the device and the eps choice (the CLI
            names a default choice and warns of an eps other than the training one).

    Returns:
        the pack (not yet saved: ``save_pack``).

    Raises:
        UsageError: bad n, batch size, eps, attack name, or a dataset that does not fit the model;
            no eps given and none recorded in the checkpoint; a ``resume_dir`` that is a file or
            cannot be written.
        ArtifactError: the checkpoint is missing or corrupt; ``resume_dir`` holds other files or a
            damaged one (with ``"refuse"``).
        StateMismatch: ``resume_dir`` holds another pack's attacks (with ``"refuse"``; an ArtifactError).
        BackendUnavailable: PyTorch is not installed here (exit 3): packs are built where it is.
    """
    from ciard_deploy.runtime.torch_backend import import_torch

    torch = import_torch()
    from ciard_deploy import __version__
    from ciard_deploy.attacks.base import choose_eps, parse_eps
    from ciard_deploy.attacks.cascade import check_budget
    from ciard_deploy.data import load_test_set_for
    from ciard_deploy.devices import resolve_device
    from ciard_deploy.io import checkpoint_paths, library_versions, load_model, resolve_checkpoint, sha256_file

    if on_mismatch not in ("refuse", "discard"):
        raise UsageError(f"on_mismatch must be 'refuse' or 'discard', got {on_mismatch!r}")
    folder = check_partial_dir(resume_dir) if resume_dir is not None else None
    if n <= 0:
        raise UsageError(f"--n must be positive, got {n}")
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    # a malformed budget, an unknown attack or one listed twice fails before anything loads (at a trial
    # budget when the checkpoint's own is still to be read)
    trial_eps = parse_eps(eps) if eps is not None else 8 / 255
    step = None
    if step_size is not None:
        step = parse_eps(step_size)
        if step <= 0:
            raise UsageError(f"--step-size must be positive, got {step_size}")
    dev = resolve_device(device)
    specs = [s.strip() for s in (default_attacks(dev.type) if attacks is None else attacks) if s and s.strip()]
    _check_labels([_make_attack(s, trial_eps, seed, step).label for s in specs])
    from ciard_deploy.verify.pack_artifacts import build_section, check_artifacts, preflight

    artifact_paths = check_artifacts(artifacts)
    art_specs: list[str] = []
    if artifact_paths:
        from ciard_deploy.attacks.artifact import ARTIFACT_ATTACKS, create_artifact_attacks

        art_specs = list(ARTIFACT_ATTACKS if artifact_attacks is None else artifact_attacks)
        create_artifact_attacks(art_specs, trial_eps, seed)
    model, meta = load_model(source, arch=arch, dataset=dataset, data_root=data_root)
    choice = choose_eps(eps, meta.eps)
    eps_value = choice.eps
    atks = [_make_attack(s, eps_value, seed, step) for s in specs]
    art_atks = create_artifact_attacks(art_specs, eps_value, seed) if artifact_paths else []
    model = model.to(dev).eval()
    ds_name, ds = load_test_set_for(meta, dataset, data_root, download, n, seed)
    x, y = ds.tensors()
    ckpt = resolve_checkpoint(source)
    meta_file = checkpoint_paths(ckpt)[1]
    model_sha = sha256_file(ckpt)
    total = len(y)
    x_np, y_np = x.numpy(), y.numpy()
    indices = [int(i) for i in ds.indices.tolist()] if ds.indices is not None else None
    preflight(artifact_paths, model_sha256=model_sha, input_shape=x_np.shape[1:], num_classes=int(meta.num_classes),
              threads=threads, clean=x_np, eps=eps_value, seed=seed, allow_untrusted_twin=allow_untrusted_twin)
    jobs = [_SectionJob(j, a, sha256_file(a), eps_value, art_atks, bool(allow_untrusted_twin))
            for j, a in enumerate(artifact_paths)]
    partial = None
    if folder is not None:
        key = PackKey.create(x_np, y_np, model_sha256=model_sha, arch=meta.arch, dataset=ds_name, split="test",
                             seed=seed, eps=eps_value, indices=indices, batch_size=int(batch_size), device=dev.type,
                             torch_version=str(torch.__version__))
        partial = _Partial(folder, key, [*atks, *jobs], on_mismatch, on_state,
                           info={"model_source": str(source), "versions": library_versions()})

    def report(done: int, stage: str) -> None:
        if progress is not None:
            progress(done, total, stage=stage)

    def logits_of(images: torch.Tensor, stage: str | None = None) -> np.ndarray:
        outs = []
        with torch.inference_mode():
            for i in range(0, len(images), batch_size):
                outs.append(model(images[i:i + batch_size].to(dev)).float().cpu())
                if stage:
                    report(min(i + batch_size, len(images)), stage)
        return torch.cat(outs).numpy().astype(np.float32)

    if on_plan is not None:
        on_plan(PackPlan(list(specs), attacks is None, dev.type, choice))
    source_note = f"crafted on the PyTorch model ({dev.type}, white-box)"
    logits_clean = partial.clean(y_np, int(meta.num_classes)) if partial is not None else None
    if logits_clean is None:
        report(0, "clean")
        logits_clean = logits_of(x, "clean")
    adv, logits_adv, records = [], [], []
    for i, attack in enumerate(atks):
        saved = partial.take(attack, x_np, y_np, logits_clean) if partial is not None else None
        if saved is not None:
            xa_saved, la_saved, rec = saved
            adv.append(xa_saved)
            logits_adv.append(la_saved)
            records.append({"index": i, "name": attack.name, "label": attack.label, "eps": attack.eps,
                            "settings": attack.describe(), "seconds": round(rec.seconds, 3), "source": source_note})
            continue
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        parts = []
        report(0, attack.label)
        for s in range(0, total, batch_size):
            xb, yb = x[s:s + batch_size].to(dev), y[s:s + batch_size].to(dev)
            xa = attack.run(model, xb, yb).detach()
            check_budget(xa, xb, attack.eps, attack.label)
            parts.append(xa.float().cpu())
            report(min(s + batch_size, total), attack.label)
        xa_all = torch.cat(parts) if parts else x.clone()
        seconds = time.perf_counter() - t0
        adv.append(np.ascontiguousarray(xa_all.numpy(), dtype=np.float32))
        logits_adv.append(logits_of(xa_all))
        records.append({"index": i, "name": attack.name, "label": attack.label, "eps": attack.eps,
                        "settings": attack.describe(), "seconds": round(seconds, 3), "source": source_note})
        if partial is not None:
            partial.save(attack, adv[-1], logits_adv[-1], y_np, logits_clean, seconds, dev.type, batch_size)
    sections: list[ArtifactSection] = []
    for job in jobs:
        section = partial.take_section(job, x_np, y_np) if partial is not None else None
        if section is None:
            report(0, f"white-box on {job.path.name}")
            section = build_section(
                job.index, job.path, x_np, y_np, eps=eps_value, model_sha256=model_sha,
                num_classes=int(meta.num_classes), attacks=art_atks, seed=seed, batch_size=batch_size,
                device=dev.type, threads=threads, adversarial=adv[0] if adv else None,
                allow_untrusted_twin=allow_untrusted_twin,
                progress=(lambda d, t, stage=None, _n=job.path.name: progress(d, t, stage=f"{_n}: {stage}"))
                if progress is not None else None)
            if partial is not None:
                partial.save_section(job, section, y_np, dev.type, batch_size)
        sections.append(section)
    model_info = {"source": str(source), "checkpoint": str(ckpt), "sha256": model_sha,
                  "metadata_sha256": sha256_file(meta_file) if meta_file.is_file() and ckpt.suffix == ".safetensors"
                  else None, "arch": meta.arch, "recipe_hash": meta.recipe_hash, "role": meta.role,
                  "num_classes": int(meta.num_classes), "classes": list(meta.classes),
                  "input_shape": [int(v) for v in meta.input_shape], "dataset": meta.dataset or ds_name,
                  "eps": meta.eps}
    data_info = {"dataset": ds_name, "split": "test", "n": total, "seed": seed, "sampling": "class-stratified",
                 "indices": indices}
    return pack_from_arrays(x_np, y_np, logits_clean, records, adv, logits_adv, model=model_info,
                            data=data_info, eps=eps_value, device=str(dev), tool=f"ciard-deploy {__version__}",
                            artifacts=sections)


def pack_from_arrays(x: np.ndarray, y: np.ndarray, logits_clean: np.ndarray, attacks: Sequence[dict[str, Any]],
                     adv: Sequence[np.ndarray], logits_adv: Sequence[np.ndarray], *, model: dict[str, Any],
                     data: dict[str, Any], eps: float, device: str = "cpu", tool: str | None = None,
                     artifacts: Sequence[ArtifactSection] = ()) -> RobustnessPack:
    """Assembles a pack from arrays made elsewhere (``build_pack`` uses it; so can other frameworks).

    Args:
        x, y: clean images (float32 NCHW in [0, 1]) and int64 labels.
        logits_clean: the reference model's logits on ``x``.
        attacks: one record per attack: at least ``name``, ``label`` and ``eps`` (plus ``settings``, ``seconds``).
        adv, logits_adv: each attack's images and the reference logits on them, in ``attacks`` order.
        model: at least ``num_classes``, ``input_shape`` and ``sha256`` of the reference checkpoint.
        data: at least ``dataset``, ``seed`` (``n``, ``split``, ``sampling``, ``indices`` recommended).
        eps: the pack's L-inf budget.
        device: where the reference ran.
        tool: the producing tool (default: this ciard-deploy).
        artifacts: white-box sections made on exported artifacts (``verify.pack_artifacts``), in index order.

    The result is not validated until saved and loaded again (``load_pack``).
    """
    from ciard_deploy import __version__
    from ciard_deploy.attacks.base import format_eps
    from ciard_deploy.io import library_versions

    xs = np.ascontiguousarray(x, dtype=np.float32)
    ys = np.asarray(y).astype(np.int64)
    lc = np.ascontiguousarray(logits_clean, dtype=np.float32)
    advs = [np.ascontiguousarray(a, dtype=np.float32) for a in adv]
    ladv = [np.ascontiguousarray(a, dtype=np.float32) for a in logits_adv]
    records = [{"index": i, **dict(a)} for i, a in enumerate(attacks)]
    flags = reference_flags(ys, lc, ladv)
    worst = flags.all(axis=0)
    reference = {"backend": "torch", "device": device, "precision": "fp32", "clean_acc": float(flags[0].mean()),
                 "robust_acc": {a["label"]: float(f.mean()) for a, f in zip(records, flags[1:])},
                 "worst_case_label": worst_case_label(records) if records else None,
                 "worst_case_acc": float(worst.mean()) if records else None,
                 "per_sample": "ref_correct array: row 0 clean, row 1+i attack i (correct on clean and under it)"}
    meta = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "tool": tool or f"ciard-deploy {__version__}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": dict(model), "data": {"n": len(ys), **data},
            "eps": float(eps), "eps_label": format_eps(float(eps)), "attacks": records, "reference": reference,
            "versions": library_versions(), "artifacts": [dict(a.meta) for a in artifacts]}
    return RobustnessPack(x=xs, y=ys, logits_clean=lc, adv=advs, logits_adv=ladv, meta=meta, artifacts=list(artifacts))


__all__ = ["ARTIFACT_ARRAYS", "ArtifactSection", "DEFAULT_ATTACKS", "EPS_TOLERANCE", "FORMAT", "OnMismatch",
           "PARTIAL_KIND", "PackKey", "PackMetadata", "PackPartial", "PackPlan", "SCHEMA_VERSION", "RobustnessPack", "build_pack", "check_output",
           "check_partial_dir", "checksum_arrays", "default_attacks", "discard_partial", "load_pack",
           "pack_from_arrays", "partial_dir", "read_npz", "read_partial", "reference_flags", "save_pack", "worst_case_label"]


def _eps_text(eps: float) -> str:
    """An eps in a message as people write it (``8/255``, not 0.0313725)."""
    from ciard_deploy.attacks.base import format_eps

    return format_eps(float(eps))
