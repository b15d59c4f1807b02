"""Locks on what one ciard command writes while it runs, so that two processes never mix their work.

    from ciard_deploy.lock import file_lock, folder_lock
    with folder_lock("runs/r1"):           # a training run folder, a `ciard run` folder, an export folder
        ...
    with file_lock("deploy/int8.state.json", hint="wait for it or use another --state"):
        ...

A second process asking for a lock that is held gets ``InUse`` (exit 2), one line naming the folder
and the holder: ``runs/r1 is in use by another ciard process (pid 4242); wait for it or use another
--out``. ``wait=True`` waits for the holder instead (a teacher trained into the shared cache).

The lock is a file, ``.ciard.lock`` inside the folder or ``.NAME.lock`` beside a file, held with
``fcntl.flock`` for the command's duration and holding the holder's pid and host (for the message).
The kernel drops the lock when its process dies, SIGKILL included, so no lock is ever stale; the
holder removes the file when it lets go (a killed one leaves it behind, and the next caller simply
locks it again). Where ``fcntl`` is missing (Windows) the file is created with ``O_CREAT | O_EXCL``
instead; one whose pid no longer runs on this host is stale and taken over.

A folder the lock had to create is removed again on release when it is still empty (a command
refused after taking its lock leaves nothing behind); ``remove_if_empty=True`` removes an empty
folder that existed before too (a pack's partial folder, the command's own temp data). A thread
may take a lock it already holds (``ciard pack`` holds its partial folder and ``build_pack`` takes
it again); only the outermost release lets go. Code that decides whether a folder is empty or
whose files it holds ignores the lock file: ``is_lock_file``, ``entries``. ``holding("out_dir")``
makes a function hold the folder (or file) one of its arguments names for its whole call.

Torch-free, ground floor: imports nothing of ciard_deploy but ``errors``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from ciard_deploy.errors import InUse, UsageError

log = logging.getLogger(__name__)

#: the lock file inside a locked folder
LOCK_NAME = ".ciard.lock"
#: what a refused caller is told to do, by default
DEFAULT_HINT = "wait for it or use another --out"
#: seconds between two tries while waiting for a lock without fcntl
_POLL_S = 0.2

_F = TypeVar("_F", bound=Callable[..., Any])

_held: dict[tuple[str, int], int] = {}  # (lock file, thread) -> how many times this thread holds it
_held_guard = threading.Lock()


def lock_file_of(path: str | os.PathLike) -> Path:
    """Where the lock of file ``path`` lives: ``.NAME.lock`` beside it."""
    p = Path(path)
    return p.with_name(f".{p.name}.lock")


def is_lock_file(path: str | os.PathLike) -> bool:
    """``path`` is a folder's lock file (``.ciard.lock``): not a user's file, not part of the folder's content."""
    return Path(path).name == LOCK_NAME


def entries(folder: str | os.PathLike) -> list[Path]:
    """What ``folder`` holds, its lock file left out (an empty list: the folder is empty for every purpose)."""
    return [p for p in Path(folder).iterdir() if not is_lock_file(p)]


def remove_new_entries(folder: str | os.PathLike, before: set[str]) -> list[str]:
    """Removes what ``folder`` holds now that it did not hold when ``before`` (names, as :func:`entries` gave
    them) was taken: what a refused call created, never a file or folder that was there before it (nor the
    lock file). Returns the names removed; one that cannot be removed is left.
    Used by ``distill``/``train`` and ``ciard run`` when a refusal comes before any work was kept."""
    import shutil

    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in entries(folder):
        if p.name in before:
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p.name)
        except OSError:
            log.debug("could not remove %s", p, exc_info=True)
    return removed


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, *, hint: str = DEFAULT_HINT, wait: bool = False,
                remove_if_empty: bool | None = None) -> Iterator[Path]:
    """Holds ``folder`` (made if missing) for the block; yields it.

    Args:
        folder: the folder to hold; its lock file is ``folder/.ciard.lock``.
        hint: what the refusal tells the user to do (``"wait for it or use another --out"``).
        wait: wait for the holder instead of refusing.
        remove_if_empty: on release, remove the folder if it is empty (None: only if this call made it).

    Raises:
        InUse: another process holds it (exit 2, one line with its pid), unless ``wait``.
        UsageError: ``folder`` is a file, or cannot be made or written.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file, not a folder")
    made = _make_folder(folder)
    try:
        with _hold(folder / LOCK_NAME, folder, hint, wait):
            yield folder
    finally:
        remove = remove_if_empty if remove_if_empty is not None else bool(made)
        if remove:
            for d in reversed(made or [folder]):  # the deepest first; stops at the first that is not empty
                try:
                    d.rmdir()
                except OSError:
                    break


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, hint: str = DEFAULT_HINT, wait: bool = False) -> Iterator[Path]:
    """Holds file ``path`` (which need not exist yet) for the block, through ``.NAME.lock`` beside it; yields
    ``path``. A parent folder made for the lock is removed again on release if it is still empty.

    Raises:
        InUse: another process holds it (exit 2), unless ``wait``.
        UsageError: its folder cannot be made or written.
    """
    path = Path(path)
    made = _make_folder(path.parent)
    try:
        with _hold(lock_file_of(path), path, hint, wait):
            yield path
    finally:
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                break


def holding(param: str, *, file: bool = False, hint: str = DEFAULT_HINT) -> Callable[[_F], _F]:
    """Decorates a function so that it runs holding the folder (``file=True``: the file) its argument
    ``param`` names; a None argument takes no lock. ``export.run`` holds its output folder this way,
    ``workflow.run`` its folder, ``verify.run`` its state file.

    Example:
        >>> @holding("out_dir")
        ... def run(source, out_dir, *, force=False): ...
    """

    def decorate(fn: _F) -> _F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            target = signature.bind_partial(*args, **kwargs).arguments.get(param)
            if target is None:
                return fn(*args, **kwargs)
            held = file_lock(target, hint=hint) if file else folder_lock(target, hint=hint)
            with held:
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def holder(lock_file: str | os.PathLike) -> tuple[int | None, str | None]:
    """(pid, host) written in a lock file, (None, None) where it holds none (yet)."""
    try:
        text = Path(lock_file).read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return None, None
    pid = int(text[0]) if text and text[0].isdigit() else None
    return pid, (text[1] if len(text) > 1 else None)


# --------------------------------------------------------------------------- internals
def _make_folder(folder: Path) -> list[Path]:
    """Makes ``folder`` and its missing parents; returns the folders made, the outermost first."""
    missing = []
    p = folder
    if folder.is_symlink() and not folder.exists():  # never made through a dangling link
        raise UsageError(f"cannot write to {folder}: it is a symbolic link to {os.readlink(folder)}, which does not "
                         "exist; remove the link or give another path")
    while not p.exists() and p.parent != p:
        missing.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot write to {folder}: {e.strerror or e}") from None
    return list(reversed(missing))


@contextlib.contextmanager
def _hold(lock_file: Path, subject: Path, hint: str, wait: bool) -> Iterator[None]:
    key = (os.path.abspath(lock_file), threading.get_ident())
    with _held_guard:
        depth = _held.get(key, 0)
        if depth:
            _held[key] = depth + 1
    if depth:  # this thread holds it already: a nested call
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    fd = _acquire(lock_file, subject, hint, wait)
    with _held_guard:
        _held[key] = 1
    try:
        yield
    finally:
        with _held_guard:
            _held.pop(key, None)
        _release(lock_file, fd)


def _in_use(lock_file: Path, subject: Path, hint: str) -> InUse:
    pid, host = holder(lock_file)
    who = f"pid {pid}" if pid is not None else "pid unknown"
    if pid is not None and host and host != socket.gethostname():
        who += f" on {host}"
    return InUse(f"{subject} is in use by another ciard process ({who}); {hint}")


def _stamp(fd: int, lock_file: Path | None = None) -> None:
    """Writes this process's pid and host into the held lock file. When that fails (a full disk: ENOSPC) the
    lock is let go and its file removed before the error goes on: a refused call leaves no lock file."""
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    except OSError as e:
        if lock_file is None:
            raise
        with contextlib.suppress(OSError):  # ours (flocked, or made with O_EXCL): remove it, then let go
            os.unlink(lock_file)
        with contextlib.suppress(OSError):
            os.close(fd)
        raise OSError(e.errno, e.strerror, str(lock_file.parent)) from None  # names the folder, not a bare fd


def _open(lock_file: Path, flags: int, subject: Path) -> int | None:
    """``os.open`` of the lock file; None when its folder vanished meanwhile (made again: try again)."""
    try:
        return os.open(lock_file, flags, 0o644)
    except FileNotFoundError:
        _make_folder(lock_file.parent)
        return None
    except FileExistsError:
        raise
    except OSError as e:
        raise UsageError(f"cannot lock {subject}: {e.strerror or e} ({lock_file})") from None


def _acquire(lock_file: Path, subject: Path, hint: str, wait: bool) -> int:
    if fcntl is None:
        return _acquire_exclusive(lock_file, subject, hint, wait)
    while True:
        fd = _open(lock_file, os.O_RDWR | os.O_CREAT, subject)
        if fd is None:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                raise _in_use(lock_file, subject, hint) from None
            pid, _ = holder(lock_file)
            log.info("%s is in use by another ciard process (pid %s); waiting for it", subject, pid or "unknown")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise UsageError(f"cannot lock {subject}: {e.strerror or e} ({lock_file})") from None
            log.warning("%s: this file system cannot lock files (%s); another ciard process writing here at the "
                        "same time would not be noticed", subject, e.strerror or e)
            _stamp(fd, lock_file)
            return fd
        # the holder before us removes the file as it lets go: a lock on a file that is no longer at the
        # path is worth nothing, so lock the file that is there now
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock_file))
        except FileNotFoundError:
            same = False
        if same:
            _stamp(fd, lock_file)
            return fd
        os.close(fd)


def _release(lock_file: Path, fd: int) -> None:
    if fcntl is None:  # the file's existence is the lock (Windows cannot remove a file that is open)
        os.close(fd)
        if holder(lock_file)[0] == os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(lock_file)
        return
    try:
        if os.path.samestat(os.fstat(fd), os.stat(lock_file)):
            os.unlink(lock_file)  # still holding it: a waiter that locks the unlinked file sees it is gone
    except OSError:
        pass
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _acquire_exclusive(lock_file: Path, subject: Path, hint: str, wait: bool) -> int:
    """Without fcntl: the file's existence is the lock; one whose process is gone (same host) is stale."""
    while True:
        try:
            fd = _open(lock_file, os.O_RDWR | os.O_CREAT | os.O_EXCL, subject)
        except FileExistsError:
            pid, host = holder(lock_file)
            if pid is not None and host == socket.gethostname() and not _pid_alive(pid):
                log.info("%s: removing the stale lock of pid %d, which no longer runs", subject, pid)
                with contextlib.suppress(OSError):
                    os.unlink(lock_file)
                continue
            if not wait:
                raise _in_use(lock_file, subject, hint) from None
            time.sleep(_POLL_S)
            continue
        if fd is not None:
            _stamp(fd, lock_file)
            return fd


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (when unsure: it does)."""
    if pid == os.getpid():
        return True
    if os.name == "nt":  # pragma: no cover - Windows
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return not ok or code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


__all__ = ["DEFAULT_HINT", "LOCK_NAME", "entries", "file_lock", "folder_lock", "holder", "holding", "is_lock_file",
           "lock_file_of", "remove_new_entries"]
