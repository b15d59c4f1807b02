"""ciard_deploy.lock: one holder per folder or state file across processes, released when the holder dies
(SIGKILL included), re-entrant in one thread, nothing left behind; the O_EXCL fallback (no fcntl) with stale
locks of dead processes taken over. ciard_deploy.signals: SIGTERM as Ctrl-C inside the block only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ciard_deploy import lock
from ciard_deploy.errors import InUse, UsageError
from ciard_deploy.signals import Terminated, interrupt_name, terminate_as_interrupt

pytestmark = pytest.mark.unit

HOLD = """
import sys, time
from ciard_deploy.lock import file_lock, folder_lock
held = folder_lock(sys.argv[1]) if sys.argv[2] == "folder" else file_lock(sys.argv[1])
with held:
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(target: Path, kind: str = "folder") -> subprocess.Popen:
    """A real second process holding ``target``'s lock (it prints "held" once it does)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(target), kind], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_with_one_line_and_sigkill_releases_the_lock(tmp_path):
    run_dir, state = tmp_path / "runs" / "r1", tmp_path / "int8.state.json"
    holders = [_holder(run_dir), _holder(state, "file")]
    try:
        with pytest.raises(InUse) as ei:
            with lock.folder_lock(run_dir):
                pass
        msg = str(ei.value)
        assert msg == f"{run_dir} is in use by another ciard process (pid {holders[0].pid}); wait for it or use " \
                      f"another --out" and ei.value.exit_code == 2
        with pytest.raises(InUse, match=rf"{state} is in use by another ciard process \(pid {holders[1].pid}\); "
                                        "wait for it or use another --state"):
            with lock.file_lock(state, hint="wait for it or use another --state"):
                pass
        assert not state.exists()  # the refused call wrote nothing
    finally:
        for p in holders:
            p.send_signal(signal.SIGKILL)  # no finally runs in the holder: the kernel releases its flock
            p.wait(10)
    assert (run_dir / lock.LOCK_NAME).exists()  # a killed holder leaves its file behind...
    assert lock.entries(run_dir) == []  # ...which is no content
    with lock.folder_lock(run_dir), lock.file_lock(state):  # ...and nobody holds it: taken at once
        assert lock.holder(run_dir / lock.LOCK_NAME)[0] == os.getpid()
    assert [p.name for p in run_dir.iterdir()] == [] and not lock.lock_file_of(state).exists()


def test_reentrant_in_one_thread_and_a_made_folder_left_empty_is_removed(tmp_path):
    out = tmp_path / "a" / "b"
    with lock.folder_lock(out) as held:
        assert held == out and out.is_dir()
        with lock.folder_lock(out):  # e.g. `ciard pack` holds its partial folder and build_pack takes it again
            assert (out / lock.LOCK_NAME).exists()
        assert (out / lock.LOCK_NAME).exists()  # the inner release does not let go
    assert not (tmp_path / "a").exists()  # made by the lock, left empty: removed, parents too
    kept = tmp_path / "kept"
    kept.mkdir()
    with lock.folder_lock(kept):
        (kept / "x").write_text("work")
    assert [p.name for p in kept.iterdir()] == ["x"]
    (kept / "x").unlink()
    with lock.folder_lock(kept):
        pass
    assert kept.is_dir()  # existed before: an empty folder of the user's stays...
    with lock.folder_lock(kept, remove_if_empty=True):
        pass
    assert not kept.exists()  # ...unless the caller owns it (a pack's partial folder)
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        with lock.folder_lock(tmp_path / "file"):
            pass


def test_holding_locks_the_named_argument(tmp_path):
    seen = []

    @lock.holding("out_dir")
    def export(source, out_dir=None, *, force=False):
        seen.append((out_dir / lock.LOCK_NAME).exists() if out_dir else None)
        return source

    assert export("s", tmp_path / "o") == "s" and export("s", out_dir=None) == "s"
    assert seen == [True, None] and not (tmp_path / "o").exists()


def test_without_fcntl_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, monkeypatch):
    import socket

    monkeypatch.setattr(lock, "fcntl", None)
    folder = tmp_path / "run"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / lock.LOCK_NAME).write_text(f"{int(dead.stdout)} {socket.gethostname()}\n")
    with lock.folder_lock(folder):  # pid gone on this host: stale, taken over
        assert lock.holder(folder / lock.LOCK_NAME)[0] == os.getpid()
    assert not (folder / lock.LOCK_NAME).exists()
    live = _holder(tmp_path / "unused")  # any live pid
    try:
        (folder / lock.LOCK_NAME).write_text(f"{live.pid} {socket.gethostname()}\n")
        with pytest.raises(InUse, match=rf"in use by another ciard process \(pid {live.pid}\)"):
            with lock.folder_lock(folder):
                pass
        (folder / lock.LOCK_NAME).write_text(f"{live.pid} another-host\n")
        with pytest.raises(InUse, match=rf"\(pid {live.pid} on another-host\)"):  # never judged from here
            with lock.folder_lock(folder):
                pass
    finally:
        live.kill()
        live.wait(10)


def test_sigterm_raises_terminated_inside_the_block_only():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as ei:
        with terminate_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert isinstance(ei.value, KeyboardInterrupt) and interrupt_name(ei.value) == "SIGTERM"
    assert interrupt_name(KeyboardInterrupt()) == "SIGINT"
    assert signal.getsignal(signal.SIGTERM) is before
