"""README's first command, for real: `ciard quickstart` on the bundled digits data (the shipped quick
CIARD recipe, unshortened: its two teachers, the CIARD student, ONNX FP32 + INT8, the pack, verify and
the reports), then a second call that skips every stage.

The same run is the evidence on real data (digits, fixed seed) that the CIARD student is accurate
(clean >= 0.90) and robust (pgd20 at the recipe's eps at least 0.4 above an undefended model of the
same architecture, trained here too), and that the CIARD parts were really active during the run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ciard_deploy.cli import app
from ciard_deploy.config import find_recipe, load_recipe
from ciard_deploy.distill.trainer import run
from ciard_deploy.fingerprint import sha256_file

# `ciard quickstart` from an empty teacher cache (two teachers, the student, export, the pack with white-box
# attacks on both artifacts, verify) took ~180 s on 2 loaded cores: give the module's first test room for a
# machine 3x slower than that
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

UNDEFENDED = "quick/digits_natural_none_to_tiny_cnn"
STAGES = ("distill", "export", "pack", "verify")
runner = CliRunner()


def quickstart(out: Path, json_out: Path) -> tuple:
    t0 = time.perf_counter()
    res = runner.invoke(app, ["quickstart", "--out", str(out), "--json", str(json_out)])
    return res, time.perf_counter() - t0


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ciard_cache) -> dict:
    """`ciard quickstart` once (teachers cached per session) and the undefended reference."""
    cache = ciard_cache  # the same cache the autouse fixture uses
    root = tmp_path_factory.mktemp("quickstart")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIARD_CACHE", str(cache))
        res, seconds = quickstart(root / "qs", root / "first.json")
        plain = run(load_recipe(find_recipe(UNDEFENDED)), root / "undefended")
    summary = json.loads((root / "qs" / "run" / "summary.json").read_text()) if res.exit_code == 0 else {}
    return {"out": root / "qs", "res": res, "seconds": seconds, "result": root / "first.json",
            "ciard": summary, "plain": plain}


def test_quickstart_exits_0_with_the_table_and_the_reports(runs):
    res, out = runs["res"], runs["out"]
    assert res.exit_code == 0, (res.stdout, res.stderr)
    assert "quickstart: quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15" in res.stderr
    assert "ciard tiny_cnn on digits" in res.stdout and "PASSED: every gate of 2 artifacts passed" in res.stdout
    assert "model.onnx" in res.stdout and "model.int8.onnx" in res.stdout and "pass 6/6" in res.stdout
    result = json.loads(runs["result"].read_text())
    assert result["status"] == "passed" and result["failures"] == []
    assert {k: v["action"] for k, v in result["stages"].items()} == dict.fromkeys(STAGES, "ran")
    rows = {r["name"]: r for r in result["artifacts"]}
    assert set(rows) == {"onnx", "onnx-int8"}
    for r in rows.values():
        # the recipe's own gates (clean >= 0.90, worst case >= 0.45 with Square 1000 live on the runtime)
        assert r["clean"] >= 0.90 and r["worst_case"]["acc"] >= 0.45
        wc = r["worst_case"]
        assert wc["label"] == "worst(wb(apgd-ce+apgd-t+mtpgd100)+apgd-ce+apgd-t+square1000)@0.15"
        assert wc["upper_bound"] is False and "white-box on this artifact" in wc["covers"]
        assert r["gates"] == {"passed": 6, "total": 6, "failed": []} and r["agreement"] >= 0.97
        for rel in r["reports"].values():
            assert (out / rel).stat().st_size > 200, rel
        rep = json.loads((out / r["reports"]["json"]).read_text())
        assert rep["kind"] == "ciard.verify_report" and rep["pack"]["n"] == 360  # the whole digits test split
    assert rows["onnx-int8"]["size"] < rows["onnx"]["size"]
    for rel in ("verify/accuracy.png", "run/plots/accuracy.png", "run/plots/losses.png"):
        assert (out / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", rel


def test_quickstart_artifacts_match_their_manifest_and_the_state_is_a_quickstarts(runs):
    from ciard_deploy.export.manifest import check_files, load_manifest

    out = runs["out"]
    m = load_manifest(out / "export")
    assert [a.name for a in m.artifacts] == ["onnx", "onnx-int8"] and m.passed
    assert check_files(m, out / "export") == [] and m.source["sha256"] == sha256_file(out / "run" / "student_best.safetensors")
    st = json.loads((out / "workflow.json").read_text())
    assert st["entry"] == "quickstart" and st["status"] == "passed" and st["recipe"]["overrides"] == []
    assert all(st["stages"][s]["status"] == "done" for s in STAGES)


def test_quickstart_again_skips_every_stage(runs, tmp_path):
    out = runs["out"]
    before = {p: sha256_file(p) for p in out.rglob("*") if p.is_file() and p.name not in ("workflow.json", "recipe.yaml")}
    res, seconds = quickstart(out, tmp_path / "again.json")
    assert res.exit_code == 0, res.stderr
    assert res.stderr.count("skipped (up to date)") == 4 and "PASSED" in res.stdout
    again = json.loads((tmp_path / "again.json").read_text())
    assert {k: v["action"] for k, v in again["stages"].items()} == dict.fromkeys(STAGES, "skipped")
    assert {p: sha256_file(p) for p in before} == before
    assert seconds < runs["seconds"] / 3, (seconds, runs["seconds"])


def test_ciard_student_is_accurate_and_robust(runs):
    ciard, plain = runs["ciard"], runs["plain"]
    label = "pgd20@0.15"
    assert ciard["eps_label"] == "0.15" and ciard["selection"]["attack"] == label
    best, ref = ciard["best"], plain["best"]
    print(f"\nCIARD student (test, n={ciard['test_n']}): clean {best['clean']:.4f}, {label} {best[label]:.4f}; "
          f"undefended: clean {ref['clean']:.4f}, {label} {ref[label]:.4f}")
    assert best["clean"] >= 0.90
    assert ref["clean"] >= 0.90  # the reference is a real model, just not robust
    assert best[label] >= ref[label] + 0.4


def test_ciard_parts_were_active(runs):
    run_dir = Path(runs["ciard"]["run_dir"])
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["teacher_lr"] == 0.0  # robust-teacher retraining starts after its delay ...
    assert any(ln["teacher_lr"] > 0 and ln.get("loss_teacher", 0) > 0 for ln in lines)  # ... then runs
    assert any(ln["push_n"] > 0 and ln["push_weight"] > 0 for ln in lines)  # the push term was used
    assert all(1.0 <= ln["tau_robust"] <= 10.0 and 1.0 <= ln["tau_clean"] <= 10.0 for ln in lines)
    refs = runs["ciard"]["teachers"]
    assert refs["clean"]["source"] == refs["robust"]["source"] == "recipe"
    # the retrained robust teacher differs from the cached one it started from
    import torch

    from ciard_deploy.checkpoints import read_state_dict

    state = torch.load(run_dir / "train_state.pt", weights_only=True)
    start = read_state_dict(refs["robust"]["path"])
    key = next(k for k in start if k.endswith("weight") and start[k].ndim == 4)
    assert not torch.equal(state["teachers"]["robust"][key], start[key])
