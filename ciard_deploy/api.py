"""The Python API, for notebooks and scripts: the CLI's verbs as functions that return typed results
(README's "Python API" runs them end to end): ``distill``/``train`` -> ``DistillResult``, ``export`` ->
``ExportResult``, ``pack`` -> the saved ``RobustnessPack``, ``verify`` -> ``VerifyReport``; ``save_model``.

``cd.distill``, ``cd.export`` and ``cd.verify`` are the subpackages of those names, made callable
(``_lazy.callable_package``) to run the functions here; the other names are lazy attributes (PEP 562).

Recipes are files, shipped recipe names (``ciard recipe ls``) or dicts; ``overrides`` are the CLI's
``--set`` strings (``["train.epochs=3"]``) or a dict of dotted keys to values (``{"train.epochs": 3}``).
Models are run dirs, ciard checkpoints, results of an earlier call, or ``torch.nn.Module`` objects of a
registered architecture (``ciard_deploy.models.list_models()``): a module is saved as a ciard checkpoint
(``save_model``; given to ``export``/``pack``/``verify``/``distill(teachers=...)`` it is saved to
``$CIARD_CACHE/models/<hash>/``, one folder per weights and card, so the export manifest, the pack and
verify name the same file).

Errors are the CLI's (``ciard_deploy.errors``; the exit code the CLI gives each in brackets):
``RecipeError`` [2] a recipe or override that does not validate; ``UsageError`` [2] a bad argument (an
unknown name, a module of no registered architecture, a run dir that exists); ``ArtifactError`` [2] a
missing or mismatched checkpoint, export or pack; ``DataError`` [2] dataset files missing; ``InUse`` [2]
another process writes the same output; ``FileProblem`` [2] the operating system refused a file;
``EnvironmentMissing`` / ``BackendUnavailable`` [3] PyTorch (the ``train`` extra), a runtime or a GPU
missing; ``GateFailed`` [1] an export below its agreement threshold (``export(check=True)``, the default)
or a failing verify (``verify(check=True)``; by default verify returns the report, failed or not);
``TrainingInterrupted`` [130] Ctrl-C during training (the state is saved: call again with ``resume=True``).

Nothing here imports torch at import time: ``verify`` of an ONNX file against a pack runs where only
numpy and onnxruntime are installed.

Kept as one file: the API is one surface (a function per verb and its result type) read in one place.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ciard_deploy.checkpoints import (CheckpointMeta, checkpoint_paths, read_meta, resolve_checkpoint, save_checkpoint,
                                      unwrap_model)
from ciard_deploy.config import apply_overrides, find_recipe, load_raw, validate_recipe
from ciard_deploy.attacks.budget import parse_eps
from ciard_deploy.errors import (CiardError, GateFailed, RecipeError, UsageError, file_problem,
                                 missing_dependency)
from ciard_deploy.export.pipeline import ExportResult, run as run_export
from ciard_deploy.fingerprint import canonical_json_hash, sha256_file
from ciard_deploy.options.gates import Gates
from ciard_deploy.verify.gates import Policy, gates_from_mapping, load_gates
from ciard_deploy.verify.pack import RobustnessPack, check_output
from ciard_deploy.verify.pack_build import write_pack
from ciard_deploy.verify.pack_load import load_pack
from ciard_deploy.verify.pack_partial import check_partial_dir, partial_dir
from ciard_deploy.verify.report import VerifyReport
from ciard_deploy.verify.verification import run as run_verify

Overrides = Sequence[str] | Mapping[str, Any] | None


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class DistillResult:
    """What ``distill`` (or ``train``) made: the run dir, its final numbers and its checkpoints.

    ``best`` and ``last`` are the test-split metrics of the two checkpoints (``{"clean": 0.97,
    "pgd20@0.15": 0.61}``: robust ones named by attack and budget); ``summary`` is ``summary.json``.
    """

    run_dir: Path
    status: str  # complete, or partial (stopped early; resume=True continues it)
    best: dict[str, float]
    last: dict[str, float]
    best_epoch: int | None
    checkpoint: Path  # student_best.safetensors (its card student_best.json beside it)
    summary: dict[str, Any] = field(repr=False)

    @property
    def last_checkpoint(self) -> Path:
        return self.run_dir / "student_last.safetensors"

    def model(self, which: str = "best", device: str = "cpu") -> Any:
        """The trained ``torch.nn.Module`` (``which``: best or last), in eval mode; images in [0, 1]."""
        with _user_errors("DistillResult.model"):
            from ciard_deploy.model_loader import load_checkpoint  # imports torch

            return load_checkpoint(self.checkpoint if which == "best" else self.last_checkpoint, device)[0]


# --------------------------------------------------------------------------- training
def distill(recipe: str | os.PathLike | Mapping[str, Any], out: str | os.PathLike, *, overrides: Overrides = None,
            teachers: Mapping[str, Any] | None = None, resume: bool = False, device: str | None = None,
            callbacks: Any = None) -> DistillResult:
    """Distills a student (a kind ``distill`` recipe), as ``ciard distill RECIPE --out OUT``.

    Args:
        recipe: a recipe file, a shipped recipe name, or the recipe as a dict.
        out: the run dir (new or empty; with ``resume`` an earlier run's).
        overrides: ``--set`` strings or ``{dotted key: value}``, applied in order.
        teachers: ``{"clean"/"robust": teacher}`` replacing the recipe's: a ``torch.nn.Module`` of a
            registered architecture, a run dir, a ciard checkpoint, a ``DistillResult``, or a teacher
            section as a dict (``{"checkpoint": "robust.pt", "arch": "wrn-34-10"}``).
        resume: continue the run in ``out`` from its last saved state.
        device: overrides ``train.device`` (auto, cpu, cuda, cuda:N, mps).
        callbacks: called with each ``distill.TrainEvent`` (one callable or a list).

    Raises:
        RecipeError, UsageError, ArtifactError, DataError, InUse, EnvironmentMissing, TrainingInterrupted.
    """
    return _train("distill", recipe, out, overrides, teachers, resume, device, callbacks)


def train(recipe: str | os.PathLike | Mapping[str, Any], out: str | os.PathLike, *, overrides: Overrides = None,
          resume: bool = False, device: str | None = None, callbacks: Any = None) -> DistillResult:
    """Trains a teacher or a no-teacher baseline (a kind ``train`` recipe), as ``ciard train``; arguments,
    result and errors as ``distill``."""
    return _train("train", recipe, out, overrides, None, resume, device, callbacks)


def _train(kind: str, recipe: Any, out: Any, overrides: Overrides, teachers: Mapping[str, Any] | None,
           resume: bool, device: str | None, callbacks: Any) -> DistillResult:
    with _user_errors(f"ciard_deploy.{kind}"):
        from ciard_deploy.distill.trainer import run  # imports torch

        data, source = _recipe_data(recipe, overrides)
        if teachers:
            data = _with_teachers(data, teachers)
        rec = validate_recipe(data, source=source)
        if rec.kind != kind:
            other = "distill" if kind == "train" else "train"
            raise UsageError(f"{source or 'the recipe'} is a kind {rec.kind!r} recipe: run it with "
                             f"ciard_deploy.{other}(...)")
        run_dir = Path(out).absolute()  # results name absolute paths: a notebook may change its folder
        summary = run(rec, run_dir, resume=resume, device=device, callbacks=callbacks)
    return DistillResult(run_dir=run_dir, status=str(summary.get("status")), best=dict(summary.get("best") or {}),
                         last=dict(summary.get("last") or {}),
                         best_epoch=(summary.get("selection") or {}).get("best_epoch"),
                         checkpoint=run_dir / "student_best.safetensors", summary=summary)


def _recipe_data(recipe: Any, overrides: Overrides) -> tuple[dict[str, Any], Path | None]:
    """The recipe as plain data with ``overrides`` applied, and its file (None for a dict)."""
    if isinstance(recipe, Mapping):
        data, source = copy.deepcopy(dict(recipe)), None
    elif isinstance(recipe, (str, os.PathLike)):
        source = find_recipe(str(recipe))
        data = copy.deepcopy(load_raw(source))
    else:
        raise UsageError(f"recipe: expected a file, a shipped recipe name or a dict, got {type(recipe).__name__}")
    if overrides is None:
        return data, source
    if isinstance(overrides, str):
        raise UsageError(f"overrides: expected a list of 'key=value' strings or a dict, got the string {overrides!r} "
                         "(wrap it in a list)")
    if not isinstance(overrides, Mapping):
        return apply_overrides(data, list(overrides)), source
    for key, value in overrides.items():  # --set's dotted keys, the values as Python gives them (not re-parsed)
        keys = str(key).split(".")
        if not all(k.strip() for k in keys):
            raise RecipeError(f"overrides: {key!r} is not a dotted key, e.g. 'train.epochs'")
        node = data
        for i, k in enumerate(keys[:-1]):
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise RecipeError(f"overrides {key!r}: {'.'.join(keys[:i + 1])} is a value, not a section")
            node = node[k]
        node[keys[-1]] = str(value) if isinstance(value, os.PathLike) else value
    return data, source


def _with_teachers(data: dict[str, Any], teachers: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with each given teacher replacing the recipe's (a module saved to the model cache)."""
    unknown = sorted(set(teachers) - {"clean", "robust"})
    if unknown:
        raise UsageError(f"teachers: unknown role {unknown[0]!r}; roles are 'clean' and 'robust'")
    section = dict(data.get("data") or {})
    specs = dict(data.get("teachers") or {})
    for role, teacher in teachers.items():
        if isinstance(teacher, Mapping):
            specs[role] = dict(teacher)
            continue
        if _is_module(teacher):
            eps = (data.get("attack") or {}).get("eps")
            teacher = cached_model(teacher, dataset=section.get("dataset"), data_root=section.get("data_root"),
                                   eps=None if eps is None else parse_eps(eps), role=f"{role}_teacher")
        specs[role] = {"checkpoint": str(_checkpoint(teacher, f"teachers[{role!r}]"))}
    return {**data, "teachers": specs}


# --------------------------------------------------------------------------- export, pack, verify
def export(source: Any, out: str | os.PathLike, formats: Sequence[str] = ("onnx",), *, force: bool = False,
           check: bool = True, dataset: str | None = None, eps: float | str | None = None, arch: str | None = None,
           progress: Any = None, **options: Any) -> ExportResult:
    """Exports a student to ONNX (FP32, FP16, INT8) or TensorRT and checks each artifact against PyTorch,
    as ``ciard export``.

    Args:
        source: a ``DistillResult``, run dir, ciard checkpoint, a plain state dict (with ``arch`` and
            ``dataset``), or a ``torch.nn.Module`` (with ``dataset``; ``eps`` recorded if given).
        out: the output folder (artifacts and ``manifest.json``).
        formats: ``onnx``, ``onnx-fp16``, ``onnx-int8``, ``tensorrt-fp32``, ``tensorrt-fp16``, ``tensorrt-int8``.
        force: overwrite existing outputs.
        check: raise ``GateFailed`` when an artifact misses its agreement threshold (after writing everything).
        dataset, eps, arch: for a module or a plain state dict; else they override the checkpoint's.
        progress: ``callback(done, total, stage=...)``.
        **options: ``ExportOptions`` fields (``n``, ``calib``, ``calib_n``, ``opset``, ``provider``, ...).

    Returns:
        the ``ExportResult``: ``manifest`` (each artifact's parity and reference metrics), ``path(name)``.

    Raises:
        UsageError, ArtifactError, DataError, InUse (nothing written); BackendUnavailable; GateFailed.
    """
    with _user_errors("ciard_deploy.export"):
        src = _model_source(source, dataset=dataset, eps=eps, arch=arch, data_root=options.get("data_root"))
        if eps is not None:
            options["eps"] = parse_eps(eps)
        return run_export(src, Path(out).absolute(), list(formats), force=force, progress=progress, check=check,
                          **{"dataset": dataset, "arch": arch, **options})


def pack(source: Any, out: str | os.PathLike, *, n: int = 1000, attacks: Sequence[str] | None = None,
         eps: float | str | None = None, dataset: str | None = None, artifacts: Any = (),
         force: bool = False, **options: Any) -> RobustnessPack:
    """Builds and saves a robustness pack (test images, adversarial images crafted on the PyTorch model,
    its logits), as ``ciard pack``; resumable like it (``OUT.partial/`` beside ``out``).

    Args:
        source: as ``export`` (a module needs ``dataset``).
        out: the pack file (.npz); an existing one needs ``force``.
        n, attacks, eps, dataset: test images, white-box attacks (None: the device's defaults), L-inf
            budget (None: the checkpoint's), dataset (None: the checkpoint's).
        artifacts: exported ONNX files (or an ``ExportResult``: its ONNX files) to attack white-box
            themselves; ``artifact_attacks`` (in ``options``) says with what.
        **options: the other arguments of ``verify.build_pack`` (``seed``, ``device``, ``batch_size``,
            ``step_size``, ``data_root``, ``artifact_attacks``, ``progress``, ...).

    Returns:
        the saved ``RobustnessPack``: ``path``, ``n``, ``eps``, ``attack_labels``, ``reference`` (the PyTorch
        model's accuracy on it: ``{"clean": ..., "pgd20@0.15": ..., ...}``).

    Raises:
        UsageError, ArtifactError, DataError, InUse, EnvironmentMissing.
    """
    with _user_errors("ciard_deploy.pack"):
        src = _model_source(source, dataset=dataset, eps=eps, arch=options.get("arch"),
                            data_root=options.get("data_root"))
        if isinstance(artifacts, ExportResult):
            artifacts = [artifacts.out_dir / a.file for a in artifacts.manifest.artifacts if a.file.endswith(".onnx")]
        check_output(out, force)  # as `ciard pack`: refused before any work
        check_partial_dir(partial_dir(out))
        return write_pack(src, Path(out).absolute(), force=force, n=n,
                          attacks=None if attacks is None else list(attacks), eps=eps, dataset=dataset,
                          artifacts=[Path(a) for a in artifacts], **options)


def verify(artifact: Any, pack: str | os.PathLike | RobustnessPack, *,
           gates: Gates | Mapping[str, Any] | str | os.PathLike | None = None, allow_mismatch: bool = False,
           strict: bool = False, live: str | Sequence[str] | None = None, check: bool = False,
           **options: Any) -> VerifyReport:
    """Measures an artifact on its runtime against a pack and judges the gates, as ``ciard verify``.

    Args:
        artifact: an ``.onnx`` file (onnxruntime), a TensorRT engine, or on PyTorch: a checkpoint, run dir,
            ``DistillResult`` or ``torch.nn.Module`` (its dataset and eps taken from the pack).
        pack: the pack file or a ``RobustnessPack`` (what ``pack`` returns).
        gates: ``Gates``, ``{"min_clean": 0.9, "max_robust_drop": 0.02}`` or a gates YAML file (None: no
            gates; the status is then ``not_gated``).
        allow_mismatch, strict: the warning policy (``--allow-mismatch``, ``--strict``).
        live: query-only attacks run on the runtime (None: square1000; ``[]``: none).
        check: raise ``GateFailed`` when the report fails (otherwise see ``report.status``).
        **options: the other arguments of ``verify.run`` (``live_n``, ``provider``, ``batch_size``, ``seed``,
            ``threads``, ``state_path``, ``fresh``, ``progress``).

    Returns:
        the ``VerifyReport``: ``status`` (passed, failed, not_gated), ``metrics`` (``clean_acc``,
        ``worst_case_acc``, ...), ``write_json``/``write_junit``/``write_markdown``.

    Raises:
        UsageError, ArtifactError, BackendUnavailable (no runtime), GateFailed (with ``check``).
    """
    with _user_errors("ciard_deploy.verify"):
        judged = _gates(gates)  # bad gates cost nothing
        if _is_module(artifact):  # saved with the pack's dataset and eps on its card
            pack = pack if isinstance(pack, RobustnessPack) else load_pack(pack)
            artifact = cached_model(artifact, dataset=pack.meta["data"].get("dataset"), eps=pack.eps)
        target = _checkpoint(artifact, "artifact", resolve=False)
        report = run_verify(target, pack, gates=judged, live=live,
                            policy=Policy(allow_mismatch=allow_mismatch, strict=strict), **options)
    if check and report.failed:
        raise GateFailed(report.failure_summary())
    return report


def _gates(gates: Any) -> Gates | None:
    if gates is None or isinstance(gates, Gates):
        return gates
    if isinstance(gates, Mapping):
        return gates_from_mapping(dict(gates), source="gates")
    if isinstance(gates, (str, os.PathLike)):
        return load_gates(gates)
    raise UsageError(f"gates: expected Gates, a dict or a YAML file, got {type(gates).__name__}")


# --------------------------------------------------------------------------- models
def save_model(model: Any, path: str | os.PathLike, *, dataset: str, eps: float | str | None = None,
               arch: str | None = None, data_root: str | None = None, role: str = "model",
               metrics: Mapping[str, Any] | None = None) -> Path:
    """Saves a ``torch.nn.Module`` as a ciard checkpoint (``PATH.safetensors`` + the ``PATH.json`` card),
    once ciard rebuilds it exactly: the rebuilt model's logits equal the module's (else nothing is kept).

    Args:
        model: a module of a registered architecture taking images in [0, 1]: what
            ``models.create_model`` builds (normalization inside), or its bare network (saved with
            mean 0 and std 1: it keeps seeing [0, 1] pixels).
        path: the checkpoint's stem (or its ``.safetensors`` path).
        dataset: the dataset it classifies (``digits``, ``cifar10``, ...: classes and input shape).
        eps: the L-inf budget it was trained for (``"8/255"`` or 0.03), recorded on the card.
        arch: its architecture (None: the one registered architecture whose weights' shapes fit).
        data_root: where an ``imagefolder`` dataset lies. role, metrics: recorded on the card.

    Returns:
        the ``.safetensors`` path.

    Raises:
        UsageError: no or several architectures fit (pass ``arch``), or the rebuilt model computes
            something else. ArtifactError: the weights do not fit ``arch``. EnvironmentMissing: no PyTorch.
    """
    with _user_errors("ciard_deploy.save_model"):
        import torch

        from ciard_deploy.data import get_dataset_info  # imports torch
        from ciard_deploy.model_loader import load_checkpoint  # imports torch
        from ciard_deploy.models import Normalized  # imports torch

        if not _is_module(model):
            raise UsageError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        info = get_dataset_info(dataset, data_root)
        user = unwrap_model(model)
        channels = info.input_shape[0]
        # a bare network sees [0, 1] pixels: kept so, inside a Normalized of mean 0 and std 1
        net = user if isinstance(user, Normalized) else Normalized(user, [0.0] * channels, [1.0] * channels)
        device = next(iter(user.state_dict().values()), torch.empty(0)).device
        mean, std = (tuple(float(v) for v in b.flatten().tolist()) for b in (net.mean, net.std))
        arch = arch or _fitting_arch(net, info.num_classes, channels)
        meta = CheckpointMeta(arch, info.num_classes, info.input_shape, mean, std, dataset, info.classes,
                              eps=None if eps is None else parse_eps(eps), role=role, metrics=dict(metrics or {}))
        weights = save_checkpoint(path, net, meta)
        try:
            rebuilt, _ = load_checkpoint(weights)  # ArtifactError naming the keys when they do not fit
            x = torch.rand(2, *info.input_shape, generator=torch.Generator().manual_seed(0))
            was_training = user.training
            try:
                with torch.no_grad():
                    ours = net.to(device).eval()(x.to(device)).float().cpu()
                    theirs = rebuilt(x).float()
            finally:
                user.train(was_training)
            if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4):
                raise UsageError(f"model: rebuilt as {arch} for {dataset} it computes other logits than the module "
                                 f"(a module ciard saves must be the registered architecture as it is)")
        except BaseException:
            for p in checkpoint_paths(weights):
                p.unlink(missing_ok=True)
            raise
        return weights


def _fitting_arch(net: Any, num_classes: int, in_chans: int) -> str:
    """The one registered architecture whose state dict has ``net``'s keys and shapes."""
    import torch

    from ciard_deploy.models import create_model, list_models  # imports torch

    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    fits = []
    for name in list_models():
        with torch.device("meta"):  # no memory, no time
            candidate = create_model(name, num_classes, in_chans)
        if {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == shapes:
            fits.append(name)
    if len(fits) != 1:
        which = f"several architectures fit it ({', '.join(fits)})" if fits else \
            f"it is none of the registered architectures ({', '.join(list_models())}) for {num_classes} classes " \
            f"and {in_chans} channels"
        raise UsageError(f"model: {which}; pass arch=...")
    return fits[0]


def cached_model(model: Any, *, dataset: str | None, eps: float | None = None, arch: str | None = None,
                 data_root: str | None = None, role: str = "model") -> Path:
    """``model`` saved (``save_model``) to ``$CIARD_CACHE/models/<hash>/model.safetensors``, the hash of its
    weights and card: the same module gives the same file, so a manifest, a pack and verify agree on it."""
    if not dataset:
        raise UsageError("a torch.nn.Module needs dataset=... (its classes and input shape), e.g. "
                         "dataset='cifar10'")
    with _user_errors("ciard_deploy"):
        from ciard_deploy.distill.teachers import teacher_cache_dir  # imports torch

        root = teacher_cache_dir().parent / "models"
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=root))
        try:
            weights = save_model(model, tmp / "model", dataset=dataset, eps=eps, arch=arch, data_root=data_root,
                                 role=role)
            card = read_meta(weights)
            key = canonical_json_hash({"weights": sha256_file(weights), "arch": card.arch, "dataset": card.dataset,
                                       "eps": card.eps, "mean": card.mean, "std": card.std, "role": card.role})
            final = root / key[:16]
            if not (final / "model.safetensors").exists():
                with contextlib.suppress(OSError):  # another process saved the same model meanwhile: theirs
                    os.replace(tmp, final)
            return final / "model.safetensors"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _model_source(source: Any, *, dataset: str | None, eps: float | str | None, arch: str | None,
                  data_root: str | None) -> Path:
    """What export and pack read: a module saved to the model cache, else a path (a run dir as it is)."""
    if _is_module(source):
        return cached_model(source, dataset=dataset, eps=None if eps is None else parse_eps(eps), arch=arch,
                            data_root=data_root)
    return _checkpoint(source, "source", resolve=False)


def _checkpoint(source: Any, what: str, resolve: bool = True) -> Path:
    """A path from a result, a path or a run dir (``resolve``: its best checkpoint)."""
    if isinstance(source, DistillResult):
        return source.checkpoint if resolve else source.run_dir
    if isinstance(source, (str, os.PathLike)):
        return resolve_checkpoint(source) if resolve else Path(source)
    raise UsageError(f"{what}: expected a path, a DistillResult or a torch.nn.Module, got {type(source).__name__}")


def _is_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # no torch imported: obj cannot be a module
    return torch is not None and isinstance(obj, torch.nn.Module)


@contextlib.contextmanager
def _user_errors(what: str) -> Iterator[None]:
    """As the CLI maps them: a missing module of the ``train`` extra -> EnvironmentMissing (exit 3), an
    OSError -> FileProblem naming the file (exit 2); CiardErrors pass as they are."""
    try:
        yield
    except CiardError:
        raise
    except ModuleNotFoundError as e:
        missing = missing_dependency(e, what)
        if missing is None:
            raise
        raise missing from None
    except OSError as e:
        raise file_problem(e) from e


__all__ = ["DistillResult", "ExportResult", "RobustnessPack", "VerifyReport", "cached_model", "distill", "export",
           "pack", "save_model", "train", "verify"]
