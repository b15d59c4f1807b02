"""SIGTERM handled as Ctrl-C, for the commands that save their work when interrupted.

A CI runner cancels a job with SIGTERM (then SIGKILL a few seconds later). Python's default for
SIGTERM ends the process on the spot (exit 143): no ``finally`` runs, so a pack's or verify's
finished work since the last save is lost, a staging folder stays behind and nobody says so.
Inside ``terminate_as_interrupt()`` SIGTERM raises ``Terminated``, a ``KeyboardInterrupt``, so the
code paths that already save on Ctrl-C (the pack's partial folder, verify's state file, export's
staging clean-up) run, and the CLI exits 130 with its usual line, naming the signal
(``interrupted (SIGTERM): ...``). Training has its own handler (``distill.run_context``: finish the
step, save, exit 130), which takes over while a run trains.

Torch-free, ground floor.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM received inside ``terminate_as_interrupt``: handled wherever Ctrl-C is."""

    signal_name = "SIGTERM"


def interrupt_name(exc: BaseException) -> str:
    """``"SIGTERM"`` for a ``Terminated``, ``"SIGINT"`` for any other KeyboardInterrupt (Ctrl-C)."""
    return getattr(exc, "signal_name", "SIGINT")


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """For the block, SIGTERM raises ``Terminated`` (a KeyboardInterrupt) in the main thread; the previous
    handler is restored after. Elsewhere than the main thread (where signals cannot be handled) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


__all__ = ["Terminated", "interrupt_name", "terminate_as_interrupt"]
