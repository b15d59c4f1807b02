"""``export.run``: a student in, checked artifacts and ``manifest.json`` out.

Order of work, so that bad input costs nothing and writes nothing:

1. validate options and formats; each format's runtime checks what it needs first (TensorRT and a GPU
   for an engine, the execution provider for an ONNX file: ``check_environment``, exit 3);
2. check the output folder (existing outputs need ``force``; it must be writable);
3. load the checkpoint, the dataset's description and the parity images;
4. in a staging folder beside the output: PyTorch reference logits (clean and under the
   reference attack), then each exporter in dependency order, each artifact re-opened in
   its own runtime session and compared with PyTorch on the same images;
5. the manifest, then every file renamed into the output folder (manifest last).

An artifact below its agreement threshold is kept and marked ``failed`` in the manifest;
``run`` then raises GateFailed (exit 1) unless ``check=False``.

The whole call holds the output folder's lock (``lock.folder_lock``; made for it, and removed again
if the call leaves it empty): a second export into the same folder is refused (exit 2, naming the
holder's pid). A staging folder (``.OUT.export-XXXXXXXX``) is removed when the call ends, however it
ends; one left by a killed export is removed by the next export into the same folder.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ciard_deploy import __version__
from ciard_deploy.attacks.base import create_attack
from ciard_deploy.checkpoints import checkpoint_paths, resolve_checkpoint
from ciard_deploy.errors import GateFailed, UsageError
from ciard_deploy.fingerprint import sha256_file
from ciard_deploy.io import library_versions, write_blocker
from ciard_deploy.lock import holding
from ciard_deploy.export.base import FORMATS, FormatSpec, check_environment, resolve_formats
from ciard_deploy.export.manifest import MANIFEST_NAME, ArtifactRecord, Manifest, load_manifest
from ciard_deploy.export.parity_gate import compare_logits
from ciard_deploy.export.quantize import build_calibration_set
from ciard_deploy.fingerprint import float32_sha256
from ciard_deploy.options.export import ExportOptions
from ciard_deploy.runtime import open_backend
from ciard_deploy.runtime.base import OUTPUT_NAME, InputSpec
from ciard_deploy.runtime.metadata import SCHEMA as ARTIFACT_SCHEMA
from ciard_deploy.runtime.parity_metrics import accuracy

log = logging.getLogger(__name__)
Progress = Callable[..., None]


@dataclass
class ExportResult:
    """What ``run`` made: the manifest (also on disk) and where."""

    manifest: Manifest
    out_dir: Path

    @property
    def passed(self) -> bool:
        return self.manifest.passed

    def failures(self) -> list[str]:
        out = []
        for a in self.manifest.artifacts:
            if not a.passed:
                p = a.parity.get("clean", {})
                bad = {k: v["nonfinite"] for k, v in a.parity.items() if isinstance(v, dict) and v.get("nonfinite")}
                if bad:  # a broken artifact, whatever its agreement
                    out.append(f"{a.file}: NaN/inf logits for " + ", ".join(
                        f"{k} of {a.parity[name].get('n', '?')} {name} images" for name, k in bad.items()))
                else:
                    out.append(f"{a.file}: top-1 agreement {p.get('top1_agreement', 0):.2%} < "
                               f"{p.get('threshold', 0):.2%}")
        return out

    def path(self, name: str) -> Path:
        return self.out_dir / self.manifest.artifact(name).file


@dataclass
class ExportContext:
    """What exporters read: the model, options, earlier artifacts, the calibration set."""

    model: Any
    meta: Any
    options: ExportOptions
    staging: Path
    dataset: str
    eps: float | None
    source: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    _calibration: tuple[np.ndarray, dict[str, Any]] | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.meta.input_shape)  # type: ignore[return-value]

    def input_spec(self, spec: FormatSpec) -> InputSpec:
        o = self.options
        # a format with an optimization profile (it uses max_batch) bounds a dynamic batch
        max_batch = o.max_batch if "max_batch" in spec.options and o.batch == "dynamic" else None
        return InputSpec(shape=self.input_shape, batch=o.batch, max_batch=max_batch)

    def warn(self, message: str) -> None:
        log.warning(message)
        self.warnings.append(message)

    def path_of(self, name: str) -> Path:
        return self.paths[name]

    def record_of(self, name: str) -> dict[str, Any]:
        return self.records[name]

    def calibration(self) -> tuple[np.ndarray, dict[str, Any]]:
        """The calibration set (built once, shared by the INT8 ONNX and a calibrated engine)."""
        if self._calibration is None:
            o = self.options
            self._calibration = build_calibration_set(self.model, self.dataset, o.calib, o.calib_n, o.seed, self.eps,
                                                      o.calib_attack, o.data_root)
        return self._calibration

    def artifact_metadata(self, spec: FormatSpec, opset: int | None, calibration: dict[str, Any] | None = None,
                          engine: dict[str, Any] | None = None) -> dict[str, Any]:
        """The metadata written into the artifact itself (ONNX metadata_props or engine sidecar)."""
        m = self.meta
        versions = {k: v for k, v in library_versions().items() if k in ("torch", "onnx", "onnxruntime", "tensorrt")}
        return {"schema": ARTIFACT_SCHEMA, "arch": m.arch, "num_classes": int(m.num_classes),
                "classes": list(m.classes), "input_spec": self.input_spec(spec).to_dict(),
                "normalization": {"mean": list(m.mean), "std": list(m.std), "inside_model": True},
                "dataset": self.dataset, "eps": self.eps, "recipe_hash": m.recipe_hash,
                "source_sha256": self.source["sha256"], "precision": spec.precision, "format": spec.format,
                "opset": opset, "calibration": calibration, "versions": versions, "engine": engine}


# --------------------------------------------------------------------------- checks before any work
def check_output(out_dir: Path, files: Sequence[str], force: bool) -> None:
    """Refuses an output folder that would overwrite files without ``force`` or cannot be written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a folder")
    if out_dir.is_dir() and not force:
        clash = [f for f in files if (out_dir / f).exists()]
        if clash:
            raise UsageError(f"{out_dir} already holds {', '.join(clash)}; pass --force to overwrite")
    blocker = write_blocker(out_dir)
    if blocker:
        raise UsageError(f"cannot write to --out {out_dir}: {blocker}")


def _planned_files(names: Sequence[str]) -> list[str]:
    return [f for n in names for f in FORMATS.get(n).files()] + [MANIFEST_NAME]


def source_info_of(source: str | Path, meta: Any) -> dict[str, Any]:
    ckpt = resolve_checkpoint(source)
    meta_file = checkpoint_paths(ckpt)[1]
    run_dir = Path(source) if Path(source).is_dir() else ckpt.parent
    recipe = run_dir / "recipe.yaml"
    return {"path": str(source), "checkpoint": str(ckpt), "sha256": sha256_file(ckpt),
            "metadata_sha256": sha256_file(meta_file) if meta_file.is_file() and ckpt.suffix == ".safetensors" else None,
            "arch": meta.arch, "role": meta.role, "recipe_hash": meta.recipe_hash,
            "recipe_file": str(recipe) if recipe.is_file() else None,
            "recipe_file_sha256": sha256_file(recipe) if recipe.is_file() else None}


def export_versions() -> dict[str, str]:
    """library_versions() plus the export tool chain (onnxscript, polygraphy, simplifiers) where installed."""
    from importlib.metadata import PackageNotFoundError, version

    out = library_versions()
    for pkg in ("onnxscript", "polygraphy", "onnxslim", "onnxsim"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    out.setdefault("tensorrt", "not installed")
    return out


def _batched(fn: Callable[[Any], Any], x: Any, batch_size: int = 256) -> list[Any]:
    return [fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]


@dataclass
class Reference:
    """The PyTorch student's logits on the parity images (and on their adversarial versions)."""

    images: np.ndarray
    labels: np.ndarray
    logits: np.ndarray
    record: dict[str, Any]
    attack: str | None = None
    adv_images: np.ndarray | None = None
    adv_logits: np.ndarray | None = None


def measure_reference(model: Any, x: Any, y: Any, attack: Any = None, batch_size: int = 256) -> Reference:
    """Clean logits of the FP32 student on ``x`` and, with ``attack``, logits on its adversarial images."""
    import torch

    def logits_of(images: Any) -> np.ndarray:
        with torch.no_grad():
            return torch.cat(_batched(model, images, batch_size)).float().numpy()

    xs, ys = x.numpy(), y.numpy()
    ref = Reference(xs, ys, logits_of(x), {})
    ref.record = {"backend": "torch", "device": "cpu", "precision": "fp32", "split": "test", "n": len(ys),
                  "sampling": "class-stratified", "images_sha256": float32_sha256(xs),
                  "clean_acc": accuracy(ref.logits, ys), "attacks": {}}
    if attack is not None:
        x_adv = torch.cat([attack.run(model, x[i:i + batch_size], y[i:i + batch_size])
                           for i in range(0, len(x), batch_size)])
        ref.attack, ref.adv_images, ref.adv_logits = attack.label, x_adv.numpy(), logits_of(x_adv)
        ref.record["attacks"][attack.label] = {"robust_acc": accuracy(ref.adv_logits, ys),
                                               "settings": attack.describe(),
                                               "images_sha256": float32_sha256(ref.adv_images)}
    return ref


def check_artifact(rec: ArtifactRecord, path: Path, ref: Reference, opts: ExportOptions) -> None:
    """Opens ``path`` in a fresh session of its runtime, compares it with the reference, fills ``rec``
    (parity, metrics, status, size, sha256)."""
    with open_backend(path, **FORMATS.get(rec.name).backend.open_options(opts.provider, opts.threads)) as backend:
        logits = backend.predict(ref.images)
        clean = compare_logits(ref.logits, logits, opts.threshold(rec.precision))
        rec.parity = {"clean": {**clean.to_dict(), "summary": clean.summary()}}
        rec.metrics = {"clean_acc": accuracy(logits, ref.labels)}
        adv_ok = True  # NaN/inf logits on the adversarial images fail the artifact too (no threshold there)
        if ref.adv_images is not None:
            adv = backend.predict(ref.adv_images)
            adv_parity = compare_logits(ref.adv_logits, adv)
            adv_ok = adv_parity.passed
            rec.parity["adversarial"] = {"attack": ref.attack, "source": "crafted on the PyTorch FP32 student",
                                         **adv_parity.to_dict()}  # type: ignore[arg-type]
            rec.metrics[f"{ref.attack} (transfer)"] = accuracy(adv, ref.labels)
        rec.parity["runtime"] = backend.describe()
    rec.status = "passed" if clean.passed and adv_ok else "failed"
    rec.size = path.stat().st_size
    rec.sha256 = sha256_file(path)


# --------------------------------------------------------------------------- the entry point
STAGING_INFIX = ".export-"


def _staging_pattern(out: Path) -> re.Pattern[str]:
    """Names of the staging folders of exports into ``out`` (``tempfile.mkdtemp``'s 8 random characters)."""
    return re.compile(re.escape(f".{out.name}{STAGING_INFIX}") + r"[A-Za-z0-9_]{8}")


def remove_stale_staging(out: Path) -> list[Path]:
    """Removes the staging folders an earlier export into ``out`` left beside it when it was killed (SIGKILL,
    power loss: no ``finally`` ran); returns them. Called holding ``out``'s lock, so none is in use."""
    if not out.parent.is_dir():
        return []
    pattern = _staging_pattern(out)
    stale = [p for p in out.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    for p in stale:
        log.info("removing %s, the staging folder of an export into %s that did not finish", p, out)
        shutil.rmtree(p, ignore_errors=True)
    return stale


@holding("out_dir")
def run(source: str | os.PathLike, out_dir: str | os.PathLike, formats: Sequence[str],
        options: ExportOptions | None = None, *, force: bool = False, progress: Progress | None = None,
        check: bool = True, **overrides: Any) -> ExportResult:
    """Exports a student to the chosen formats, checks each artifact by running it, writes the manifest.

    Args:
        source: run dir (its best student), ciard checkpoint, or a plain state dict with ``arch``.
        out_dir: output folder (created; existing outputs need ``force``).
        formats: names from ``FORMATS`` (``onnx``, ``onnx-fp16``, ``onnx-int8``, ``tensorrt-fp32``,
            ``tensorrt-fp16``, ``tensorrt-int8``); the formats they consume are added.
        options: ExportOptions (defaults otherwise); ``**overrides`` replace single fields.
        force: overwrite existing outputs.
        progress: callback ``(done, total, stage=...)``.
        check: raise GateFailed when an artifact misses its agreement threshold (after writing
            everything, the failing artifact marked in the manifest).

    Returns:
        ExportResult with the manifest.

    Raises:
        UsageError / ArtifactError / DataError: bad input (exit 2), nothing written.
        InUse: another export into ``out_dir`` is running (exit 2), nothing written.
        BackendUnavailable: TensorRT or a GPU missing for a TensorRT format (exit 3), nothing written.
        GateFailed: an artifact below its threshold (exit 1), everything written.
    """
    from ciard_deploy.data import create_dataset, get_dataset_info  # imports torch: `import export` stays torch-free
    from ciard_deploy.model_loader import load_model  # imports torch

    opts = (options or ExportOptions()).with_overrides(**overrides).validate()
    names = resolve_formats(list(formats), opts)
    check_environment(names, opts.provider)
    out = Path(out_dir)
    check_output(out, _planned_files(names), force)

    model, meta = load_model(source, arch=opts.arch, dataset=opts.dataset, data_root=opts.data_root)
    model = model.cpu().eval()
    ds_name = opts.dataset or meta.dataset
    if not ds_name:
        raise UsageError("the checkpoint names no dataset: pass --dataset for the parity and calibration images")
    info = get_dataset_info(ds_name, opts.data_root)
    if tuple(info.input_shape) != tuple(meta.input_shape) or info.num_classes != meta.num_classes:
        raise UsageError(f"dataset {ds_name} has {info.num_classes} classes of shape {tuple(info.input_shape)} but the "
                         f"model takes {tuple(meta.input_shape)} with {meta.num_classes} classes")
    eps = float(opts.eps) if opts.eps is not None else (float(meta.eps) if meta.eps is not None else None)
    calibrated = any(FORMATS.get(n).calibrated_for(opts) for n in names)
    if calibrated and opts.calib != "clean":
        if eps is None:
            raise UsageError(f"--calib {opts.calib} needs an eps: the checkpoint has none, pass --eps")
        create_attack(opts.calib_attack, eps)  # an unknown attack name fails now, not after the export
    ref_attack = create_attack(opts.reference_attack, eps, seed=opts.seed) \
        if opts.reference_attack and eps is not None else None
    test = create_dataset(ds_name, "test", root=opts.data_root, n=opts.n, seed=opts.seed)
    x, y = test.tensors()
    source_info = source_info_of(source, meta)

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_INFIX}", dir=out.parent))
    total = 1 + 2 * len(names)
    step = 0

    def tick(stage: str) -> None:
        nonlocal step
        step += 1
        if progress:
            progress(step, total, stage=stage)

    try:
        ctx = ExportContext(model, meta, opts, staging, ds_name, eps, source_info)
        if eps is None and opts.reference_attack:
            ctx.warn(f"no eps in the checkpoint or options: reference metrics are clean only (pass --eps for "
                     f"{opts.reference_attack})")

        ref = measure_reference(model, x, y, ref_attack)
        ref.record.update(dataset=ds_name, seed=opts.seed, checkpoint_metrics=dict(meta.metrics),
                          origin=f"measured by ciard export {__version__} on the PyTorch student (FP32, CPU) at "
                                 "export time")
        tick("reference")

        records: list[ArtifactRecord] = []
        extra_files: list[str] = []
        for name in names:
            spec = FORMATS.get(name)
            dest = staging / spec.filename
            t0 = time.perf_counter()
            try:
                details = spec.load().export(ctx, dest)
            except OSError as e:  # a full disk while writing it: exit 2 naming the file, the staging folder removed
                raise _for_output(e, staging, out / spec.filename) from e
            seconds = time.perf_counter() - t0
            tick(f"export {name}")
            ctx.paths[name] = dest
            ctx.records[name] = details
            extra_files += details.get("extra_files", [])
            ispec = ctx.input_spec(spec)
            rec = ArtifactRecord(
                name=name, file=spec.filename, format=spec.format, precision=spec.precision, runtime=spec.runtime,
                opset=details.get("opset"), ir_version=details.get("ir_version"), input_spec=ispec.to_dict(),
                output={"name": OUTPUT_NAME, "shape": [ispec.batch, int(meta.num_classes)], "dtype": "float32"},
                classes=list(meta.classes),
                normalization={"mean": list(meta.mean), "std": list(meta.std), "inside_model": True},
                exporter=details.get("exporter", {}), derived_from=details.get("derived_from"),
                calibration=details.get("calibration"), engine=details.get("engine"), sidecar=details.get("sidecar"),
                seconds=round(seconds, 3))
            check_artifact(rec, dest, ref, opts)
            if not rec.passed:
                ctx.warn(f"{spec.filename}: {rec.parity['clean']['summary']}")
            records.append(rec)
            tick(f"check {name}")

        versions = export_versions()
        calibration = next((r.calibration for r in records if r.calibration), None)
        manifest = Manifest(source=source_info,
                            model={"arch": meta.arch, "num_classes": int(meta.num_classes),
                                   "classes": list(meta.classes), "input_shape": list(meta.input_shape),
                                   "normalization": {"mean": list(meta.mean), "std": list(meta.std),
                                                     "inside_model": True},
                                   "dataset": ds_name, "eps": eps},
                            reference=ref.record, thresholds={p: opts.threshold(p) for p in ("fp32", "fp16", "int8")},
                            options=opts.to_dict(), artifacts=records, calibration=calibration, versions=versions,
                            warnings=ctx.warnings, tool=f"ciard-deploy {__version__}")
        _publish(staging, out, [r.file for r in records] + extra_files, manifest, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    result = ExportResult(manifest, out)
    if check and not result.passed:
        err = GateFailed(f"export check failed: {'; '.join(result.failures())} (artifacts kept, marked failed in "
                         f"{out / MANIFEST_NAME})")
        err.result = result  # type: ignore[attr-defined]
        raise err
    return result


def _for_output(e: OSError, staging: Path, target: Path) -> OSError:
    """``e`` naming ``target`` (the file in ``--out`` being made) when it names no file (a write that failed
    with ENOSPC names none) or a file in the hidden staging folder, which is removed before the user reads it."""
    name = e.filename
    inside = False
    if name is not None:
        try:
            Path(os.fsdecode(name)).resolve().relative_to(staging.resolve())
            inside = True
        except (ValueError, OSError, TypeError):
            inside = False
    if name is not None and not inside:
        return e
    return OSError(e.errno, e.strerror or str(e), str(target)) if e.errno is not None else e


def _publish(staging: Path, out: Path, files: list[str], manifest: Manifest, force: bool) -> None:
    """Renames the staged files into ``out`` (manifest last); with ``force``, removes the files an
    earlier manifest listed that this export no longer makes."""
    old: Manifest | None = None
    if force and (out / MANIFEST_NAME).is_file():
        try:
            old = load_manifest(out)
        except Exception:
            old = None
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        os.replace(staging / f, out / f)
    manifest.write(out)
    if old is not None:
        keep = set(files) | {MANIFEST_NAME}
        for a in old.artifacts:
            for f in (a.file, a.sidecar):
                if f and f not in keep and Path(f).name == f:
                    (out / f).unlink(missing_ok=True)
