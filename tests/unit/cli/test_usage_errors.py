"""A usage error (unknown option or command, missing argument, bad value) is one line on stderr,
``error: <message> (see ciard VERB -h)``, exit 2, through the console script and typer's CliRunner alike;
help, version and no-args help are unchanged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit


def ciard(*args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("ciard")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "ciard_deploy"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60)


CASES = [
    (("verify", "--bogus"), "error: No such option: --bogus (see ciard verify -h)"),
    (("verify",), "error: Missing argument 'artifact' (see ciard verify -h)"),
    (("eval", "x", "--n", "abc"), "error: Invalid value for '--n':"),
    (("nosuch",), "error: No such command 'nosuch' (see ciard -h)"),
    (("recipe", "shw"), "(see ciard recipe -h)"),
]


@pytest.mark.parametrize("args, needle", CASES[:3])
def test_the_console_script_prints_one_line_and_exits_2(args, needle):
    res = ciard(*args)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and needle in lines[0], res.stderr
    assert lines[0].startswith("error:") and lines[0].endswith("-h)") and res.stdout == "", res.stderr


@pytest.mark.parametrize("args, needle", CASES)
def test_cli_runner_gives_the_same_line(args, needle, invoke):
    res = invoke(*args)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], res.output
    assert "─" not in res.output and "Usage:" not in res.output


def test_help_version_and_no_args_help_are_unchanged(invoke):
    assert invoke("verify", "-h").exit_code == 0 and "Usage:" in invoke("verify", "--help").output
    assert invoke("--version").exit_code == 0
    res = invoke("recipe")  # no_args_is_help: the help, not an error line
    assert "Usage:" in res.output and "error:" not in res.output
