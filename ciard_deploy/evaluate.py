"""`ciard eval`: clean and white-box robust accuracy of a PyTorch checkpoint, AutoAttack-style.

Glue only: load the model and a seeded, class-stratified test subset, then run the attack
cascade of ``ciard_deploy.attacks.evaluate``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ciard_deploy.errors import UsageError


def run(source: str | Path, attacks: list[str], eps: float, n: int = 1000, dataset: str | None = None,
        data_root: str | None = None, download: bool = False, arch: str | None = None, device: str = "auto",
        batch_size: int = 256, seed: int = 0, progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Evaluates ``source`` (run dir, ciard checkpoint, or a plain state dict with ``arch``).

    Returns a JSON-ready dict: model, dataset, n, seed, eps, clean accuracy, each attack's
    robust accuracy under its label (``pgd20@8/255``) and the per-sample worst case.
    """
    from ciard_deploy.attacks import create_attack
    from ciard_deploy.attacks import evaluate as cascade
    from ciard_deploy.data import load_test_set_for
    from ciard_deploy.devices import resolve_device
    from ciard_deploy.io import library_versions, load_model, resolve_checkpoint, sha256_file

    if n <= 0:
        raise UsageError(f"--n must be positive, got {n}")
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    dev = resolve_device(device)
    atks = [create_attack(a, eps) for a in attacks]  # validates names before loading anything
    model, meta = load_model(source, arch=arch, dataset=dataset, data_root=data_root)
    ds_name, ds = load_test_set_for(meta, dataset, data_root, download, n, seed)
    x, y = ds.tensors()
    model = model.to(dev)
    t0 = time.perf_counter()
    res = cascade(model, x, y, atks, batch_size=batch_size, device=str(dev), progress=progress)
    path = resolve_checkpoint(source)
    return {
        "model": {"source": str(path), "sha256": sha256_file(path), "arch": meta.arch,
                  "recipe_hash": meta.recipe_hash},
        "dataset": ds_name, "split": "test", "n": len(y), "seed": seed, "eps": eps, "device": str(dev),
        "seconds": round(time.perf_counter() - t0, 3),
        **res.to_dict(),
        "versions": library_versions(),
    }
