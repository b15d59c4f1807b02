"""Reading a robustness pack from disk, bounded and validated: a pack may come from anywhere, so
nothing is trusted before it is checked (``load_pack``).

Reading is bounded before anything is inflated (``read_npz``: member count, header size,
compression ratio, dtypes; no pickle); the metadata is typed (``PackMetadata``, strict pydantic
models with limits); the arrays are checked against it (shapes, dtypes, finite values, images in
[0, 1] and within eps of their clean images, the reference flags) and the checksum over all of them.
The format itself and writing it: ``verify/pack.py``. numpy only.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ciard_deploy.attacks.budget import format_eps
from ciard_deploy.errors import ArtifactError
from ciard_deploy.fingerprint import checksum_arrays, sha256_file
from ciard_deploy.limits import (MAX_ATTACKS, MAX_ARTIFACTS, MAX_INFLATE_RATIO, MAX_NPY_HEADER, MAX_NPZ_MEMBERS,
                                 MIN_INFLATE_CHECK, ClassNames, Eps, Finite, Fraction, LimitError, NumClasses,
                                 ShortText, TrainingEps, check_image_shape, loads_json, schema_problems)
from ciard_deploy.verify.pack import (ARTIFACT_ARRAYS, EPS_TOLERANCE, FORMAT, SCHEMA_VERSION, ArtifactSection,
                                      RobustnessPack)


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
    sections = validate_artifacts(p, arrays, meta, x, y, k)
    listed |= {key for sec in sections if sec.x_adv is not None for key in sec.arrays()}
    extra = sorted(key for key in arrays if key.startswith(("adv_", "logits_adv_", "art_")) and key not in listed)
    if extra:
        raise _bad(p, f"has arrays {', '.join(extra)} that its metadata does not list")
    pack = RobustnessPack(x=x, y=y, logits_clean=lc, adv=adv, logits_adv=ladv, meta=meta, path=p, artifacts=sections)
    if "ref_correct" in arrays and not np.array_equal(arrays["ref_correct"].astype(bool), pack.ref_flags):
        raise _bad(p, "stored per-sample reference flags disagree with the stored logits")
    return pack


def validate_artifacts(p: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any], x: np.ndarray, y: np.ndarray,
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



def _eps_text(eps: float) -> str:
    """An eps in a message as people write it (``8/255``, not 0.0313725)."""
    return format_eps(float(eps))


__all__ = ["PackMetadata", "load_pack", "read_npz", "validate_artifacts"]
