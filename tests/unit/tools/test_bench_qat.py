"""tools/bench_qat.py: one real bench of the session's digits run (FP32, two PTQ calibrations and QAT, packed
white-box on each file and verified), its table and JSON; CIFAR-10 skipped in one line without its archive;
results never overwritten without --force."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bq(load_tool):
    return load_tool("bench_qat")


def test_bench_rows_table_and_json(bq, digits_robust_run: Path, tmp_path: Path, capsys) -> None:
    prefix = tmp_path / "res"
    argv = ["--run-dir", str(digits_robust_run), "--work", str(tmp_path / "work"), "--n", "40",
            "--calib", "clean,adversarial", "--qat-epochs", "1", "--qat-train-subset", "256",
            "--artifact-attacks", "apgd-ce", "--results", str(prefix)]
    assert bq.main(argv) == 0
    payload = json.loads(Path(f"{prefix}_digits.json").read_text())
    assert payload["dataset"] == "digits" and len(payload["runs"]) == 1 and payload["command"].endswith(str(prefix))
    result = payload["runs"][0]
    assert result["seed"] == 0  # the run's recipe seed
    rows = {r["artifact"]: r for r in result["rows"]}
    assert list(rows) == ["FP32", "PTQ INT8 (clean calib.)", "PTQ INT8 (adversarial calib.)", "QAT INT8"]
    for r in rows.values():
        assert r["clean"] >= 0.85 and 0.0 <= r["whitebox"] <= r["clean"] and r["worst_case"] <= r["whitebox"]
        assert r["agreement_fp32"] >= 0.9 and r["size_bytes"] > 1000 and r["latency_ms"] > 0
        assert r["twin_random"] is not None and r["twin_random"] >= 0.9  # each file attacked through its twin
    assert rows["FP32"]["twin_random"] == 1.0
    assert rows["QAT INT8"]["size_bytes"] < rows["FP32"]["size_bytes"]  # int8 weights
    assert result["qat"]["epochs"] == 1 and result["qat"]["train_images"] == 256
    assert result["artifact_attacks"] == ["apgd-ce"] and result["n"] == 40
    md = Path(f"{prefix}_digits.md").read_text()
    assert "| QAT INT8 |" in md and "issue 17 target" in md and "PTQ INT8 (adversarial calib.)" in md
    assert "| artifact | clean |" in capsys.readouterr().out

    before = {p.name: p.read_bytes() for p in tmp_path.glob("res_*")}
    assert bq.main(argv) == 2  # refused before any work, nothing rewritten
    assert "exists: pass --force" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.glob("res_*")} == before


def test_summary_over_seeds_states_the_target_on_the_mean_and_on_every_seed(bq) -> None:
    def run(seed, fp32, qat):
        return {"seed": seed, "rows": [{"artifact": "FP32", "clean": fp32[0], "worst_case": fp32[1]},
                                       {"artifact": "QAT INT8", "clean": qat[0], "worst_case": qat[1]}]}

    runs = [run(0, (0.99, 0.60), (0.99, 0.605)), run(1, (0.98, 0.62), (0.98, 0.605))]
    result = {"dataset": "digits", "runs": runs, "summary": bq.summarize(runs)}
    qat = result["summary"][1]
    assert qat["runs"] == 2 and qat["worst_vs_fp32"]["min"] == pytest.approx(-1.5)
    assert qat["worst_vs_fp32"]["mean"] == pytest.approx(-0.5) and qat["clean_vs_fp32"]["max"] == pytest.approx(0.0)
    text = bq.render_summary(result)
    assert "summary over 2 seeds (0, 1)" in text and "| QAT INT8 | 98.50 [98.00, 99.00] | 60.50 [60.50, 60.50] |" in text
    assert "met on the mean, NOT met on every seed" in text


def test_cifar10_is_skipped_in_one_line_without_its_archive(bq, tmp_path: Path, capsys) -> None:
    code = bq.main(["--dataset", "cifar10", "--data-root", str(tmp_path / "none"), "--cifar-tar",
                    str(tmp_path / "missing.tar.gz"), "--work", str(tmp_path / "work")])
    assert code == 3  # nothing ran: the environment lacks the data
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("cifar10: skipped: no CIFAR-10 image folder")
    assert not (tmp_path / "none").exists()


def test_run_dir_needs_one_dataset(bq, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        bq.main(["--dataset", "digits,cifar10", "--run-dir", str(tmp_path)])
    assert e.value.code == 2
    for bad in (["--seeds", "0,x"], ["--qat-scales", "observed,bogus"]):
        with pytest.raises(SystemExit) as e:
            bq.main(bad)
        assert e.value.code == 2
    assert bq.qat_row("observed", ["observed", "learned"]) == "QAT INT8"
    assert bq.qat_row("learned", ["observed", "learned"]) == "QAT INT8 (learned scales)"
    assert bq.qat_row("learned", ["learned"]) == "QAT INT8"
