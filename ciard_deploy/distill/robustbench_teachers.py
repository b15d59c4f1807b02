"""RobustBench teachers: a model-zoo ID, built and loaded by the ``robustbench`` package (an optional extra).

A recipe names one as ``teachers.robust: {robustbench: Zhang2019Theoretically, threat_model: Linf}`` (the
clean teacher likewise). RobustBench's own ``load_model`` builds the architecture (normalization inside its
models: they take [0, 1] pixels, as ciard's do) and reads the weights from its ``model_dir`` layout,
``<model_dir>/<dataset>/<threat_model>/<ID>.pt`` (an ensemble: ``<ID>.pt_m0.pt``, ``<ID>.pt_m1.pt``, ...).
The default model_dir is ``$CIARD_CACHE/robustbench`` (``~/.cache/ciard/robustbench``); RobustBench's own
default, ``./models``, depends on the working directory. ciard never downloads: the files are checked first
and a missing one is refused (exit 2) with the RobustBench call that downloads it to that place.

Checked against the run: the ID is on the dataset's leaderboard for that threat model (else a near match,
or the leaderboard it is on), the number of classes, the input size and the logits of one forward pass;
recipe validation checks the dataset and that a robust teacher is Linf (``config.validation``). Recorded:
ID, threat model, dataset, files and their sha256 (``teachers.json``, ``ciard run``'s distill-stage inputs).

robustbench 1.1.1 as published on PyPI imports two modules its install does not bring, both from the
package's ``__init__`` (its benchmark and data loaders, which ciard does not use): ``autoattack``, the
module name of Croce & Hein's AutoAttack when installed from git, which PyPI ships as ``pyautoattack``
(robustbench's own declared dependency; registered here under the name robustbench imports), and
``pkg_resources``, removed in setuptools 82 (the extra pins ``setuptools<82``; without it: exit 3).

This module imports neither torch nor robustbench at import time (``workflow.planning`` reads the files'
sha256 through it).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ciard_deploy.config import TeacherSpec
from ciard_deploy.errors import ArtifactError, EnvironmentMissing, RecipeError
from ciard_deploy.fingerprint import sha256_file

INSTALL = "pip install 'ciard-deploy[robustbench]'"
#: the image size RobustBench's models of each dataset are evaluated at
INPUT_SHAPES = {"cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "imagenet": (3, 224, 224)}


def default_model_dir() -> Path:
    """``$CIARD_CACHE/robustbench`` (default ``~/.cache/ciard/robustbench``)."""
    return Path(os.environ.get("CIARD_CACHE", Path.home() / ".cache" / "ciard")) / "robustbench"


def import_robustbench() -> SimpleNamespace:
    """robustbench's ``utils``, ``model_dicts`` and enums; exit 3 naming the install where it cannot be imported."""
    if importlib.util.find_spec("robustbench") is None:
        raise EnvironmentMissing(f"RobustBench teachers need the robustbench package: {INSTALL}")
    if importlib.util.find_spec("autoattack") is None and importlib.util.find_spec("pyautoattack") is not None:
        import pyautoattack
        import pyautoattack.state

        sys.modules.setdefault("autoattack", pyautoattack)
        sys.modules.setdefault("autoattack.state", pyautoattack.state)
    try:
        with warnings.catch_warnings():  # its imports' deprecation notices (pkg_resources, torch.jit) are not the user's
            warnings.simplefilter("ignore")
            import robustbench.utils as utils
            from robustbench.model_zoo import model_dicts
            from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    except ModuleNotFoundError as e:
        if e.name == "pkg_resources":
            raise EnvironmentMissing("robustbench imports pkg_resources, which setuptools 82 removed: "
                                     f"pip install 'setuptools<82' (the extra pins it: {INSTALL})") from None
        raise EnvironmentMissing(f"robustbench cannot be imported ({e}): {INSTALL}") from None
    return SimpleNamespace(utils=utils, model_dicts=model_dicts, Dataset=BenchmarkDataset, ThreatModel=ThreatModel)


@dataclass(frozen=True)
class RobustBenchEntry:
    """Where one model-zoo entry's weights lie, and how RobustBench builds it."""

    model_id: str
    dataset: str
    threat_model: str
    model_dir: Path
    files: tuple[Path, ...]  # one, or an ensemble's members
    timm_name: str | None  # entries RobustBench builds through timm (their weights come from the HF hub)

    def download_hint(self) -> str:
        if self.timm_name is not None:
            return (f"RobustBench loads it through timm ({self.timm_name!r}, weights from the Hugging Face hub): "
                    f"save that model's state dict as {self.files[0]}")
        return (f"download it as RobustBench does: python -c \"from robustbench.utils import load_model; "
                f"load_model('{self.model_id}', model_dir='{self.model_dir}', dataset='{self.dataset}', "
                f"threat_model='{self.threat_model}')\"")


def locate(spec: TeacherSpec, role: str, dataset: str) -> RobustBenchEntry:
    """The entry ``spec`` names, checked against the installed model zoo (no file read).

    ``dataset`` is the recipe's; ``spec.dataset`` names RobustBench's when the recipe's is an image folder.
    Raises RecipeError for an ID that is not on that leaderboard (with a near match, or the one it is on).
    """
    assert spec.robustbench is not None
    rb = import_robustbench()
    import timm  # robustbench's own dependency
    where, mid = f"teachers.{role}.robustbench", spec.robustbench
    ds, tm = spec.dataset or dataset, spec.threat_model or "Linf"
    if ds not in INPUT_SHAPES:
        raise RecipeError(f"{where}: RobustBench has models for {', '.join(INPUT_SHAPES)}, not {ds!r}")
    board = rb.model_dicts[rb.Dataset(ds)].get(rb.ThreatModel(tm), {})
    if mid not in board:
        elsewhere = [f"{d.value} {t.value}" for d, boards in rb.model_dicts.items() for t, b in boards.items()
                     if mid in b]
        if elsewhere:
            raise RecipeError(f"{where}: {mid} is a RobustBench {' and '.join(elsewhere)} model, not {ds} {tm} "
                              f"(this recipe's dataset and threat_model)")
        lower = {k.lower(): k for k in board}
        close = [lower[k] for k in difflib.get_close_matches(mid.lower(), list(lower), n=3, cutoff=0.6)]
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise RecipeError(f"{where}: unknown RobustBench {ds} {tm} model {mid!r}{hint}; the IDs are the model zoo's "
                          f"(robustbench.model_zoo), as on robustbench.github.io")
    entry = board[mid]
    folder = Path(spec.model_dir) if spec.model_dir else default_model_dir()
    path = folder / ds / tm / f"{mid}.pt"
    timm_name = f"{mid.lower().replace('-', '_')}_{ds}_{tm.lower()}"  # what robustbench's load_model tries first
    if timm.is_model(timm_name):
        return RobustBenchEntry(mid, ds, tm, folder, (path,), timm_name)
    gdrive = entry.get("gdrive_id")
    if gdrive is None or (ds == "imagenet" and "Standard" in mid):
        raise RecipeError(f"{where}: RobustBench has no weights file for {mid} (it builds it from elsewhere); "
                          f"give the teacher as a checkpoint instead")
    files = tuple(Path(f"{path}_m{i}.pt") for i in range(len(gdrive))) if isinstance(gdrive, list) else (path,)
    return RobustBenchEntry(mid, ds, tm, folder, files, None)


def checked_files(entry: RobustBenchEntry, role: str) -> tuple[Path, ...]:
    """The entry's weights files; ArtifactError naming the ID and the path looked at when one is missing."""
    for p in entry.files:
        if not p.is_file():
            raise ArtifactError(f"teachers.{role}.robustbench: {entry.model_id}: no weights file {p}; "
                                f"{entry.download_hint()}")
    return entry.files


def weights_sha256(files: tuple[Path, ...]) -> str:
    """sha256 of the weights file; of an ensemble, the sha256 of its members' sha256 (one per line)."""
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("\n".join(sha256_file(p) for p in files).encode()).hexdigest()


def teacher_input(spec: TeacherSpec, role: str, dataset: str) -> dict[str, Any]:
    """What ``ciard run``'s distill stage records of a RobustBench teacher: the entry and its weights' sha256."""
    entry = locate(spec, role, dataset)
    return {"robustbench": entry.model_id, "threat_model": entry.threat_model, "dataset": entry.dataset,
            "sha256": weights_sha256(checked_files(entry, role))}


def load_robustbench_teacher(spec: TeacherSpec, role: str, info: Any, device: Any) -> tuple[Any, dict[str, Any]]:
    """The teacher ``spec`` names, built and loaded by robustbench, on ``device``; returns (model, reference)."""
    import timm
    import torch

    entry = locate(spec, role, info.name)
    where = f"teachers.{role}.robustbench"
    rb = import_robustbench()
    classes = rb.utils.DATASET_CLASSES[rb.Dataset(entry.dataset)]
    if classes != info.num_classes:
        raise ArtifactError(f"{where}: {entry.model_id} is a {entry.dataset} model ({classes} classes); this run's "
                            f"data has {info.num_classes} classes")
    shape = INPUT_SHAPES[entry.dataset]
    if tuple(info.input_shape) != shape:
        raise ArtifactError(f"{where}: RobustBench's {entry.dataset} models take {'x'.join(map(str, shape))} images; "
                            f"this run's are {'x'.join(map(str, info.input_shape))}")
    files = checked_files(entry, role)  # robustbench's load_model would download a missing file
    try:
        if entry.timm_name is not None:
            model = timm.create_model(entry.timm_name, num_classes=classes, pretrained=False,
                                        checkpoint_path=str(files[0])).eval()
        else:
            model = rb.utils.load_model(entry.model_id, model_dir=str(entry.model_dir), dataset=entry.dataset,
                                        threat_model=entry.threat_model)
        with torch.no_grad():
            out = model(torch.zeros(1, *shape))
    except Exception as e:  # a file robustbench cannot read, or weights of another architecture
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:240]
        raise ArtifactError(f"{where}: {files[0]} does not load into RobustBench's {entry.model_id}: {first}") from None
    if tuple(out.shape) != (1, info.num_classes):
        raise ArtifactError(f"{where}: {entry.model_id} gives logits of shape {tuple(out.shape)[1:]}, this run has "
                            f"{info.num_classes} classes")
    ref = {"role": role, "source": "robustbench", "robustbench": entry.model_id, "threat_model": entry.threat_model,
           "dataset": entry.dataset, "path": str(files[0]), "sha256": weights_sha256(files),
           "arch": f"robustbench:{entry.model_id}", "recipe": None, "recipe_hash": None, "metrics": {}}
    if len(files) > 1:
        ref["files"] = [str(p) for p in files]
    return model.to(device), ref


__all__ = ["INPUT_SHAPES", "RobustBenchEntry", "checked_files", "default_model_dir", "import_robustbench",
           "load_robustbench_teacher", "locate", "teacher_input", "weights_sha256"]
