"""`ciard run` with a ``quantize:`` section (issue 17 item 4): distill -> export -> quantize -> pack -> verify
on the quick CIARD digits recipe, shrunk by ``--set`` (short teachers, as tests/integration/test_workflow.py
makes them, so the session's teacher cache serves both; a 3-epoch student; a 1-epoch QAT on 256 images;
small pack and verify budgets, no gates). The QAT artifact lands in DIR/qat/, is attacked white-box by the
pack stage (through its twin, which has to pass the fidelity bar) and verified like the export's artifacts;
a second call skips every stage; a changed ``quantize.epochs`` runs quantize, pack and verify again but
neither distill nor export.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ciard_deploy.cli import app

pytestmark = [pytest.mark.integration]

RECIPE = "quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15"
runner = CliRunner()


@pytest.fixture(scope="module")
def sets(short_digits_teachers) -> list[str]:
    return [*short_digits_teachers,
            "train.epochs=3", "train.eval_every=3", "train.final_attacks=[]", "deploy.formats=[onnx-int8]",
            "deploy.pack.n=100", "deploy.parity_n=100", "deploy.calib_n=128", "deploy.pack.attacks=[fgsm]",
            "deploy.pack.artifact_attacks=[mtpgd10]",
            "deploy.live_attacks=[]", "deploy.gates={}",
            "quantize={mode: qat, epochs: 1, train_subset: 256}"]


def run_cli(out: Path, sets: list[str], *extra: str) -> tuple:
    summary = out.parent / f"summary-{time.monotonic_ns()}.json"
    flags = [a for s in [*sets, *extra] for a in ("--set", s)]
    res = runner.invoke(app, ["run", RECIPE, "--out", str(out), "--threads", "1", "--json", str(summary), *flags])
    assert res.exit_code == 0, res.stderr[-1500:]
    result = json.loads(summary.read_text())
    return res, result, {k: v["action"] for k, v in result["stages"].items()}


def test_a_quantize_section_adds_a_stage_whose_artifact_is_packed_and_verified(tmp_path, sets):
    out = tmp_path / "digits-qat"
    res, result, actions = run_cli(out, sets)
    assert actions == dict.fromkeys(("distill", "export", "quantize", "pack", "verify"), "ran")
    assert list(result["state"]["stages"]) == ["distill", "export", "pack", "verify", "quantize"]  # order of creation
    qat = out / "qat" / "model.qat.int8.onnx"
    assert qat.is_file() and (out / "qat" / "manifest.json").is_file()
    stages = result["state"]["stages"]
    assert set(stages["quantize"]["outputs"]) == {"qat/model.qat.int8.onnx", "qat/manifest.json"}
    assert stages["quantize"]["inputs"]["quantize"]["epochs"] == 1
    assert "qat/model.qat.int8.onnx" in stages["pack"]["inputs"]["artifacts"]  # attacked white-box
    assert "qat/model.qat.int8.onnx" in stages["verify"]["inputs"]["artifacts"]
    report = json.loads((out / "verify" / "onnx-int8-qat.json").read_text())
    assert any(k.startswith("wb(") for k in report["results"]) or "wb(mtpgd10)" in json.dumps(report["results"])
    rows = {r["name"]: r for r in result["artifacts"]}
    assert {"onnx-int8", "onnx-int8 (qat)"} <= set(rows)  # onnx-int8 exports its FP32 ONNX too
    assert rows["onnx-int8 (qat)"]["file"] == "qat/model.qat.int8.onnx"
    assert rows["onnx-int8 (qat)"]["reports"]["json"] == "verify/onnx-int8-qat.json"
    assert "model.qat.int8.onnx" in res.stdout or "onnx-int8 (qat)" in res.stdout

    _, _, actions = run_cli(out, sets)
    assert set(actions.values()) == {"skipped"}

    _, result, actions = run_cli(out, sets, "quantize.epochs=2")
    assert actions == {"distill": "skipped", "export": "skipped", "quantize": "ran", "pack": "ran", "verify": "ran"}
    assert "inputs changed: quantize.epochs" in result["stages"]["quantize"]["reason"]
