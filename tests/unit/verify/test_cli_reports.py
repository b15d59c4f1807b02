"""`ciard verify`'s report files through the CLI, on the real onnxruntime linear model: existing reports are
not overwritten without --force (exit 2, one line, every file byte-identical, nothing written), inputs never
(not even with --force), --json - puts the report alone on stdout, and --markdown-chart inline embeds the
chart in the Markdown as a data URI."""

from __future__ import annotations

import base64
import json
import re

import pytest

pytestmark = pytest.mark.unit

NO_LIVE = ["--live", "none", "--min-clean", 0.5]


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_existing_reports_need_force_and_inputs_are_never_overwritten(tmp_path, linear_onnx, pack_file, invoke,
                                                                      assert_one_line_error):
    pytest.importorskip("matplotlib")
    base = ["verify", linear_onnx, "--pack", pack_file, *NO_LIVE]
    reports = ["--json", tmp_path / "r.json", "--junit", tmp_path / "r.xml", "--markdown", tmp_path / "r.md"]
    res = invoke(*base, *reports, "-q")
    assert res.exit_code == 0, res.output
    before = _files(tmp_path)
    assert set(before) == {"r.json", "r.xml", "r.md", "r.png"}

    res = invoke(*base, *reports, "--state", tmp_path / "s.json")
    assert_one_line_error(res, 2, f"--json {tmp_path / 'r.json'} already exists", "--force")
    assert _files(tmp_path) == before  # byte for byte, and no state file either
    res = invoke(*base, "--junit", tmp_path / "r.xml")
    assert_one_line_error(res, 2, "--junit", "already exists")
    # the Markdown's chart is a file too: a user's picture beside a new report is not replaced
    (tmp_path / "s.png").write_bytes(b"a user's picture")
    before = _files(tmp_path)
    assert_one_line_error(invoke(*base, "--markdown", tmp_path / "s.md"), 2, "s.png already exists", "--force")
    assert _files(tmp_path) == before
    # an input, even with --force
    pack_before, onnx_before = pack_file.read_bytes(), linear_onnx.read_bytes()
    assert_one_line_error(invoke(*base, "--json", pack_file, "--force"), 2, "same file as --pack")
    assert_one_line_error(invoke(*base, "--markdown", linear_onnx, "--force"), 2, "same file as ARTIFACT")
    assert pack_file.read_bytes() == pack_before and linear_onnx.read_bytes() == onnx_before

    res = invoke(*base, *reports, "--force", "-q")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r.json").read_text())["kind"] == "ciard.verify_report"


def test_json_dash_puts_the_report_alone_on_stdout(linear_onnx, pack_file, invoke):
    res = invoke("verify", linear_onnx, "--pack", pack_file, *NO_LIVE, "--json", "-")
    assert res.exit_code == 0, (res.stdout, res.stderr)
    rep = json.loads(res.stdout)
    assert rep["kind"] == "ciard.verify_report" and rep["status"] == "passed"
    assert "clean" in res.stderr and "passed" in res.stderr  # the table, on stderr


def test_markdown_chart_inline_file_or_none(tmp_path, linear_onnx, pack_file, invoke, assert_one_line_error):
    pytest.importorskip("matplotlib")
    base = ["verify", linear_onnx, "--pack", pack_file, *NO_LIVE, "-q"]
    res = invoke(*base, "--markdown", tmp_path / "inline.md", "--markdown-chart", "inline")
    assert res.exit_code == 0, res.output
    md = (tmp_path / "inline.md").read_text()
    (uri,) = re.findall(r"!\[[^\]]*\]\((data:image/png;base64,[A-Za-z0-9+/=]+)\)", md)
    assert base64.b64decode(uri.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    assert not (tmp_path / "inline.png").exists()  # one self-contained file

    res = invoke(*base, "--markdown", tmp_path / "file.md")
    assert res.exit_code == 0 and "](file.png)" in (tmp_path / "file.md").read_text()
    assert (tmp_path / "file.png").read_bytes().startswith(b"\x89PNG")
    res = invoke(*base, "--markdown", tmp_path / "none.md", "--markdown-chart", "none")
    assert res.exit_code == 0 and "![" not in (tmp_path / "none.md").read_text()
    assert not (tmp_path / "none.png").exists()
    assert_one_line_error(invoke(*base, "--markdown", tmp_path / "x.md", "--markdown-chart", "svg"), 2,
                          "--markdown-chart must be file, inline or none")
