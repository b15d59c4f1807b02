"""Shared fixtures and skip helpers. Tests run on CPU with CUDA hidden unless marked gpu."""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CIARD_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR_TAR = SHARED_DATA / "cifar10-jpeg.tar.gz"

requires_shared_cifar = pytest.mark.skipif(
    not CIFAR_TAR.exists(), reason=f"real CIFAR-10 JPEG copy not found at {CIFAR_TAR} (only on project machines)")


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    # Module- and session-scoped fixtures run before the per-test cache below: give the whole
    # session a private cache too, so no test ever writes to (or reads from) the user's ~/.cache.
    os.environ["CIARD_CACHE"] = tempfile.mkdtemp(prefix="ciard-test-cache-")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Teacher caches and decoded datasets go to a per-session temp folder, never the user's home."""
    monkeypatch.setenv("CIARD_CACHE", str(tmp_path_factory.getbasetemp() / "ciard-cache"))


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small image-folder copy of real CIFAR-10 (50 train / 20 test images per class)."""
    if not CIFAR_TAR.exists():
        pytest.skip(f"real CIFAR-10 JPEG copy not found at {CIFAR_TAR}")
    out = tmp_path_factory.mktemp("cifar10")
    keep = {"train": 50, "test": 20}
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR_TAR) as tar:
        for m in tar:
            if not m.isfile():
                continue
            parts = Path(m.name).parts
            i = next((k for k, p in enumerate(parts) if p in keep), None)
            if i is None or len(parts) < i + 3:
                continue
            split, cls = parts[i], parts[i + 1]
            if counts.get((split, cls), 0) >= keep[split]:
                continue
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
            dest = out / split / cls / parts[-1]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(m).read())  # type: ignore[union-attr]
    return out


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """Tiny models run faster on one thread, and a 2-thread pool stalls when another process
    takes a core (CI runners are shared): pin torch to one thread for the whole session, before any
    module or session fixture trains. No test file needs its own pin."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _still_one_torch_thread(_one_torch_thread: None) -> None:
    """...and again before each test, whatever an earlier one left behind."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)

#: The quick PGD-AT digits recipe as the shared robust model: a small_cnn, fewer epochs, PGD-5 steps
#: (the same trainer code path as `ciard train`; the recipe's own eps 0.15).
DIGITS_ROBUST_RECIPE = "quick/digits_pgd_at_none_to_tiny_cnn_linf0.15"
DIGITS_ROBUST_OVERRIDES = ["model.arch=small_cnn", "train.epochs=6", "train.eval_every=6", "train.final_attacks=[]",
                           "attack.steps=5", "attack.step_size=0.06"]


@pytest.fixture(scope="session")
def digits_robust_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A robust small_cnn run dir, trained once per session on digits by ``distill.trainer.run``
    (PGD-AT, eps 0.15; ~98 % clean, ~60 % pgd20 on the test split; ~10 s on one core).
    The export, verify and TensorRT tests share it; none of them may write into it."""
    from ciard_deploy.config import find_recipe
    from ciard_deploy.distill.trainer import run

    out = tmp_path_factory.mktemp("digits_robust") / "run"
    run(find_recipe(DIGITS_ROBUST_RECIPE), out, handle_signals=False, overrides=DIGITS_ROBUST_OVERRIDES)
    return out
