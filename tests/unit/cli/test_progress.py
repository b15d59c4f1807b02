"""Progress rendering: rates per phase (a fake clock), plain lines off a terminal, and `ciard run`'s
stage lines printed below the previous stage's bar, never above a bar still live."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from ciard_deploy.cli import common
from ciard_deploy.cli.common import PhaseRate, err_console, progress

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_rate_restarts_per_phase_and_says_nothing_before_it_means_something():
    clock = Clock()
    rate = PhaseRate("img", clock)
    assert rate(1, "reference") == ""  # one update: no 71,485 img/s from a tiny interval
    clock.t += 0.001
    assert rate(2, "reference") == ""  # under 0.5 s
    assert rate(0, "check") == ""
    clock.t += 2.0
    assert rate(0, "check") == ""  # nothing done since the phase began: no "0 img/s"
    assert rate(300, "pgd20@0.15") == "" and rate.new_phase  # a new phase starts its own clock
    clock.t += 1.5
    assert rate(658, "pgd20@0.15") == "239 img/s"  # (658 - 300) / 1.5 s: this phase's work only
    clock.t += 1.0
    assert rate(10, "pgd20@0.15") == "" and rate.new_phase  # the count went back: a new phase
    clock.t += 4.0
    assert rate(12, "pgd20@0.15") == "0.50 img/s"  # slow phases keep their digits
    step = PhaseRate("step", clock)
    step(0, "export onnx")
    clock.t += 8.0
    assert step(1, "export onnx") == "0.12 step/s"


def test_plain_lines_name_each_phase_with_its_own_rate_and_time():
    clock = Clock()
    with err_console.capture() as cap:
        with progress("eval", unit="img", clock=clock) as update:
            update(360, 360, "clean")
            update(0, 358, "pgd20@0.15")
            clock.t += 1.5
            update(358, 358, "pgd20@0.15")
            update(1, 5, "check onnx")
    lines = cap.get().splitlines()
    assert lines == ["eval clean: 360/360 (100%)", "eval pgd20@0.15: 0/358 (0%)",
                     "eval pgd20@0.15: 358/358 (100%) 239 img/s, 1.5 s", "eval check onnx: 1/5 (20%)"]


def test_a_terminal_bar_resets_per_phase(monkeypatch):
    term = Console(file=io.StringIO(), force_terminal=True, width=120)
    monkeypatch.setattr(common, "err_console", term)
    clock = Clock()
    with progress("eval", unit="img", clock=clock) as update:
        update(0, 100, "clean")
        clock.t += 1.0
        update(100, 100, "clean")
        update(0, 50, "fgsm@0.1")
        clock.t += 2.0
        update(50, 50, "fgsm@0.1")
    out = term.file.getvalue()
    last = out.rsplit("\r", 1)[-1]  # the bar as the display left it (earlier frames depend on refresh timing)
    assert "eval fgsm@0.1" in last and "50/50" in last
    assert "25.0 img/s" in last  # 50 in 2 s: this phase alone, not 150 images in 3 s since the start


def test_stage_lines_print_after_the_previous_stage_bar_is_closed(monkeypatch):
    from ciard_deploy.cli import run as run_cli
    from ciard_deploy.cli.verify import StagedProgress
    from ciard_deploy.workflow import StageEvent

    term = Console(file=io.StringIO(), force_terminal=True, width=120)
    monkeypatch.setattr(common, "err_console", term)
    monkeypatch.setattr(run_cli, "err_console", term)
    with StagedProgress("run") as update:
        lines = run_cli.StageLines(False, update.close)
        lines(StageEvent("start", "export", "run", "no earlier run"))
        update(1, 3, stage="export check onnx")
        update(3, 3, stage="export check onnx")
        lines(StageEvent("end", "export", "ran", "no earlier run", 2.0))
        lines(StageEvent("start", "pack", "run", "no earlier run"))
        assert update.update is None  # the export bar was closed before the lines
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", term.file.getvalue())
    # the bar's last frame, then the stage lines under it (a bar still live would be drawn again below them)
    assert out.rindex("run export check onnx") < out.index("export: ran") < out.index("pack: running")
