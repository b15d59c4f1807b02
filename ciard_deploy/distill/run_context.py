"""What a training run installs in its process for as long as it runs: SIGINT/SIGTERM turned into stop
requests on its :class:`~ciard_deploy.distill.events.RunControl` (:func:`signals_to`), and its
``train.log`` receiving the package's log records (:func:`log_to`).

Other long verbs use ``ciard_deploy.signals.terminate_as_interrupt`` (SIGTERM as Ctrl-C); training has
this handler of its own because it finishes the current step and saves before it stops. Torch-free.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

from ciard_deploy.distill.events import RunControl

log = logging.getLogger(__name__)


@contextlib.contextmanager
def signals_to(control: RunControl) -> Iterator[None]:
    """SIGINT/SIGTERM request a stop after the current step; a second SIGINT, or any while
    ``control.stop_at_once`` (no step to finish), stops at once with a KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if control.stop_at_once or (control.stop_requested and signum == signal.SIGINT):
            log.info("%s received: stopping now", name)
            control.request_stop(control.stop_reason or name)
            raise KeyboardInterrupt
        log.warning("%s received: finishing the current step, then saving", name)
        control.request_stop(name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def log_to(path: Path | None) -> Iterator[None]:
    """Copies the package's log records (INFO and up) into ``path`` for the duration of a run."""
    if path is None:
        yield
        return
    pkg = logging.getLogger("ciard_deploy")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    old_level, old_propagate, effective = pkg.level, pkg.propagate, pkg.getEffectiveLevel()
    added: list[logging.Handler] = [handler]
    if effective > logging.INFO:
        # the file wants INFO; whoever listens above the package keeps seeing only what it saw before
        pkg.setLevel(logging.INFO)
        if old_propagate:
            pkg.propagate = False
            added.append(_Forward(effective))
    for h in added:
        pkg.addHandler(h)
    try:
        yield
    finally:
        for h in added:
            pkg.removeHandler(h)
        handler.close()
        pkg.setLevel(old_level)
        pkg.propagate = old_propagate


class _Forward(logging.Handler):
    """Passes records at or above ``level`` on to the root logger's handlers."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger().handle(record)


__all__ = ["log_to", "signals_to"]
