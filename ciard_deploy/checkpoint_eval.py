"""`ciard eval`: clean and white-box robust accuracy of a PyTorch checkpoint, AutoAttack-style.

Glue only: load the model and a seeded, class-stratified test subset, open the evaluation state
if one is asked for (``ciard_deploy.resume``), then run the attack cascade of
``ciard_deploy.attacks.cascade``. With a protocol (``attacks.protocols``, e.g. ``ciard``) the attacks are the
paper's table, its black-box columns crafted on a ``transfer_from`` model loaded as a teacher is.
Imports torch (the CLI imports it when ``ciard eval`` runs).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ciard_deploy.attacks import create_attack, parse_attack_spec, parse_eps
from ciard_deploy.attacks.budget import choose_eps
from ciard_deploy.attacks.cascade import run_cascade
from ciard_deploy.attacks.protocols import build_attacks, get_protocol, protocol_table
from ciard_deploy.checkpoints import resolve_checkpoint
from ciard_deploy.config import TeacherSpec
from ciard_deploy.data import get_dataset_info, load_test_set_for
from ciard_deploy.devices import resolve_device
from ciard_deploy.distill.teachers import load_teacher
from ciard_deploy.errors import UsageError
from ciard_deploy.fingerprint import sha256_file
from ciard_deploy.io import library_versions
from ciard_deploy.model_loader import load_model
from ciard_deploy.resume import FRESH_HINT, EvaluationKey, StateMismatch, open_state


def run(source: str | Path, attacks: list[str], eps: float | str | None = None, n: int = 1000,
        dataset: str | None = None, data_root: str | None = None, download: bool = False, arch: str | None = None,
        device: str = "auto",
        batch_size: int = 256, seed: int = 0, progress: Callable[..., None] | None = None,
        state_path: str | Path | None = None, fresh: bool = False,
        on_state: Callable[..., None] | None = None, protocol: str | None = None,
        transfer_from: str | Path | None = None, transfer_arch: str | None = None) -> dict[str, Any]:
    """Evaluates ``source`` (run dir, ciard checkpoint, or a plain state dict with ``arch``).

    ``eps`` None measures at the training eps the checkpoint records (``attacks.budget.choose_eps``);
    a given eps that differs from it is used, and the result says so (``eps_warning``).

    With ``state_path`` the evaluation is resumable: the file (JSON, see ``ciard_deploy.resume``) is
    created if absent and saved after the clean pass, after each finished attack and every few
    seconds inside one. If it exists it must hold the same evaluation (model sha256, arch,
    dataset, split, samples, seed, eps, and equal settings for attacks it shares with
    ``attacks``); its finished attacks are then reused (``on_state`` hears of each) and only
    the others run. ``fresh`` discards what it holds and starts over.

    ``protocol`` (``ciard``) replaces ``attacks`` (which must be empty) by the paper's table; its black-box
    columns are crafted on ``transfer_from`` (a ciard checkpoint or run dir, a plain state dict with
    ``transfer_arch`` that takes [0, 1] pixels, or ``robustbench:ID``), and the result has a ``protocol``
    entry: the paper's column names with their labels and accuracies.

    Returns a JSON-ready dict: model, dataset, n, seed, eps (with ``eps_label``, ``eps_source``:
    ``metadata`` or ``--eps``, ``training_eps`` and ``eps_warning``), clean accuracy, each attack's
    robust accuracy under its label (``pgd20@8/255``, with ``origin``: ran, reused or resumed)
    and the per-sample worst case; ``state`` is the state file's path or ``None``.

    Raises:
        UsageError: bad n, batch size, attack, eps, dataset; no eps given and none recorded in the
            checkpoint; ``fresh`` without ``state_path``.
        ArtifactError: the state file exists but is not a ciard evaluation state (never overwritten).
        StateMismatch: the state file holds a different evaluation (an ArtifactError; names each difference).
    """
    if n <= 0:
        raise UsageError(f"--n must be positive, got {n}")
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    if fresh and state_path is None:
        raise UsageError("--fresh discards a --state file: give --state too")
    dev = resolve_device(device)
    proto = None if protocol is None else get_protocol(protocol)
    if proto is not None and attacks:
        raise UsageError(f"--protocol {proto.name} names its own attacks: leave out --attacks")
    if proto is not None and not proto.needs_transfer and transfer_from is not None:
        raise UsageError(f"--protocol {proto.name} has no transfer attack: leave out --transfer-from")
    for a in attacks:  # names and a given eps checked before loading anything
        parse_attack_spec(a)
    if eps is not None:
        parse_eps(eps)
    model, meta = load_model(source, arch=arch, dataset=dataset, data_root=data_root)
    choice = choose_eps(eps, meta.eps)
    eps = choice.eps
    ds_name, ds = load_test_set_for(meta, dataset, data_root, download, n, seed)
    source_ref = None
    if proto is not None:
        crafted_on, source_ref = (None, None) if transfer_from is None else _transfer_source(
            transfer_from, transfer_arch, get_dataset_info(ds_name, data_root), dev)
        atks = build_attacks(proto, eps, crafted_on, source_ref, seed=seed)
    else:
        atks = [create_attack(a, eps) for a in attacks]
    x, y = ds.tensors()
    path = resolve_checkpoint(source)
    model_sha = sha256_file(path)
    state = None
    if state_path is not None:
        key = EvaluationKey.create(x, y, model_sha256=model_sha, arch=meta.arch, dataset=ds_name, split="test",
                                   seed=seed, eps=eps, indices=None if ds.indices is None else ds.indices.numpy())
        try:
            state, _ = open_state(state_path, key, atks, fresh=fresh,
                                  info={"model_source": str(path), "versions": library_versions()})
        except StateMismatch as e:
            e.hint = FRESH_HINT
            raise
    model = model.to(dev)
    t0 = time.perf_counter()
    res = run_cascade(model, x, y, atks, batch_size=batch_size, device=str(dev), progress=progress, state=state,
                  on_state=on_state)
    out = res.to_dict()
    if proto is not None:
        out["protocol"] = {"name": proto.name, "description": proto.description, "transfer_from": source_ref,
                           "columns": protocol_table(proto, atks, out["clean_acc"], out["robust_acc"])}
    return {
        "model": {"source": str(path), "sha256": model_sha, "arch": meta.arch,
                  "recipe_hash": meta.recipe_hash},
        "dataset": ds_name, "split": "test", "n": len(y), "seed": seed, **choice.to_dict(), "device": str(dev),
        "seconds": round(time.perf_counter() - t0, 3),
        "state": None if state_path is None else str(state_path),
        **out,
        "versions": library_versions(),
    }


def _transfer_source(source: str | Path, arch: str | None, info: Any, device: Any) -> tuple[Any, dict[str, Any]]:
    """The model black-box attacks are crafted on, loaded as a distillation loads a teacher (a plain state
    dict takes [0, 1] pixels, as the published TRADES checkpoint does), and its reference (path, sha256, arch)."""
    text = str(source)
    try:
        if text.startswith("robustbench:"):
            spec = TeacherSpec(robustbench=text.split(":", 1)[1])
        else:
            spec = TeacherSpec(checkpoint=str(resolve_checkpoint(source)), arch=arch)
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise UsageError(f"--transfer-from {text}: {e.errors()[0]['msg'] if hasattr(e, 'errors') else e}") from None
    model, ref = load_teacher(spec, "transfer", info, device)
    keep = ("path", "sha256", "arch", "robustbench", "dataset")
    return model.eval(), {k: ref[k] for k in keep if ref.get(k) is not None}
