"""``ciard ARGS`` (the real CLI, in its own process) that stops at one chosen moment until a signal comes.

tests/integration/test_interruptions.py runs it to signal a command at a moment it chooses rather than
one a race picks: the process prints ``PAUSED <why>`` on stderr there and sleeps until the test's signal
(SIGINT and SIGTERM arrive as they would during the work at that point; SIGKILL ends it). One
environment variable picks the moment, and only its first occurrence pauses:

- ``PAUSE_AFTER_LINE=REGEX``: right after the CLI prints a line matching REGEX on stderr (a progress
  line such as ``pack pgd20@0.15: 0/64``: the attack is under way).
- ``PAUSE_AT_REPLACE=NAME:N``: at the N-th atomic rename of a temp file onto a file named NAME, with
  the temp file cut to half its size first: a SIGKILL there leaves a torn write beside the old NAME.
- ``PAUSE_AT_TRAIN_STEP=N``: before the trainer's N-th optimizer step of this process (mid-epoch).

And ``SAVE_EVERY_S=S``: ``ciard verify --state`` saves finished live-attack batches at most every S seconds
(10 by default), as if each batch took longer than a test can wait for.

Not a test module (no ``test_`` prefix); nothing else changes in the command, except that SIGINT is
handled as in a terminal even when pytest runs as a background job (whose children start with it ignored).
"""

from __future__ import annotations

import inspect
import os
import re
import signal
import sys
import time


def pause(why: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"PAUSED {why}\n")
    sys.stderr.flush()
    time.sleep(300)  # a signal ends it (or interrupts it, for SIGINT and SIGTERM)
    raise SystemExit("paused for 300 s and no signal came")


def after_line(pattern: re.Pattern[str]) -> None:
    from ciard_deploy.cli.common import err_console

    real = err_console.print
    armed = [True]

    def print_then_pause(*objects: object, **kwargs: object) -> None:
        real(*objects, **kwargs)
        if armed[0] and pattern.search(" ".join(map(str, objects))):
            armed[0] = False
            pause(f"after a line matching {pattern.pattern}")

    err_console.print = print_then_pause  # type: ignore[method-assign]


def at_replace(name: str, nth: int) -> None:
    real = os.replace
    seen = [0]

    def torn_replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        if os.path.basename(os.fspath(dst)) == name:
            seen[0] += 1
            if seen[0] == nth:
                os.truncate(src, os.path.getsize(src) // 2)
                pause(f"before renaming a torn {os.path.basename(os.fspath(src))} onto {name}")
        return real(src, dst, *args, **kwargs)

    os.replace = torn_replace


def at_train_step(nth: int) -> None:
    from ciard_deploy.distill import loop

    real = loop.train_step
    calls = [0]

    def paused_step(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == nth:
            pause(f"before training step {nth}")
        return real(*args, **kwargs)

    loop.train_step = paused_step


if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started from a background job: Ctrl-C as in a terminal
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if os.environ.get("PAUSE_AFTER_LINE"):
        after_line(re.compile(os.environ["PAUSE_AFTER_LINE"]))
    if os.environ.get("PAUSE_AT_REPLACE"):
        file_name, n = os.environ["PAUSE_AT_REPLACE"].rsplit(":", 1)
        at_replace(file_name, int(n))
    if os.environ.get("PAUSE_AT_TRAIN_STEP"):
        at_train_step(int(os.environ["PAUSE_AT_TRAIN_STEP"]))
    if os.environ.get("SAVE_EVERY_S"):
        from ciard_deploy.verify import verification

        inspect.unwrap(verification.run).__kwdefaults__["save_every"] = float(os.environ["SAVE_EVERY_S"])
    from ciard_deploy.cli import main

    sys.argv[0] = "ciard"
    main()
