"""The CLI's one boundary for failures of the operating system and of oversized input: an OSError
(a name too long, a full disk, permission denied), a RecursionError or a MemoryError that a verb lets
through is one line naming the file and the problem with exit 2, never a traceback exiting 1 (which
an edge CI pipeline would read as a failed gate)."""

from __future__ import annotations

import errno

import pytest
import typer
from typer.testing import CliRunner

from ciard_deploy.cli.common import handle_errors
from ciard_deploy.errors import FileProblem, file_problem

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on the device"),
                                         (errno.EACCES, "permission denied"),
                                         (errno.EROFS, "read-only file system"),
                                         (errno.ENAMETOOLONG, "file name too long")])
def test_an_os_error_names_the_file_and_the_problem(code, words):
    e = file_problem(OSError(code, "os text", "/out/report.json"))
    assert isinstance(e, FileProblem) and e.exit_code == 2
    assert str(e).startswith(f"/out/report.json: {words}") and str(e).endswith(f"({errno.errorcode[code]})")
    two = file_problem(OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"))
    assert str(two) == "/a -> /b: Invalid cross-device link (EXDEV)"


@pytest.mark.parametrize("exc, needle", [(OSError(errno.ENOSPC, "No space left on device", "/x/model.onnx"),
                                          "/x/model.onnx: no space left on the device"),
                                         (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
                                         (MemoryError(), "too large to fit in memory")])
def test_a_verb_that_lets_one_through_exits_2_with_one_line(exc, needle, assert_one_line_error):
    app = typer.Typer()

    @app.command()
    @handle_errors
    def boom() -> None:
        raise exc

    res = CliRunner().invoke(app, [])
    assert_one_line_error(res, 2, needle)


def test_a_real_name_too_long_is_one_line_and_writes_nothing(invoke, assert_one_line_error, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    res = invoke("recipe", "cp", "quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15", tmp_path / ("a" * 300 + ".yaml"))
    assert_one_line_error(res, 2, "file name too long (ENAMETOOLONG)")
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "keep.txt").read_text() == "mine"
