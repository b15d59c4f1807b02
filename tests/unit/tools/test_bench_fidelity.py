"""tools/bench_fidelity.py's pure parts: verify's per-sample worst case rebuilt from any report's
per_sample section (new attack labels and subset attacks included), the comparison on the samples
verify covered, the table, the exit-3 line and the --json guard. No torchattacks, torch or onnx needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def bf(load_tool):
    return load_tool("bench_fidelity")


def test_bits_round_trip(bf):
    flags = np.array([1, 0, 0, 1, 1], bool)
    assert bf.encode_bits(flags) == "10011"
    assert np.array_equal(bf.decode_bits("10011"), flags)
    with pytest.raises(ValueError):
        bf.decode_bits("10x1")


def test_verify_flags_full_and_subset_attacks(bf):
    # 6 samples; transfer attacks cover all, Square only positions 1, 3, 4 (its bits in that order)
    per_sample = {"clean": "111110", "pgd20@0.15": "101110", "fgsm@0.15": "111100",
                  "square1000@0.15": "110", "square_indices": [1, 3, 4]}
    vf = bf.verify_flags(per_sample, 6)
    assert vf.used == ["pgd20@0.15", "fgsm@0.15", "square1000@0.15"] and vf.skipped == []
    assert bf.encode_bits(vf.covered) == "010110"
    # sample 1: pgd20 broke it; 3: robust everywhere; 4: fgsm and Square broke it
    assert bf.encode_bits(vf.flags) == "101100"
    assert vf.acc == pytest.approx(1 / 3)


def test_verify_flags_take_new_labels_and_skip_unmappable(bf):
    per_sample = {"clean": "1111", "pgd20@0.15": "1111", "apgd-ce@0.15 (white-box on the artifact)": "1101",
                  "square5000@0.15": "1111", "square_indices": None, "mystery": "10"}
    vf = bf.verify_flags(per_sample, 4)
    assert "apgd-ce@0.15 (white-box on the artifact)" in vf.used and vf.skipped == ["mystery"]
    assert bf.encode_bits(vf.flags) == "1101" and vf.covered.all()
    with pytest.raises(ValueError):
        bf.verify_flags({"clean": "111"}, 4)
    with pytest.raises(ValueError):
        bf.verify_flags({"pgd20": "1111"}, 4)


def test_compare_on_the_covered_samples_only(bf):
    vf = bf.VerifyFlags(flags=np.array([1, 1, 1, 0, 1], bool), covered=np.array([1, 1, 1, 1, 0], bool),
                        used=[], skipped=[])
    independent = np.array([1, 0, 1, 1, 0], bool)  # sample 4 is outside verify's coverage: not counted
    r = bf.compare(0.75, vf, independent)
    assert r["n"] == 4 and r["independent_acc"] == 0.75 and r["union_acc"] == 0.5
    assert r["gap_pt"] == 0.0 and r["gap_union_pt"] == 25.0
    assert r["broken_only_by_independent"] == 1 and r["broken_only_by_verify"] == 1
    assert bf.compare(None, vf, independent)["verify_acc"] == 0.75  # no headline: its flags
    empty = bf.VerifyFlags(vf.flags, np.zeros(5, bool), [], [])
    assert bf.compare(0.5, empty, independent)["gap_pt"] is None


def test_report_coverage_groups_attacks_by_kind(bf):
    results = {"worst_case": {"label": "worst(pgd20+square1000)@0.15", "acc": 0.6, "n": 10,
                              "attacks": ["pgd20@0.15", "square1000@0.15"]},
               "attacks": [{"label": "pgd20@0.15", "kind": "transfer"}, {"label": "square1000@0.15", "kind": "query"}]}
    cov = bf.report_coverage(results)
    assert cov["tiers"] == ["transfer", "query"] and cov["acc"] == 0.6
    assert cov["by_kind"] == {"transfer": ["pgd20@0.15"], "query": ["square1000@0.15"]}
    results["worst_case"]["tiers"] = ["white-box on the artifact", "query-only on the runtime"]
    assert bf.report_coverage(results)["tiers"] == ["white-box on the artifact", "query-only on the runtime"]


def test_table(bf):
    rows = [{"dataset": "digits", "artifact": "model.onnx", "n": 360, "eps": 0.15, "verify_acc": 0.683,
             "independent_acc": 0.617, "union_acc": 0.617, "gap_pt": 6.67, "gap_union_pt": 6.67, "verify_s": 11.3,
             "independent_s": 51.9,
             "verify_coverage": {"label": "worst(pgd20)@0.15", "by_kind": {"transfer": ["pgd20"]}},
             "independent_attacks": [{"name": "apgd-ce", "broke": 125}], "surrogate": {"source": "onnx2torch(x)"},
             "notes": ["a note"]},
            {"dataset": "digits", "artifact": "model.int8.onnx", "n": 360, "eps": 0.15, "verify_acc": 0.62,
             "independent_acc": 0.615, "union_acc": 0.61, "gap_pt": 0.5, "gap_union_pt": 1.0, "verify_s": 1.0,
             "independent_s": 2.0}]
    text = bf.format_table(rows, target_pt=1.0)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["dataset", "artifact", "n", "eps"]
    assert "68.3%" in lines[2] and "61.7%" in lines[2] and "+6.7" in lines[2] and lines[2].rstrip().endswith("NO")
    assert lines[3].rstrip().endswith("yes")
    assert "transfer: pgd20" in text and "apgd-ce -125" in text and "note: a note" in text


def test_eps_label_and_verify_settings(bf):
    assert bf.eps_label(8 / 255) == "8/255" and bf.eps_label(0.15) == "0.15" and bf.eps_label(None) == "—"
    assert bf.parse_settings(["square_n=null", "whitebox=true", "tier=white-box"]) == \
        {"square_n": None, "whitebox": True, "tier": "white-box"}
    with pytest.raises(bf.Usage):
        bf.parse_settings(["no-equals"])


def test_missing_modules_line(bf):
    have = {"torch", "onnx"}
    missing = bf.missing_modules({"torch": "torch", "torchattacks": "torchattacks", "onnx2torch": "onnx2torch"},
                                 find_spec=lambda m: object() if m in have else None)
    assert missing == ["torchattacks", "onnx2torch"]
    assert "pip install torchattacks onnx2torch" in bf.missing_line(missing)


def test_json_guard_and_write(bf, tmp_path):
    out = tmp_path / "r.json"
    bf.check_json_target(out, force=False)
    bf.write_json(out, {"a": np.float32(0.5), "b": np.array([1, 2]), "p": Path("x")})
    assert json.loads(out.read_text()) == {"a": 0.5, "b": [1, 2], "p": "x"}
    with pytest.raises(bf.Usage):
        bf.check_json_target(out, force=False)
    bf.check_json_target(out, force=True)
    assert bf.main(["--run-dir", str(tmp_path), "--json", str(out)]) == 2  # refused before any work
    assert bf.main(["--run-dir", str(tmp_path), "--formats", "fp64"]) == 2


def test_exit_3_names_what_to_install(bf, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bf, "missing_modules", lambda: ["torchattacks", "onnx2torch"])
    assert bf.main(["--run-dir", str(tmp_path), "--skip-cifar"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bench_fidelity: missing torchattacks, onnx2torch: pip install torchattacks onnx2torch "
                   "(tool-only, not a ciard-deploy dependency)"]
