"""One tree of user-facing errors; the CLI maps each to an exit code (see EXIT_CODES).

Internal bugs stay ordinary exceptions and keep their traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3


class CiardError(Exception):
    """A problem the user can fix; printed as one line, never a traceback."""

    exit_code = EXIT_BAD_INPUT


class UsageError(CiardError):
    """Bad argument or option value (malformed eps, unknown name, ...)."""


class RecipeError(CiardError):
    """A recipe file that does not validate."""


class ArtifactError(CiardError):
    """A checkpoint, export or pack that is missing, corrupt or does not match."""


class DataError(CiardError):
    """Dataset files absent or unreadable."""


class InUse(CiardError):
    """What a command would write (a run folder, a pack's partial folder, a verify state, an export
    folder) is held by another running ciard process (``ciard_deploy.lock``)."""


class EnvironmentMissing(CiardError):
    """Hardware or software the command needs is not present (no GPU, no TensorRT)."""

    exit_code = EXIT_ENVIRONMENT


class BackendUnavailable(EnvironmentMissing):
    """A runtime backend cannot be imported or started here."""


class GateFailed(CiardError):
    """A verification gate did not pass."""

    exit_code = EXIT_GATE_FAILED


class FileProblem(CiardError):
    """A file or folder the command reads or writes failed at the operating system: permission denied,
    a full disk, a read-only file system, a name too long, a dangling link (exit 2: bad input or
    unwritable output)."""


#: errno -> the problem in words, where the OS's own text is less clear to a user
_OS_PROBLEMS = {
    "ENOSPC": "no space left on the device (the disk is full)",
    "EDQUOT": "disk quota exceeded",
    "EACCES": "permission denied",
    "EPERM": "operation not permitted",
    "EROFS": "read-only file system",
    "ENAMETOOLONG": "file name too long",
    "ELOOP": "too many levels of symbolic links",
}


def file_problem(e: OSError) -> FileProblem:
    """``e`` as one line naming the file and the problem (``cli/common.py`` ``handle_errors``: every
    OSError a verb lets through becomes this, exit 2, not a traceback that exits 1 like a failed gate)."""
    import errno as _errno

    code = _errno.errorcode.get(e.errno or 0, "")
    problem = _OS_PROBLEMS.get(code) or e.strerror or type(e).__name__
    names = [str(f) for f in (e.filename, e.filename2) if f is not None]
    where = " -> ".join(names) if names else "a file or folder"
    return FileProblem(f"{where}: {problem}" + (f" ({code})" if code else ""))


def too_large(e: BaseException) -> UsageError:
    """A RecursionError or MemoryError a verb let through: an input nested too deeply or too large to
    process (the readers of packs, manifests, cards and recipes bound both first: ``limits.py``)."""
    what = "nested too deeply" if isinstance(e, RecursionError) else "too large to fit in memory"
    return UsageError(f"an input is {what} to process ({type(e).__name__}); run with --verbose for where")


# --------------------------------------------------------------------------- the `train` extra
#: How to get the CPU build of PyTorch (pip's default torch on Linux is the CUDA build, ~6 GB).
CPU_TORCH_HINT = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"
#: What installs the dependencies of every verb that trains, attacks in PyTorch, exports or packs.
TRAIN_EXTRA_HINT = f"pip install 'ciard-deploy[train]' (CPU-only torch first: {CPU_TORCH_HINT})"

#: Top-level modules of the ``train`` extra (pyproject.toml) -> the name a user knows them by.
TRAIN_EXTRA_MODULES = {
    "torch": "PyTorch", "torchvision": "PyTorch (torchvision)", "functorch": "PyTorch", "torchgen": "PyTorch",
    "onnx": "onnx", "onnxscript": "onnxscript", "safetensors": "safetensors", "sklearn": "scikit-learn",
    "pyautoattack": "pyautoattack", "autoattack": "pyautoattack", "matplotlib": "matplotlib",
    "PIL": "Pillow",
}


def missing_dependency(exc: BaseException, what: str) -> EnvironmentMissing | None:
    """``exc`` as one line (exit 3) when it is a module of the ``train`` extra that is not installed,
    e.g. ``ciard distill needs PyTorch, which is not installed here: pip install 'ciard-deploy[train]' (...)``;
    None for any other exception (a bug, which keeps its traceback).

    Args:
        exc: what a command raised (a ``ModuleNotFoundError`` names its module in ``exc.name``).
        what: who needs the module, e.g. ``"ciard distill"``.
    """
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    package = TRAIN_EXTRA_MODULES.get(exc.name.split(".")[0])
    if package is None:
        return None
    return EnvironmentMissing(f"{what} needs {package}, which is not installed here: {TRAIN_EXTRA_HINT}")
