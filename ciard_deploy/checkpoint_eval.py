"""`ciard eval`: clean and white-box robust accuracy of a PyTorch checkpoint, AutoAttack-style.

Glue only: load the model and a seeded, class-stratified test subset, open the evaluation state
if one is asked for (``ciard_deploy.resume``), then run the attack cascade of
``ciard_deploy.attacks.cascade``. Imports torch (the CLI imports it when ``ciard eval`` runs).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ciard_deploy.attacks import create_attack, parse_attack_spec, parse_eps
from ciard_deploy.attacks.budget import choose_eps
from ciard_deploy.attacks.cascade import run_cascade
from ciard_deploy.checkpoints import resolve_checkpoint
from ciard_deploy.data import load_test_set_for
from ciard_deploy.devices import resolve_device
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
        on_state: Callable[..., None] | None = None) -> dict[str, Any]:
    """Evaluates ``source`` (run dir, ciard checkpoint, or a plain state dict with ``arch``).

    ``eps`` None measures at the training eps the checkpoint records (``attacks.budget.choose_eps``);
    a given eps that differs from it is used, and the result says so (``eps_warning``).

    With ``state_path`` the evaluation is resumable: the file (JSON, see ``ciard_deploy.resume``) is
    created if absent and saved after the clean pass, after each finished attack and every few
    seconds inside one. If it exists it must hold the same evaluation (model sha256, arch,
    dataset, split, samples, seed, eps, and equal settings for attacks it shares with
    ``attacks``); its finished attacks are then reused (``on_state`` hears of each) and only
    the others run. ``fresh`` discards what it holds and starts over.

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
    for a in attacks:  # names and a given eps checked before loading anything
        parse_attack_spec(a)
    if eps is not None:
        parse_eps(eps)
    model, meta = load_model(source, arch=arch, dataset=dataset, data_root=data_root)
    choice = choose_eps(eps, meta.eps)
    eps = choice.eps
    atks = [create_attack(a, eps) for a in attacks]
    ds_name, ds = load_test_set_for(meta, dataset, data_root, download, n, seed)
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
    return {
        "model": {"source": str(path), "sha256": model_sha, "arch": meta.arch,
                  "recipe_hash": meta.recipe_hash},
        "dataset": ds_name, "split": "test", "n": len(y), "seed": seed, **choice.to_dict(), "device": str(dev),
        "seconds": round(time.perf_counter() - t0, 3),
        "state": None if state_path is None else str(state_path),
        **res.to_dict(),
        "versions": library_versions(),
    }
