"""`ciard run` with a ``quantize:`` section (issue 17 item 4): distill -> export -> quantize -> pack -> verify
on the quick CIARD digits recipe, shrunk by ``--set`` (short teachers, as tests/integration/test_workflow.py
makes them, so the session's teacher cache serves both; a 3-epoch student; a 1-epoch QAT on 256 images;
small pack and verify budgets, no gates). The QAT artifact lands in DIR/qat/, is attacked white-box by the
pack stage (through its twin, which has to pass the fidelity bar) and verified like the export's artifacts.

One run folder is made per module, for real: its first call is interrupted (Ctrl-C) inside the QAT
fine-tuning, so the second call, which finishes it, also proves that an interrupted quantize stage runs
again alone (distill and export skipped) and then pack and verify. The re-runs that change the folder
(``--from quantize``, a hand-edited QAT artifact, a changed ``quantize.epochs``) work on copies of it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from ciard_deploy.fingerprint import sha256_file

pytestmark = [pytest.mark.integration]

RECIPE = "quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15"
QAT = "qat/model.qat.int8.onnx"


@pytest.fixture(scope="module")
def sets(short_digits_teachers) -> list[str]:
    return [*short_digits_teachers,
            "train.epochs=3", "train.eval_every=3", "train.final_attacks=[]", "deploy.formats=[onnx-int8]",
            "deploy.pack.n=100", "deploy.parity_n=100", "deploy.calib_n=128", "deploy.pack.attacks=[fgsm]",
            "deploy.pack.artifact_attacks=[mtpgd10]",
            "deploy.live_attacks=[]", "deploy.gates={}",
            "quantize={mode: qat, epochs: 1, train_subset: 256}"]


def call(invoke, out: Path, sets: list[str], *extra: str) -> tuple:
    """`ciard run` into ``out`` with ``--set`` of each of ``sets`` and the flags ``extra``; (its result, the --json
    summary or None, the action of each stage)."""
    summary = out.parent / f"summary-{time.monotonic_ns()}.json"
    flags = [a for s in sets for a in ("--set", s)]
    res = invoke("run", RECIPE, "--out", out, "--threads", 1, "--json", summary, *flags, *extra)
    result = json.loads(summary.read_text()) if summary.is_file() else None
    return res, result, {k: v["action"] for k, v in (result or {}).get("stages", {}).items()}


def run_cli(invoke, out: Path, sets: list[str], *extra: str) -> tuple:
    res, result, actions = call(invoke, out, sets, *extra)
    assert res.exit_code == 0, res.stderr[-1500:]
    return res, result, actions


@pytest.fixture(scope="module")
def first(tmp_path_factory, sets, ciard_cache, invoke) -> dict:
    """`ciard run` stopped by Ctrl-C in the first QAT fine-tuning step, then `ciard run` finishing it."""
    from ciard_deploy.quantize_aware import finetune

    out = tmp_path_factory.mktemp("wfq") / "digits-qat"

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    # module fixtures start before conftest's per-test cache isolation: point the teacher cache there now
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CIARD_CACHE", str(ciard_cache))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(finetune, "train_step", ctrl_c)  # inside quantize_aware.finetune, after its calibration
            stopped, _, _ = call(invoke, out, sets)
        interrupted = json.loads((out / "workflow.json").read_text())
        left = sorted(p.relative_to(out).as_posix() for p in out.iterdir())
        res, result, actions = run_cli(invoke, out, sets)
    return {"out": out, "stopped": stopped, "interrupted": interrupted, "left": left, "res": res, "result": result,
            "actions": actions}


# --------------------------------------------------------------------------- the first run, resumed
def test_an_interrupted_quantize_stage_leaves_no_qat_folder_and_runs_again_alone(first):
    stopped, st = first["stopped"], first["interrupted"]
    assert stopped.exit_code == 130, (stopped.stdout, stopped.stderr)
    assert "interrupted" in stopped.stderr and f"resume with: ciard run {RECIPE} --out {first['out']}" \
        in stopped.stderr and "Traceback" not in stopped.output
    assert st["status"] == "interrupted"
    stages = st["stages"]
    assert {k: v["status"] for k, v in stages.items()} == {"distill": "done", "export": "done",
                                                            "quantize": "interrupted", "pack": "pending",
                                                            "verify": "pending"}
    assert "outputs" not in stages["quantize"] and stages["quantize"]["error"] == "KeyboardInterrupt"
    assert "qat" not in first["left"] and "qat.partial" not in first["left"]  # nothing half-written
    assert not any(name.startswith(".qat") for name in first["left"])  # nor export_qat's own staging

    assert first["actions"] == {"distill": "skipped", "export": "skipped", "quantize": "ran", "pack": "ran",
                                "verify": "ran"}
    assert first["result"]["stages"]["quantize"]["reason"] == "interrupted earlier"
    assert "quantize: running (interrupted earlier)" in first["res"].stderr
    assert not (first["out"] / "qat.partial").exists()


def test_a_quantize_section_adds_a_stage_whose_artifact_is_packed_and_verified(first):
    out, res, result = first["out"], first["res"], first["result"]
    assert list(result["state"]["stages"]) == ["distill", "export", "pack", "verify", "quantize"]  # order of creation
    qat = out / QAT
    assert qat.is_file() and (out / "qat" / "manifest.json").is_file()
    assert sorted(p.name for p in (out / "qat").iterdir()) == ["manifest.json", "model.qat.int8.onnx"]
    stages = result["state"]["stages"]
    assert set(stages["quantize"]["outputs"]) == {QAT, "qat/manifest.json"}
    assert stages["quantize"]["outputs"][QAT] == sha256_file(qat)
    assert stages["quantize"]["inputs"]["quantize"]["epochs"] == 1
    assert QAT in stages["pack"]["inputs"]["artifacts"]  # attacked white-box
    assert QAT in stages["verify"]["inputs"]["artifacts"]
    report = json.loads((out / "verify" / "onnx-int8-qat.json").read_text())
    assert "wb(mtpgd10)@0.15" in report["results"]["robust_acc"]
    assert report["artifact"]["name"] == "onnx-int8 (qat)" and report["artifact"]["path"] == str(qat)
    rows = {r["name"]: r for r in result["artifacts"]}
    assert set(rows) == {"onnx", "onnx-int8", "onnx-int8 (qat)"}  # onnx-int8 exports its FP32 ONNX too
    assert rows["onnx-int8 (qat)"]["file"] == QAT and rows["onnx-int8 (qat)"]["precision"] == "int8"
    assert rows["onnx-int8 (qat)"]["reports"]["json"] == "verify/onnx-int8-qat.json"
    assert "model.qat.int8.onnx" in res.stdout and f"QAT manifest {out / 'qat' / 'manifest.json'}" in res.stdout
    # the --json summary's paths list the quantize stage's folder, between the export's and the pack
    paths = result["paths"]
    assert paths["qat"] == str(out / "qat") and paths["qat_manifest"] == str(out / "qat" / "manifest.json")
    assert list(paths).index("manifest") < list(paths).index("qat") < list(paths).index("pack")


def test_a_second_run_skips_every_stage_and_touches_nothing(first, sets, invoke, snapshot):
    out = first["out"]
    before = snapshot(out)
    res, _, actions = run_cli(invoke, out, sets)
    assert actions == dict.fromkeys(("distill", "export", "quantize", "pack", "verify"), "skipped")
    assert res.stderr.count("skipped (up to date)") == 5
    assert snapshot(out) == before


# --------------------------------------------------------------------------- the run folder as the verbs' input
def test_verify_of_the_run_folder_measures_the_qat_artifact_too_named_apart(first, invoke, snapshot, tmp_path):
    out = first["out"]
    before = snapshot(out)
    stage = json.loads((out / "verify" / "onnx-int8-qat.json").read_text())
    res = invoke("verify", out, "--threads", 1)  # the recipe's settings: no live attacks, no gates
    assert res.exit_code == 0, res.output
    assert f"verify: 3 artifacts of the run folder {out} (model.onnx, model.int8.onnx, model.qat.int8.onnx " \
           f"(onnx-int8 (qat))) against {out / 'pack.npz'}, with no gates" in res.stderr
    assert "onnx-int8 (qat) on onnxruntime" in res.stdout and "model.int8.onnx on onnxruntime" in res.stdout
    res = invoke("verify", out, "--threads", 1, "--min-clean", 0.9999)  # each failure named as the summary names it
    assert res.exit_code == 1 and "onnx-int8 (qat): 1 of 1 gates failed: min_clean" in res.stderr, res.output
    # the QAT artifact itself finds the run's pack; its report names it as the stage's does, same numbers
    res = invoke("verify", out / QAT, "--live", "none", "--threads", 1, "--json", tmp_path / "q.json")
    assert res.exit_code == 0 and f"using {out / 'pack.npz'} from the run folder {out}" in res.stderr, res.output
    rep = json.loads((tmp_path / "q.json").read_text())
    assert rep["artifact"]["name"] == "onnx-int8 (qat)" and rep["pack"]["path"] == str(out / "pack.npz")
    assert rep["artifact"]["pack_matches_source"] is True and rep["artifact"]["manifest"]["sha256_matches"] is True
    assert rep["metrics"] == stage["metrics"] and rep["results"]["robust_acc"] == stage["results"]["robust_acc"]
    # DIR/qat, a folder with a manifest, as an export folder
    res = invoke("verify", out / "qat", "--live", "none", "--threads", 1, "--json", tmp_path / "f.json")
    assert res.exit_code == 0, res.output
    assert f"verifying the 1 artifact(s) of {out / 'qat' / 'manifest.json'}: model.qat.int8.onnx (onnx-int8 (qat))" \
        in res.stderr and f"using {out / 'pack.npz'} from the run folder {out}" in res.stderr
    assert json.loads((tmp_path / "f.json").read_text())["metrics"] == stage["metrics"]
    # inspect shows one manifest: the export's, and names the QAT folder to inspect
    res = invoke("inspect", out)
    assert res.exit_code == 0 and f"`ciard inspect {out / 'qat'}`" in res.stderr, res.output
    res = invoke("inspect", out / "qat", "--json", tmp_path / "i.json")
    assert res.exit_code == 0, res.output
    assert [a["file"] for a in json.loads((tmp_path / "i.json").read_text())["manifest"]["artifacts"]] == \
        ["model.qat.int8.onnx"]
    assert snapshot(out) == before  # nothing written into the run folder


# --------------------------------------------------------------------------- re-runs, on copies
def test_from_quantize_runs_quantize_pack_and_verify_again_but_not_training_or_export(first, sets, invoke, snapshot,
                                                                                      tmp_path):
    out = tmp_path / "digits-qat"
    shutil.copytree(first["out"], out)
    before = snapshot(out)
    res, result, actions = run_cli(invoke, out, sets, "--from", "quantize")
    assert actions == {"distill": "skipped", "export": "skipped", "quantize": "ran", "pack": "ran", "verify": "ran"}
    assert "quantize: running (forced (--from quantize))" in res.stderr
    after = snapshot(out)
    upstream = [k for k in before if k.startswith(("run/", "export/"))]
    assert upstream and all(after[k] == before[k] for k in upstream)
    for rel in (QAT, "qat/manifest.json", "pack.npz", "verify/onnx-int8-qat.json"):
        assert after[rel][0] > before[rel][0], rel  # each written again
    assert result["state"]["stages"]["quantize"]["runs"] == 2 and result["state"]["stages"]["export"]["runs"] == 1


def test_a_qat_artifact_edited_or_deleted_by_hand_is_noticed_and_made_again(first, sets, invoke, tmp_path):
    from ciard_deploy import workflow
    from ciard_deploy.config import find_recipe, load_recipe

    out = tmp_path / "digits-qat"
    shutil.copytree(first["out"], out)
    state = json.loads((out / "workflow.json").read_text())
    record = state["stages"]["quantize"]
    recipe = load_recipe(find_recipe(RECIPE), sets)
    inputs = workflow.stage_inputs("quantize", recipe, workflow.Layout(out), state=state)
    assert workflow.plan("quantize", record, inputs, out) == ("skip", "up to date")
    (out / QAT).rename(out / "gone.onnx")  # deleted
    assert workflow.plan("quantize", record, inputs, out) == ("run", f"{QAT} is missing")
    (out / "gone.onnx").rename(out / QAT)

    with (out / QAT).open("ab") as f:  # edited
        f.write(b"\0")
    res, result, actions = run_cli(invoke, out, sets)
    assert actions["distill"] == actions["export"] == "skipped" and actions["quantize"] == "ran"
    assert result["stages"]["quantize"]["reason"] == f"{QAT} changed since it was written"
    recorded = result["state"]["stages"]["quantize"]["outputs"]
    assert recorded[QAT] == sha256_file(out / QAT)
    assert workflow.outputs_problem(out, recorded) is None
    # made again, the same bytes (one thread, seeded; the artifact records no path and no seconds), in this copy
    # too: pack and verify, whose inputs are its sha256, have nothing new to measure
    assert recorded[QAT] == record["outputs"][QAT] and (out / QAT).read_bytes() == (first["out"] / QAT).read_bytes()
    assert actions["pack"] == actions["verify"] == "skipped"


def test_a_changed_qat_setting_reruns_quantize_pack_and_verify_only(first, sets, invoke, tmp_path):
    out = tmp_path / "digits-qat"
    shutil.copytree(first["out"], out)
    _, result, actions = run_cli(invoke, out, [*sets, "quantize.epochs=2"])
    assert actions == {"distill": "skipped", "export": "skipped", "quantize": "ran", "pack": "ran", "verify": "ran"}
    assert "inputs changed: quantize.epochs" in result["stages"]["quantize"]["reason"]


def test_from_quantize_without_a_quantize_section_is_refused_with_one_line(first, sets, invoke, snapshot,
                                                                          assert_one_line_error):
    out = first["out"]
    before = snapshot(out)
    plain = [s for s in sets if not s.startswith("quantize=")]
    res, result, _ = call(invoke, out, plain, "--from", "quantize")
    assert_one_line_error(res, 2, "--from quantize: the recipe has no quantize: section, so no such stage",
                          "stages: distill, export, pack, verify")
    assert result is None and snapshot(out) == before


def test_a_recipe_that_drops_quantize_leaves_qat_out_of_verify_until_it_comes_back(first, sets, invoke, tmp_path):
    """quantize: removed from the recipe and `ciard run` again: the workflow's verify stage and summary leave
    DIR/qat/ out, and so does `ciard verify DIR` (it used to verify the stale folder, against a pack no longer
    built for it, with the recipe's gates), saying in one line that it is left; put back, the quantize stage's
    record still holds (skipped, not fine-tuned again)."""
    out = tmp_path / "digits-qat"
    shutil.copytree(first["out"], out)
    plain = [s for s in sets if not s.startswith("quantize=")]
    _, result, actions = run_cli(invoke, out, plain)
    assert "quantize" not in actions and result["state"]["recipe"]["stages"] == ["distill", "export", "pack", "verify"]
    assert {r["name"] for r in result["artifacts"]} == {"onnx", "onnx-int8"} and (out / QAT).is_file()
    res = invoke("verify", out, "--threads", 1)
    assert res.exit_code == 0, res.output
    assert f"verify: 2 artifacts of the run folder {out} (model.onnx, model.int8.onnx) against" in res.stderr
    assert f"{out / 'qat'} is left from an earlier recipe with quantize:" in " ".join(res.stderr.split())
    assert "onnx-int8 (qat)" not in res.stdout
    res = invoke("inspect", out)
    assert res.exit_code == 0 and "QAT artifact (left from an earlier recipe with quantize:)" in \
        " ".join(res.stderr.split()), res.output
    _, result, actions = run_cli(invoke, out, sets)
    assert actions["quantize"] == "skipped" and actions["pack"] == actions["verify"] == "ran"
    assert "quantize" in result["state"]["recipe"]["stages"]
    assert {r["name"] for r in result["artifacts"]} == {"onnx", "onnx-int8", "onnx-int8 (qat)"}
