"""Building a robustness pack on the machine with PyTorch: the test images, the attacks crafted on the
PyTorch model and its logits, resumable per attack (``pack_partial.py``), and the white-box sections on
exported artifacts (``pack_artifacts.py``). torch is imported when a build runs.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ciard_deploy import __version__
from ciard_deploy.attacks.base import create_attack, parse_attack_spec
from ciard_deploy.attacks.budget import choose_eps, format_eps, parse_eps
from ciard_deploy.attacks.results import worst_case_label
from ciard_deploy.checkpoints import checkpoint_paths, resolve_checkpoint
from ciard_deploy.devices import resolve_device
from ciard_deploy.errors import UsageError
from ciard_deploy.fingerprint import sha256_file
from ciard_deploy.io import library_versions
from ciard_deploy.lock import folder_lock, holding
from ciard_deploy.resume import StateEvent
from ciard_deploy.verify.pack import FORMAT, SCHEMA_VERSION, ArtifactSection, Progress, RobustnessPack, reference_flags, save_pack
from ciard_deploy.verify.pack_partial import (OnMismatch, PackKey, PartialFolder, SectionJob, check_partial_dir,
                                             discard_partial, partial_dir)
from ciard_deploy.runtime.torch_backend import import_torch
from ciard_deploy.verify.pack_artifacts import build_section, check_artifacts, preflight

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- build (needs torch)
def _make_attack(spec: str, eps: float, seed: int, step_size: float | None = None) -> Any:
    """``create_attack`` with the pack's seed (and step size) for the attacks that take them."""
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

    torch = import_torch()
    from ciard_deploy.attacks.cascade import check_budget  # these import torch: verify stays torch-free
    from ciard_deploy.data import load_test_set_for
    from ciard_deploy.model_loader import load_model

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
    jobs = [SectionJob(j, a, sha256_file(a), eps_value, art_atks, bool(allow_untrusted_twin))
            for j, a in enumerate(artifact_paths)]
    partial = None
    if folder is not None:
        key = PackKey.create(x_np, y_np, model_sha256=model_sha, arch=meta.arch, dataset=ds_name, split="test",
                             seed=seed, eps=eps_value, indices=indices, batch_size=int(batch_size), device=dev.type,
                             torch_version=str(torch.__version__))
        partial = PartialFolder(folder, key, [*atks, *jobs], on_mismatch, on_state,
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


def write_pack(source: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
               **options: Any) -> RobustnessPack:
    """Builds the pack of ``source`` and saves it to ``out``, resumably: the one sequence ``ciard pack``
    and the pack stage of ``ciard run`` share.

    While it builds, each finished attack is kept in ``OUT.partial/`` (``pack_partial.partial_dir``);
    after an interruption the same call reuses them, and a folder made for another pack is the
    caller's own temp data, discarded with a log line (``on_mismatch="discard"``). Once the pack is
    saved (atomically) the folder is removed. The call holds that folder's lock from the build to
    its removal: another build into ``out`` meanwhile is refused (``InUse``, exit 2).

    Args:
        source: as ``build_pack``.
        out: the pack file (.npz).
        force: overwrite an existing ``out``.
        **options: the other arguments of ``build_pack`` (not ``resume_dir``/``on_mismatch``).

    Returns:
        the saved pack.
    """
    partial = partial_dir(out)
    with folder_lock(partial, remove_if_empty=True):
        pack = build_pack(source, resume_dir=partial, on_mismatch="discard", **options)
        save_pack(pack, out, force=force)
        discard_partial(partial)
    return pack


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


__all__ = ["DEFAULT_ATTACKS", "PackPlan", "build_pack", "default_attacks", "pack_from_arrays", "write_pack"]
