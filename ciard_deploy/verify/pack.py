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
    meta             <U      (1,)                     JSON metadata (below)
    checksum         <U      (1,)                     "sha256:<hex>" over every other array

``meta`` holds: ``format``, ``schema_version``, ``tool``, ``created``; ``model`` (source,
checkpoint, sha256, metadata_sha256, arch, recipe_hash, role, num_classes, classes,
input_shape, dataset, eps); ``data`` (dataset, split, n, seed, sampling, indices); ``eps``,
``eps_label``; ``attacks`` (index, name, label, eps, settings, seconds, source);
``reference`` (backend, device, precision, clean_acc, robust_acc by label,
worst_case_label, worst_case_acc); ``versions``. Attack ``i`` is ``adv_<i>``: labels such
as ``pgd20@8/255`` hold a ``/`` and are not used as array names.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ciard_deploy.errors import ArtifactError, UsageError

FORMAT = "ciard-robustness-pack"
SCHEMA_VERSION = 1
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

    def summary(self) -> dict[str, Any]:
        """Everything but the arrays: for reports (path, hashes, sample, model, attacks, reference)."""
        return {"path": str(self.path) if self.path else None, "file_sha256": self.file_sha256 or None,
                "checksum": self.checksum or None, "format": self.meta.get("format"),
                "schema_version": self.meta.get("schema_version"), "n": self.n, "eps": self.eps,
                "eps_label": self.meta.get("eps_label"), "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "model": self.meta["model"],
                "data": {k: v for k, v in self.meta["data"].items() if k != "indices"},
                "attacks": self.attacks, "reference": self.reference, "versions": self.meta.get("versions", {}),
                "created": self.meta.get("created"), "tool": self.meta.get("tool")}

    # ---------------------------------------------------------------- arrays
    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays as stored (without ``checksum``)."""
        out: dict[str, np.ndarray] = {"x": self.x, "y": self.y, "logits_clean": self.logits_clean}
        for i, (a, la) in enumerate(zip(self.adv, self.logits_adv)):
            out[f"adv_{i}"] = a
            out[f"logits_adv_{i}"] = la
        out["ref_correct"] = self.ref_flags
        out["meta"] = np.array([json.dumps(self.meta, sort_keys=True)])
        return out


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


# --------------------------------------------------------------------------- load
def _bad(path: Path, what: str) -> ArtifactError:
    return ArtifactError(f"robustness pack {path.name}: {what}")


def load_pack(path: str | os.PathLike) -> RobustnessPack:
    """Reads and validates a pack; any problem is an ``ArtifactError`` (exit 2) with one line.

    Checks, in order: the file is a readable ``.npz`` without pickled objects; it is a ciard
    pack of a schema this version reads; the checksum; dtypes and shapes against the
    metadata; every image finite and in [0, 1]; labels in range; every adversarial image
    within its attack's eps (L-inf, 1e-6 slack) of its clean image; the stored per-sample
    flags agree with the stored logits.
    """
    from ciard_deploy.io import sha256_file

    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"robustness pack not found: {p}" + (" (a folder)" if p.is_dir() else "")
                            + "; build one with ciard pack")
    if not zipfile.is_zipfile(p):
        raise _bad(p, "not a valid .npz archive; truncated or corrupt? rebuild it with ciard pack")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise _bad(p, "holds pickled objects; packs are plain arrays (refusing to load it)") from None
        raise _bad(p, f"not a valid .npz archive ({e}); truncated or corrupt? rebuild it with ciard pack") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise _bad(p, f"not a valid .npz archive ({type(e).__name__}: {e}); truncated or corrupt? "
                      "rebuild it with ciard pack") from None
    for key in ("meta", "checksum", "x", "y", "logits_clean"):
        if key not in arrays:
            raise _bad(p, f"has no {key!r} array; not a ciard robustness pack")
    try:
        meta = json.loads(str(arrays["meta"].reshape(-1)[0]))
        stored = str(arrays["checksum"].reshape(-1)[0])
    except (json.JSONDecodeError, IndexError, TypeError, ValueError) as e:
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
        pack = _validate(p, arrays, meta)
    except KeyError as e:
        raise _bad(p, f"metadata lacks {e}") from None
    pack.checksum, pack.file_sha256 = stored, sha256_file(p)
    return pack


def _validate(p: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> RobustnessPack:
    model, attacks = meta["model"], meta["attacks"]
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
        eps = float(a["eps"])
        dist = np.abs(xa - x).reshape(n, -1).max(axis=1)
        over = np.flatnonzero(dist > eps + EPS_TOLERANCE)
        if len(over):
            raise _bad(p, f"{len(over)} {a['label']} image(s) lie outside eps {eps:.6g} of their clean image "
                          f"(max L-inf distance {float(dist.max()):.6g}, e.g. image {int(over[0])}); not a valid attack")
        _check_logits(p, kl, arrays[kl], n, k)
        adv.append(xa)
        ladv.append(arrays[kl])
    listed = {f"adv_{i}" for i in range(len(attacks))} | {f"logits_adv_{i}" for i in range(len(attacks))}
    extra = sorted(key for key in arrays if key.startswith(("adv_", "logits_adv_")) and key not in listed)
    if extra:
        raise _bad(p, f"has arrays {', '.join(extra)} that its metadata does not list")
    pack = RobustnessPack(x=x, y=y, logits_clean=lc, adv=adv, logits_adv=ladv, meta=meta, path=p)
    if "ref_correct" in arrays and not np.array_equal(arrays["ref_correct"].astype(bool), pack.ref_flags):
        raise _bad(p, "stored per-sample reference flags disagree with the stored logits")
    return pack


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


def build_pack(source: str | os.PathLike, *, dataset: str | None = None, n: int = 1000,
               attacks: Sequence[str] = ("pgd20", "cw30", "aa"), eps: float | str = "8/255", seed: int = 0,
               data_root: str | None = None, download: bool = False, device: str = "auto", batch_size: int = 256,
               arch: str | None = None, step_size: float | str | None = None,
               progress: Progress | None = None) -> RobustnessPack:
    """Builds a pack on the machine with PyTorch: sample, attack, record the reference.

    Args:
        source: run dir (its best student), ciard checkpoint, or a plain state dict with ``arch``.
        dataset: dataset of the test sample (default: the checkpoint's).
        n: test images (seeded, class-stratified; all of the split if it has fewer).
        attacks: attack specs (``pgd20``, ``cw30``, ``fgsm``, ``aa``, ...), each run on every image.
        eps: L-inf budget, e.g. ``"8/255"`` or 0.1.
        seed: seed of the sample and of every attack's randomness.
        data_root, download: where the dataset lives / fetch it if absent (torchvision sets).
        device: where the model and attacks run (``auto``, ``cpu``, ``cuda``, ...).
        batch_size: images per attack call.
        arch: architecture of a plain state dict without ciard metadata.
        step_size: step of the iterative attacks that take one (pgd, cw; default: each attack's own,
            2/255, made for 8/255 on CIFAR: at larger budgets pass about eps/4, or the attack cannot
            reach the edge of the ball in its steps). ``"2/255"`` strings are accepted.
        progress: ``callback(done, total, stage=...)``; stages ``"clean"`` and each attack label.

    Returns:
        the pack (not yet saved: ``save_pack``).

    Raises:
        UsageError: bad n, batch size, eps, attack name, or a dataset that does not fit the model.
        ArtifactError: the checkpoint is missing or corrupt.
        BackendUnavailable: PyTorch is not installed here (exit 3): packs are built where it is.
    """
    from ciard_deploy.runtime.torch_backend import import_torch

    torch = import_torch()
    from ciard_deploy import __version__
    from ciard_deploy.attacks.base import parse_eps
    from ciard_deploy.attacks.cascade import check_budget
    from ciard_deploy.data import load_test_set_for
    from ciard_deploy.devices import resolve_device
    from ciard_deploy.io import checkpoint_paths, load_model, resolve_checkpoint, sha256_file

    if n <= 0:
        raise UsageError(f"--n must be positive, got {n}")
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    eps_value = parse_eps(eps)
    step = None
    if step_size is not None:
        step = parse_eps(step_size)
        if step <= 0:
            raise UsageError(f"--step-size must be positive, got {step_size}")
    specs = [s.strip() for s in attacks if s and s.strip()]
    atks = [_make_attack(s, eps_value, seed, step) for s in specs]  # names checked before loading anything
    labels = [a.label for a in atks]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise UsageError(f"attack(s) listed twice: {', '.join(dupes)}")
    dev = resolve_device(device)
    model, meta = load_model(source, arch=arch, dataset=dataset, data_root=data_root)
    model = model.to(dev).eval()
    ds_name, ds = load_test_set_for(meta, dataset, data_root, download, n, seed)
    x, y = ds.tensors()
    ckpt = resolve_checkpoint(source)
    meta_file = checkpoint_paths(ckpt)[1]
    total = len(y)

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

    report(0, "clean")
    logits_clean = logits_of(x, "clean")
    adv, logits_adv, records = [], [], []
    for i, attack in enumerate(atks):
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
                        "settings": attack.describe(), "seconds": round(seconds, 3),
                        "source": f"crafted on the PyTorch model ({dev.type}, white-box)"})
    model_info = {"source": str(source), "checkpoint": str(ckpt), "sha256": sha256_file(ckpt),
                  "metadata_sha256": sha256_file(meta_file) if meta_file.is_file() and ckpt.suffix == ".safetensors"
                  else None, "arch": meta.arch, "recipe_hash": meta.recipe_hash, "role": meta.role,
                  "num_classes": int(meta.num_classes), "classes": list(meta.classes),
                  "input_shape": [int(v) for v in meta.input_shape], "dataset": meta.dataset or ds_name,
                  "eps": meta.eps}
    data_info = {"dataset": ds_name, "split": "test", "n": total, "seed": seed, "sampling": "class-stratified",
                 "indices": [int(i) for i in ds.indices.tolist()] if ds.indices is not None else None}
    return pack_from_arrays(x.numpy(), y.numpy(), logits_clean, records, adv, logits_adv, model=model_info,
                            data=data_info, eps=eps_value, device=str(dev), tool=f"ciard-deploy {__version__}")


def pack_from_arrays(x: np.ndarray, y: np.ndarray, logits_clean: np.ndarray, attacks: Sequence[dict[str, Any]],
                     adv: Sequence[np.ndarray], logits_adv: Sequence[np.ndarray], *, model: dict[str, Any],
                     data: dict[str, Any], eps: float, device: str = "cpu", tool: str | None = None) -> RobustnessPack:
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
            "versions": library_versions()}
    return RobustnessPack(x=xs, y=ys, logits_clean=lc, adv=advs, logits_adv=ladv, meta=meta)


__all__ = ["EPS_TOLERANCE", "FORMAT", "SCHEMA_VERSION", "RobustnessPack", "build_pack", "check_output",
           "checksum_arrays", "load_pack", "pack_from_arrays", "reference_flags", "save_pack", "worst_case_label"]
