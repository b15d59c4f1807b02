"""The report as data: JSON round trip, re-judging without re-running, JUnit and Markdown writers, output paths."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from ciard_deploy.errors import UsageError
from ciard_deploy.verify import Gates, VerifyReport, run
from ciard_deploy.verify.report import check_report_paths, check_writable

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def report(linear_onnx, pack_file) -> VerifyReport:
    gates = Gates.create(min_clean=0.5, min_robust=0.99, max_clean_drop=0.01, min_agreement=0.999)
    return run(linear_onnx, pack_file, square_queries=30, square_n=20, gates=gates)


def test_verdict(report):
    assert not report.passed and report.status == "failed"
    assert [g.name for g in report.failures()] == ["min_robust"]
    line = report.failure_summary()
    assert line.startswith("1 of 4 gates failed: min_robust (worst_case_acc ") and "required 0.9900" in line


def test_json_round_trip(report, tmp_path):
    path = report.write_json(tmp_path / "r.json")
    d = json.loads(path.read_text())
    assert d["kind"] == "ciard.verify_report" and d["schema_version"] == 3 and d["status"] == "failed"
    assert d["policy"]["allow_mismatch"] is False and d["policy"]["strict"] is False and d["warning_results"] == []
    assert d["gates"] == {"min_clean": 0.5, "min_robust": 0.99, "max_clean_drop": 0.01, "min_agreement": 0.999}
    back = VerifyReport.from_json(path)
    assert back.to_dict() == report.to_dict()
    assert VerifyReport.from_json(path.read_text()).to_dict() == d
    with pytest.raises(UsageError, match="not a ciard verify report"):
        VerifyReport.from_dict({"kind": "other"})
    with pytest.raises(UsageError, match="newer"):
        VerifyReport.from_dict({**d, "schema_version": 99})
    # a schema-1 report (Square's own keys) is still read and re-judged
    old = {**d, "schema_version": 1, "settings": {"square_queries": 30, "square_n": 20, "square_p_init": 0.8},
           "timings": {"square_s": 1.5, "total_s": 2.0}}
    back = VerifyReport.from_dict(old).rejudge()
    assert back.schema_version == 3 and back.status == "failed" and back.settings["square_queries"] == 30


def test_rejudge_without_rerunning(report):
    again = report.rejudge()
    assert [g.to_dict() for g in again.gate_results] == [g.to_dict() for g in report.gate_results]
    relaxed = report.rejudge(Gates.create(min_robust=0.0, min_clean=0.5))
    assert relaxed.passed and relaxed.gates == {"min_clean": 0.5, "min_robust": 0.0}
    assert report.rejudge(Gates.create(min_clean=1.0)).passed == (report.metrics["clean_acc"] >= 1.0)
    assert report.passed is False  # the original is untouched


def test_junit(report, tmp_path):
    root = ET.parse(report.write_junit(tmp_path / "r.xml")).getroot()
    assert root.tag == "testsuites" and root.get("tests") == "4" and root.get("failures") == "1"
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    assert [c.get("name").split(":")[0] for c in cases] == ["min_clean", "min_robust", "max_clean_drop",
                                                              "min_agreement"]
    failed = [c for c in cases if c.find("failure") is not None]
    assert len(failed) == 1
    fail = failed[0].find("failure")
    measured = report.metrics["worst_case_acc"]
    assert fail.get("type") == "GateFailed" and "required 0.9900" in fail.get("message")
    assert f"measured: {measured:.6g}" in fail.text and "required: >= 0.99" in fail.text
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["artifact_sha256"] == report.artifact["sha256"] and props["status"] == "failed"
    assert float(props["metric.clean_acc"]) == pytest.approx(report.metrics["clean_acc"])


def test_markdown_is_short_and_complete(report, tmp_path):
    md = report.write_markdown(tmp_path / "r.md").read_text()
    assert md.startswith("### ciard verify: `linear.onnx` ❌ **failed** (3/4 gates)")
    for needle in ("| clean |", "pgd10@0.1 (transferred from PyTorch)", "square30@0.1 (query-only, n=20)", "worst(pgd10+fgsm+square30)@0.1",
                   "| min_robust |", "top-1 agreement"):
        assert needle in md
    assert len(md.splitlines()) < 40 and len(md) < 4000


def test_render_does_not_fail(report):
    from rich.console import Console

    from ciard_deploy.verify.render import render_pack, render_report

    console = Console(record=True, width=100)
    render_report(report, console)
    render_pack({**report.pack, "path": "p.npz"}, console)
    text = console.export_text()
    assert "FAILED" in text and "min_robust" in text and "parity" in text


def test_output_paths(tmp_path):
    check_writable(tmp_path / "new" / "deeper" / "r.json", "--json")  # folders are created later
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="--json .* is not a folder"):
        check_writable(blocker / "r.json", "--json")
    with pytest.raises(UsageError, match="it is a folder"):
        check_writable(tmp_path, "--junit")
    with pytest.raises(UsageError, match="same file as --json"):
        check_report_paths({"--json": tmp_path / "r.json", "--markdown": tmp_path / "r.json"})
    with pytest.raises(UsageError, match="same file as --pack"):
        check_report_paths({"--json": tmp_path / "p.npz"}, {"--pack": tmp_path / "p.npz"})
    check_report_paths({"--json": None, "--junit": tmp_path / "r.xml"}, {"--pack": tmp_path / "p.npz"})
