"""Shared fixtures and skip helpers. Tests run on CPU with CUDA hidden unless marked gpu."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import pytest

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CIARD_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR_TAR = SHARED_DATA / "cifar10-jpeg.tar.gz"

requires_shared_cifar = pytest.mark.skipif(
    not CIFAR_TAR.exists(), reason=f"real CIFAR-10 JPEG copy not found at {CIFAR_TAR} (only on project machines)")


TOOLS = REPO / "tools"


@pytest.fixture(scope="session")
def load_tool() -> Any:
    """``load_tool("bench_step")``: a script of ``tools/`` imported as a module (they are scripts, not a
    package), once per session; registered in ``sys.modules`` while the session runs (a dataclass of the
    script looks its module up there)."""
    import importlib.util

    loaded: dict[str, Any] = {}

    def load(name: str) -> Any:
        if name not in loaded:
            spec = importlib.util.spec_from_file_location(f"_tool_{name}", TOOLS / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)  # type: ignore[union-attr]
            loaded[name] = module
        return loaded[name]

    yield load
    for name in loaded:
        sys.modules.pop(f"_tool_{name}", None)


@pytest.fixture(scope="session")
def short_digits_teachers(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """``--set`` lines pointing the quick digits distill recipe at short teachers (own recipes extending the
    shipped ones: an 8-epoch TRADES robust and a 3-epoch natural clean teacher). One definition, so every test
    using them hits the same teacher cache entries (a recipe's hash is its content)."""
    teachers = REPO / "recipes" / "teachers"

    def build(d: Path) -> None:
        (d / "robust.yaml").write_text(f"extends: {teachers / 'digits_trades_small_cnn_linf0.15.yaml'}\n"
                                       "train: {epochs: 8, eval_every: 4, final_attacks: []}\n")
        (d / "clean.yaml").write_text(f"extends: {teachers / 'digits_natural_small_cnn.yaml'}\n"
                                      "train: {epochs: 3, final_attacks: []}\n")

    d = made_once(tmp_path_factory, "short-digits-teachers", build)
    return [f"teachers.robust.recipe={d / 'robust.yaml'}", f"teachers.clean.recipe={d / 'clean.yaml'}"]


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    # Module- and session-scoped fixtures run before the per-test cache below: give the whole
    # session a private cache too, so no test ever writes to (or reads from) the user's ~/.cache.
    os.environ["CIARD_CACHE"] = tempfile.mkdtemp(prefix="ciard-test-cache-")


def session_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where what the whole session shares lives: its basetemp, or under pytest-xdist (README's test
    command: ``-n 2``) the folder every worker's basetemp sits in, so the workers share it."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def made_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``<session root>/shared/<name>``, made by ``build(folder)`` once for the whole session: the first
    xdist worker that asks builds it while the others wait on its lock (ciard's own ``folder_lock``), and
    a build that failed half-way is started over by the next caller."""
    import shutil

    from ciard_deploy.lock import folder_lock

    shared = session_root(tmp_path_factory) / "shared"
    folder, done = shared / name, shared / f"{name}.done"
    with folder_lock(shared / f"{name}.building", wait=True, remove_if_empty=False):
        if not done.exists():
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def ciard_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The teacher cache every test uses (``CIARD_CACHE``): one per session, shared by xdist workers
    (a teacher is trained once, by the first worker that needs it; the cache locks each entry)."""
    return session_root(tmp_path_factory) / "ciard-cache"


@pytest.fixture(autouse=True)
def _fresh_cli_state() -> None:
    """Each test starts with the CLI's global flags off: an in-process `ciard ... -q` of an earlier test
    (in this xdist worker) must not silence the next one's output."""
    common = sys.modules.get("ciard_deploy.cli.common")
    if common is not None:
        common.State.quiet = common.State.verbose = False


@pytest.fixture(autouse=True)
def _isolated_cache(ciard_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Teacher caches and decoded datasets go to a per-session temp folder, never the user's home."""
    monkeypatch.setenv("CIARD_CACHE", str(ciard_cache))


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small image-folder copy of real CIFAR-10 (50 train / 20 test images per class)."""
    if not CIFAR_TAR.exists():
        pytest.skip(f"real CIFAR-10 JPEG copy not found at {CIFAR_TAR}")
    return made_once(tmp_path_factory, "cifar10", _extract_cifar)


def _extract_cifar(out: Path) -> None:
    from ciard_deploy.data.folders import folder_from_tar

    folder_from_tar(CIFAR_TAR, out, {"train": 50, "test": 20}, num_classes=10)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """Tiny models run faster on one thread, and a 2-thread pool stalls when another process
    takes a core (CI runners are shared): pin torch to one thread for the whole session, before any
    module or session fixture trains. No test file needs its own pin. The verbs' default --threads
    (the CPUs this process may use) is pinned to one as well, for the verbs the tests run in-process."""
    from ciard_deploy.cli import common

    common.available_cpus = lambda: 1
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

    def train(folder: Path) -> None:
        run(find_recipe(DIGITS_ROBUST_RECIPE), folder / "run", handle_signals=False, overrides=DIGITS_ROBUST_OVERRIDES)

    return made_once(tmp_path_factory, "digits_robust", train) / "run"


@pytest.fixture(scope="session")
def digits_robust_exports(digits_robust_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The export folder of ``digits_robust_run``: model.onnx, model.fp16.onnx, model.int8.onnx (mixed
    calibration) and manifest.json, made once per session by ``export.run``. Read-only for every test."""
    from ciard_deploy import export

    def make(folder: Path) -> None:
        export.run(digits_robust_run, folder / "export", ["onnx", "onnx-fp16", "onnx-int8"], n=64, calib="mixed",
                   calib_n=128, threads=1)

    return made_once(tmp_path_factory, "digits_robust_exports", make) / "export"


# --------------------------------------------------------------------------- small models trained on digits
@pytest.fixture(scope="session")
def train_on_digits() -> Callable[..., torch.nn.Module]:
    """``train_on_digits(arch, lr)``: a model of ``arch`` trained with Adam on the digits train split
    (seed 0, 4 epochs, batches of 64; deterministic), in eval mode. A fresh model per call: the
    calling fixture's scope decides how long one is shared (the attack tests' ``digits_model`` and
    ``trained_tiny``)."""

    def train(arch: str, lr: float, epochs: int = 4, batch_size: int = 64) -> torch.nn.Module:
        import torch

        from ciard_deploy.data.digits import DIGITS_INFO, load_digits_split
        from ciard_deploy.models import create_model

        x, y = load_digits_split("train").tensors()
        torch.manual_seed(0)
        model = create_model(arch, 10, in_chans=1, mean=DIGITS_INFO.mean, std=DIGITS_INFO.std)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        g = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch_size):
                b = perm[i:i + batch_size]
                loss = torch.nn.functional.cross_entropy(model(x[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return model.eval()

    return train


# --------------------------------------------------------------------------- running the CLI where torch cannot be imported
#: Prelude of a subprocess script that hides torch, as on an edge device with numpy + onnxruntime
#: but no PyTorch. Every finder on ``sys.meta_path`` is wrapped so that ``torch`` (and
#: torchvision, functorch, torchgen) is simply *not found*, and ``import torch`` raises
#: ``ModuleNotFoundError`` (an ``ImportError``), as on a device without it. A finder that *raises*
#: from ``find_spec`` would not do: libraries probe ``importlib.util.find_spec("torch")`` (ART
#: does), which returns None on a real torch-free device but would raise there. Setting
#: ``sys.modules["torch"] = None`` breaks scipy. ``importlib.metadata`` does not list the torch distributions either. The prelude
#: checks that torch really is hidden, then empties ``ATTEMPTS``, where the hook records every later
#: attempt to import torch. The script's own code follows it.
HIDE_TORCH_PRELUDE = textwrap.dedent('''
    import importlib.util, json, sys

    BLOCKED = ("torch", "torchvision", "functorch", "torchgen")
    ATTEMPTS = []

    class HideTorch:
        """Wraps a finder; torch and friends are not found (find_spec -> None), as where not installed."""

        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                ATTEMPTS.append(name)
                return None
            find = getattr(self.inner, "find_spec", None)
            return find(name, path, target) if find else None

        def find_distributions(self, *args, **kwargs):  # importlib.metadata: torch is not installed either
            find = getattr(self.inner, "find_distributions", None)
            dists = find(*args, **kwargs) if find else []
            return [d for d in dists if (d.metadata["Name"] or "").lower() not in BLOCKED]

        def invalidate_caches(self):
            if hasattr(self.inner, "invalidate_caches"):
                self.inner.invalidate_caches()

    sys.meta_path[:] = [HideTorch(f) for f in sys.meta_path]
    try:
        import torch  # noqa: F401
        raise SystemExit("the hook did not hide torch")
    except ImportError as blocked:
        assert "torch" in str(blocked)
    assert importlib.util.find_spec("torch") is None
    ATTEMPTS.clear()
''')


@pytest.fixture(scope="session")
def run_torch_hidden() -> Callable[..., tuple[dict, str]]:
    """``run_torch_hidden(body, cwd, args)``: runs ``HIDE_TORCH_PRELUDE`` + ``body`` (dedented) as a
    script in ``cwd``, with ``json.dumps(args)`` (as strings) as its one argument. The body prints
    one ``RESULT {json}`` line; returns that object and the script's stderr. Fails the test if the
    script exits non-zero or prints no result."""

    def run(body: str, cwd: Path, args: Sequence[object]) -> tuple[dict, str]:
        script = cwd / "torch_hidden.py"
        script.write_text(HIDE_TORCH_PRELUDE + textwrap.dedent(body))
        proc = subprocess.run([sys.executable, str(script), json.dumps([str(a) for a in args])],
                              capture_output=True, text=True, timeout=300, cwd=cwd)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, proc.stderr[-3000:]
        return json.loads(lines[-1][len("RESULT "):]), proc.stderr

    return run


@pytest.fixture(scope="session")
def untrained_digits_onnx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An untrained small_cnn saved as a ciard digits checkpoint (what it predicts does not matter),
    its ONNX export (``export.run``, no reference attack, no check) and a 64-image fgsm pack at eps 0.1:
    keys ``run``, ``checkpoint``, ``onnx``, ``pack``. Shared by the torch-free tests; read-only: a test
    writes into its own tmp_path."""
    import torch

    from ciard_deploy import export
    from ciard_deploy.data import get_dataset_info
    from ciard_deploy.checkpoints import CheckpointMeta, save_checkpoint
    from ciard_deploy.models import create_model
    from ciard_deploy.verify import build_pack, save_pack

    def make(d: Path) -> None:
        info = get_dataset_info("digits")
        torch.manual_seed(0)
        model = create_model("small_cnn", 10, 1, info.mean, info.std)
        save_checkpoint(d / "run" / "student_best", model,
                        CheckpointMeta("small_cnn", 10, info.input_shape, info.mean, info.std, "digits",
                                       info.classes, eps=0.1))
        export.run(d / "run", d / "export", ["onnx"], n=64, reference_attack=None, check=False)
        save_pack(build_pack(d / "run", n=64, attacks=["fgsm"], eps=0.1, device="cpu"), d / "pack.npz")

    d = made_once(tmp_path_factory, "untrained_digits", make)
    return {"run": d / "run", "checkpoint": d / "run" / "student_best.safetensors", "onnx": d / "export" / "model.onnx",
            "pack": d / "pack.npz"}


# --------------------------------------------------------------------------- the CLI in-process
@pytest.fixture(scope="session")
def invoke() -> Callable[..., Any]:
    """``invoke(*args)``: runs ``ciard`` in-process (typer's ``CliRunner``; each argument through ``str``)
    and returns its result, stdout and stderr apart."""
    from typer.testing import CliRunner

    from ciard_deploy.cli import app

    runner = CliRunner()

    def run(*args: object) -> Any:
        return runner.invoke(app, [str(a) for a in args])

    return run


@pytest.fixture(scope="session")
def snapshot() -> Callable[[Path], dict[str, tuple[int, str]]]:
    """``snapshot(root)``: (mtime_ns, sha256) of every file under a ``ciard run`` folder, except the two the
    workflow rewrites on each call (``workflow.json``, ``recipe.yaml``): equal before and after a call that
    must neither write nor touch anything else."""
    from ciard_deploy.fingerprint import sha256_file

    def take(root: Path) -> dict[str, tuple[int, str]]:
        return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, sha256_file(p))
                for p in sorted(root.rglob("*")) if p.is_file() and p.name not in ("workflow.json", "recipe.yaml")}

    return take


@pytest.fixture(scope="session")
def assert_one_line_error() -> Callable[..., None]:
    """``assert_one_line_error(res, code, *needles)``: ``res`` exited ``code`` with an ``error:`` message on
    stderr holding every needle (its lines joined: the console may wrap one message over several) and
    no traceback."""

    def check(res: Any, code: int, *needles: str) -> None:
        assert res.exit_code == code, (res.stdout, res.stderr)
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        err = " ".join(lines)
        assert err.startswith("error:") and "Traceback" not in res.output, res.output
        for n in needles:
            assert n in err, err

    return check
