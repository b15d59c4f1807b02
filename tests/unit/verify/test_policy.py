"""What `ciard verify` may call passed: no gates is NOT GATED (exit 0, never "passed"); a warning that says the
numbers are not about this artifact (V103/V104/V105/V109) fails unless --allow-mismatch; --strict fails on every
warning. The terminal, the JSON status, JUnit and Markdown say the same, and a stored report re-judges alike.

On the real onnxruntime linear model of conftest.py, with packs made in numpy.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest

from ciard_deploy.verify import Gates, VerifyReport, run, save_pack
from ciard_deploy.verify.gates import MISMATCH_CODES, Policy, judge_warnings
from ciard_deploy.verify.checks import finding

pytestmark = pytest.mark.unit

NO_LIVE = ["--live", "none"]


def _reports(tmp_path):
    return ["--json", tmp_path / "r.json", "--junit", tmp_path / "r.xml", "--markdown", tmp_path / "r.md"]


def _no_passed(*texts):
    for text in texts:
        assert not re.search(r"\bpass(ed)?\b", text, re.IGNORECASE), text


@pytest.fixture(scope="module")
def other_model_pack(tmp_path_factory, linear, test_xy, h):
    """The same images and model, but the pack says it was built from another checkpoint (V104)."""
    return save_pack(h.pack(linear, *test_xy, sha="cd" * 32), tmp_path_factory.mktemp("other") / "other.npz")


def test_no_gates_is_not_gated_never_passed(linear_onnx, pack_file, tmp_path, invoke):
    res = invoke("verify", linear_onnx, "--pack", pack_file, *NO_LIVE, *_reports(tmp_path))
    assert res.exit_code == 0, res.output
    assert "NOT GATED: no gates set: nothing was judged" in res.stdout.replace("\n", " ")
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["status"] == "not_gated" and rep["gate_results"] == [] and rep["warning_results"] == []
    md = (tmp_path / "r.md").read_text()
    assert "➖ **not gated** (no gates set: nothing was judged)" in md
    junit = (tmp_path / "r.xml").read_text()
    root = ET.fromstring(junit)
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("1", "0", "1")
    (case,) = root.iter("testcase")
    assert case.get("name") == "not gated" and case.find("skipped") is not None
    _no_passed(res.stdout, md, junit)
    report = VerifyReport.from_json(tmp_path / "r.json")
    assert not report.passed and not report.failed and report.status == "not_gated"


def test_gates_that_pass_still_say_passed(linear_onnx, pack_file, tmp_path, invoke):
    res = invoke("verify", linear_onnx, "--pack", pack_file, *NO_LIVE, "--min-clean", 0.5, *_reports(tmp_path))
    assert res.exit_code == 0, res.output
    assert "PASSED: all 1 gates passed" in res.stdout
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "passed"
    assert "✅ **passed** (1/1 gates)" in (tmp_path / "r.md").read_text()


def test_a_pack_for_another_model_fails_unless_allowed(linear_onnx, other_model_pack, tmp_path, invoke,
                                                       assert_one_line_error):
    res = invoke("verify", linear_onnx, "--pack", other_model_pack, *NO_LIVE, *_reports(tmp_path), "-q")
    assert_one_line_error(res, 1, "mismatch V104", "the pack was built from checkpoint cdcdcdcdcdcd",
                          "--allow-mismatch")
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["status"] == "failed" and [w["name"] for w in rep["warning_results"]] == ["mismatch V104"]
    root = ET.parse(tmp_path / "r.xml").getroot()
    assert (root.get("tests"), root.get("failures")) == ("1", "1")
    (case,) = root.iter("testcase")
    fail = case.find("failure")
    assert case.get("name") == "mismatch V104" and fail.get("type") == "MismatchWarning"
    assert "--allow-mismatch" in fail.get("message")
    md = (tmp_path / "r.md").read_text()
    assert "❌ **failed** (mismatch V104)" in md and "| mismatch V104 | Pack built for another model |" in md
    assert "FAILED: mismatch V104" in res.stdout and "mismatch V104" in res.stdout

    allowed = tmp_path / "allowed"
    res = invoke("verify", linear_onnx, "--pack", other_model_pack, *NO_LIVE, *_reports(allowed), "--allow-mismatch")
    assert res.exit_code == 0, res.output
    assert "V104" in res.stdout and "NOT GATED" in res.stdout  # still warned, then nothing judged
    rep = json.loads((allowed / "r.json").read_text())
    assert rep["status"] == "not_gated" and rep["policy"]["allow_mismatch"] is True
    assert "V104" in {w["code"] for w in rep["warnings"]} and rep["warning_results"] == []
    _no_passed(res.stdout, (allowed / "r.md").read_text(), (allowed / "r.xml").read_text())

    # with gates, --allow-mismatch leaves the verdict to the gates alone
    res = invoke("verify", linear_onnx, "--pack", other_model_pack, *NO_LIVE, "--min-clean", 0.99,
                 "--allow-mismatch", "-q")
    assert_one_line_error(res, 1, "1 of 1 gates failed: min_clean")
    assert "V104" not in res.stderr


def test_an_eps_mismatch_fails_unless_allowed(linear, linear_onnx, test_xy, h, tmp_path, invoke,
                                              assert_one_line_error):
    """The artifact records eps 0.1; a pack at 0.2 judges another budget than it was made for (V109)."""
    pack = save_pack(h.pack(linear, *test_xy, eps=0.2), tmp_path / "eps.npz")
    res = invoke("verify", linear_onnx, "--pack", pack, *NO_LIVE, "--min-clean", 0.5, "-q")
    assert_one_line_error(res, 1, "mismatch V109", "eps 0.2", "eps 0.1", "--allow-mismatch")
    assert invoke("verify", linear_onnx, "--pack", pack, *NO_LIVE, "--min-clean", 0.5, "--allow-mismatch",
                  "-q").exit_code == 0


def test_strict_fails_on_any_warning(linear_onnx, pack_file, tmp_path, invoke, assert_one_line_error):
    """The pack holds no white-box attack on this artifact: V112 (a warning, not a mismatch)."""
    res = invoke("verify", linear_onnx, "--pack", pack_file, *NO_LIVE, "--min-clean", 0.5, "-q",
                 "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output  # V112 alone does not fail by default
    assert "V112" in {w["code"] for w in json.loads((tmp_path / "r.json").read_text())["warnings"]}
    res = invoke("verify", linear_onnx, "--pack", pack_file, *NO_LIVE, "--min-clean", 0.5, "--strict", "-q",
                 "--junit", tmp_path / "s.xml")
    assert_one_line_error(res, 1, "strict V112", "--strict")
    names = [c.get("name") for c in ET.parse(tmp_path / "s.xml").getroot().iter("testcase")]
    assert names[-1] == "strict V112" and names[0].startswith("min_clean")
    # and without gates: --strict still fails, it is not "not gated"
    res = invoke("verify", linear_onnx, "--pack", pack_file, *NO_LIVE, "--strict", "-q")
    assert_one_line_error(res, 1, "strict V112")


def test_judging_warnings_by_policy():
    warn = [finding("pack_model_mismatch", "other model"), finding("upper_bound_only", "upper bound"),
            finding("metadata_mismatch", "eps", "warning"), finding("provenance_unknown", "a note", "info")]
    assert set(MISMATCH_CODES) == {"V103", "V104", "V105", "V109"}
    assert [v.name for v in judge_warnings(Policy(), warn)] == ["mismatch V104", "mismatch V109"]
    assert judge_warnings(Policy(allow_mismatch=True), warn) == []
    assert [v.name for v in judge_warnings(Policy(strict=True), warn)] == ["mismatch V104", "strict V112",
                                                                           "mismatch V109"]
    assert [v.name for v in judge_warnings(Policy(allow_mismatch=True, strict=True), warn)] == [
        "strict V104", "strict V112", "strict V109"]  # notes (info) never fail
    assert Policy.from_dict(Policy(strict=True).to_dict()) == Policy(strict=True)
    assert Policy.from_dict(None) == Policy()


def test_a_stored_report_rejudges_with_the_same_policy(linear_onnx, other_model_pack, tmp_path):
    report = run(linear_onnx, other_model_pack, live=[], gates=Gates.create(min_clean=0.5))
    assert report.status == "failed" and [w.name for w in report.warning_failures()] == ["mismatch V104"]
    back = VerifyReport.from_json(report.write_json(tmp_path / "r.json"))
    assert back.rejudge().status == "failed"  # the stored policy
    assert back.rejudge(policy=Policy(allow_mismatch=True)).status == "passed"
    assert back.rejudge(Gates(), Policy(allow_mismatch=True)).status == "not_gated"
    allowed = run(linear_onnx, other_model_pack, live=[], policy=Policy(allow_mismatch=True))
    again = VerifyReport.from_json(allowed.to_json())
    assert again.status == "not_gated" and again.rejudge().status == "not_gated"
    assert again.rejudge(Gates.create(min_clean=0.5)).status == "passed"  # its policy travels with it

    # a schema-2 report (before warnings were judged) is read with today's default policy
    old = report.to_dict()
    old.update(schema_version=2, status="passed", gates={}, gate_results=[])
    old.pop("policy"), old.pop("warning_results")
    legacy = VerifyReport.from_dict(old)
    assert legacy.schema_version == 3 and legacy.status == "failed"
    assert legacy.rejudge(policy=Policy(allow_mismatch=True)).status == "not_gated"
