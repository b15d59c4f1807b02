"""`ciard run` end to end on the quick CIARD digits recipe: distill -> export (ONNX FP32 + INT8) -> pack ->
verify, then the re-runs: skip, --from verify, --from export, a changed gate (re-judged, exit 1), and an
interrupted training resumed; and a kind-train recipe (PGD-AT, no teachers) through the same chain, with
--from distill training it again from scratch.

One workflow dir is made per module, for real: the shipped quickstart recipe with its teachers and
student shortened by ``--set`` (same code path, fewer epochs; a smaller pack with cheap white-box attacks on
the artifacts, a smaller Square budget) so the
module stays near a minute on 2 CPU cores. Its training is first stopped after epoch 3 through the
library's callbacks, so the first CLI call also proves that an interrupted distill stage resumes.
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ciard_deploy.cli import app
from ciard_deploy.fingerprint import sha256_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECIPE = "quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15"
EPOCHS = 8
STOP_AFTER = 3
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(res, code, *needles):
    assert res.exit_code == code, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def stage_actions(summary: Path) -> dict[str, str]:
    return {k: v["action"] for k, v in json.loads(summary.read_text())["stages"].items()}


@pytest.fixture(scope="module")
def sets(short_digits_teachers) -> list[str]:
    """--set overrides: short teachers (own recipes extending the shipped ones), a short student, smaller
    pack / parity / Square budgets, and a robustness gate fitting 8 epochs."""
    return [*short_digits_teachers,
            f"train.epochs={EPOCHS}", "train.eval_every=4", "deploy.pack.n=200", "deploy.parity_n=200",
            "deploy.calib_n=256", "deploy.square_queries=300", "deploy.square_n=100", "deploy.gates.min_robust=0.3",
            "deploy.pack.attacks=[pgd20,fgsm]", "deploy.pack.artifact_attacks=[mtpgd10]"]


def run_cli(out: Path, sets: list[str], *extra, recipe: str = RECIPE) -> tuple:
    summary = out.parent / f"summary-{time.monotonic_ns()}.json"
    t0 = time.perf_counter()
    flags = [a for s in sets for a in ("--set", s)]
    res = invoke("run", recipe, "--out", out, "--threads", 1, "--json", summary, *flags, *extra)
    return res, summary, time.perf_counter() - t0


@pytest.fixture(scope="module")
def first(tmp_path_factory, sets, ciard_cache) -> dict:
    """The library run stopped after epoch 3 of the student, then `ciard run` finishing it."""
    from ciard_deploy import workflow
    from ciard_deploy.config import find_recipe
    from ciard_deploy.distill.events import TrainingInterrupted

    out = tmp_path_factory.mktemp("wf") / "digits"
    seen: list[int] = []

    def stop_student(ev):
        if ev.kind == "epoch_end" and ev.run_dir == out / "run":
            seen.append(ev.epoch)
            if ev.epoch == STOP_AFTER:
                ev.control.request_stop("test")

    # module fixtures start before conftest's per-test cache isolation: point the teacher cache there now
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIARD_CACHE", str(ciard_cache))
        with pytest.raises(TrainingInterrupted):
            workflow.run(find_recipe(RECIPE), out, overrides=sets, threads=1, train_callbacks=[stop_student])
        interrupted = json.loads((out / "workflow.json").read_text())
        res, summary, seconds = run_cli(out, sets)
    return {"out": out, "res": res, "summary": summary, "seconds": seconds, "interrupted": interrupted, "seen": seen}


# --------------------------------------------------------------------------- the first run
def test_interrupted_training_resumes_and_the_run_passes(first):
    out, res = first["out"], first["res"]
    st = first["interrupted"]
    assert first["seen"] == list(range(1, STOP_AFTER + 1))
    assert st["status"] == "interrupted" and st["stages"]["distill"]["status"] == "interrupted"
    assert all(st["stages"][s]["status"] == "pending" for s in ("export", "pack", "verify"))
    assert res.exit_code == 0, (res.stdout, res.stderr)
    assert "distill: resuming" in res.stderr and f"resuming at epoch {STOP_AFTER + 1}" in res.stderr
    assert stage_actions(first["summary"]) == {"distill": "resumed", "export": "ran", "pack": "ran", "verify": "ran"}
    epochs = [json.loads(ln)["epoch"] for ln in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, EPOCHS + 1))  # each epoch once: resumed, not restarted
    assert "PASSED" in res.stdout and "model.int8.onnx" in res.stdout
    assert "worst(wb(mtpgd10)+pgd20+fgsm+square300)@0.15" in res.stdout and "worst(pgd20+fgsm)@0.15" in res.stdout
    assert "covering white-box on this artifact" in res.stdout


def test_numbers_a_robust_student_keeps_on_each_runtime(first):
    result = json.loads(first["summary"].read_text())
    assert result["status"] == "passed" and result["failures"] == []
    ref = result["reference"]
    assert ref["clean"] >= 0.9 and ref["worst_case"]["label"] == "worst(pgd20+fgsm)@0.15"
    assert 0.35 <= ref["worst_case"]["acc"] < ref["clean"]  # robust, and the attacks do bite
    rows = {r["name"]: r for r in result["artifacts"]}
    assert set(rows) == {"onnx", "onnx-int8"}
    assert rows["onnx"]["precision"] == "fp32" and rows["onnx-int8"]["precision"] == "int8"
    for r in rows.values():
        assert r["clean"] >= 0.9 and r["worst_case"]["acc"] >= 0.35 and r["worst_case"]["n"] == 100
        assert r["worst_case"]["label"] == "worst(wb(mtpgd10)+pgd20+fgsm+square300)@0.15"
        assert r["worst_case"]["upper_bound"] is False
        assert r["gates"] == {"passed": 6, "total": 6, "failed": []} and r["export_status"] == "passed"
    assert rows["onnx"]["agreement"] >= 0.995 and rows["onnx-int8"]["agreement"] >= 0.97
    assert rows["onnx-int8"]["size"] < rows["onnx"]["size"]  # really quantized


def test_reports_exist_and_parse(first):
    out = first["out"]
    for name in ("onnx", "onnx-int8"):
        rep = json.loads((out / "verify" / f"{name}.json").read_text())
        assert rep["kind"] == "ciard.verify_report" and rep["status"] == "passed"
        assert rep["gates"]["min_robust"] == 0.3 and rep["gates"]["min_clean"] == 0.9  # recipe + --set
        assert rep["artifact"]["manifest"]["sha256_matches"] is True and rep["artifact"]["pack_matches_source"] is True
        assert rep["settings"]["live_attacks"] == ["square300"] and rep["pack"]["n"] == 200
        root = ET.parse(out / "verify" / f"{name}.xml").getroot()
        assert root.get("tests") == "6" and root.get("failures") == "0"
        md = (out / "verify" / f"{name}.md").read_text()
        assert md.startswith(f"### ciard verify: `model.{'int8.' if name == 'onnx-int8' else ''}onnx` ✅ **passed**")
        assert (out / "verify" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "verify" / "accuracy.png").stat().st_size > 8000
    plots = sorted(p.name for p in (out / "run" / "plots").glob("*.png"))
    assert {"accuracy.png", "losses.png", "temperatures_weights.png"} <= set(plots)


def test_artifacts_match_their_manifest_and_the_pack_matches_the_student(first):
    from ciard_deploy.export.manifest import check_files, load_manifest
    from ciard_deploy.verify import load_pack

    out = first["out"]
    m = load_manifest(out / "export")
    assert [a.name for a in m.artifacts] == ["onnx", "onnx-int8"] and m.passed
    assert check_files(m, out / "export") == []
    for a in m.artifacts:
        assert a.sha256 == sha256_file(out / "export" / a.file) and a.size == (out / "export" / a.file).stat().st_size
    student = sha256_file(out / "run" / "student_best.safetensors")
    assert m.source["sha256"] == student
    pack = load_pack(out / "pack.npz")
    assert pack.model_sha256 == student and pack.n == 200 and pack.attack_labels == ["pgd20@0.15", "fgsm@0.15"]
    # the pack stage attacked every exported ONNX file white-box, keyed by the sha256 the export stage recorded
    assert sorted(s.name for s in pack.artifacts) == ["model.int8.onnx", "model.onnx"]
    for sec in pack.artifacts:
        assert sec.sha256 == sha256_file(out / "export" / sec.name) and sec.meta["label"] == "wb(mtpgd10)@0.15"


def test_workflow_state_records_inputs_and_outputs(first):
    out = first["out"]
    st = json.loads((out / "workflow.json").read_text())
    assert st["format"] == "ciard-workflow/1" and st["entry"] == "run" and st["status"] == "passed"
    for name in ("distill", "export", "pack", "verify"):
        stage = st["stages"][name]
        assert stage["status"] == "done" and stage["seconds"] > 0 and len(stage["inputs_hash"]) == 64
        for rel, digest in stage["outputs"].items():
            assert sha256_file(out / rel) == digest, rel
    stages = st["stages"]
    assert set(stages["distill"]["inputs"]["teachers"]) == {"clean", "robust"}
    assert stages["export"]["inputs"]["checkpoint"]["run/student_best.safetensors"] == \
        stages["distill"]["outputs"]["run/student_best.safetensors"]
    assert stages["verify"]["inputs"]["artifacts"] == {k: v for k, v in stages["export"]["outputs"].items()
                                                       if k != "export/manifest.json"}
    assert stages["verify"]["inputs"]["pack"] == stages["pack"]["outputs"]
    assert (out / "recipe.yaml").read_text().count("deploy:") == 1


# --------------------------------------------------------------------------- the run folder as every verb's input
def test_every_verb_takes_the_run_folder_and_says_what_it_picked(first, tmp_path, snapshot):
    out = first["out"]
    before = snapshot(out)
    student = out / "run" / "student_best.safetensors"
    res = invoke("plot", out, "--out", tmp_path / "plots")
    assert res.exit_code == 0 and f"using {out / 'run' / 'metrics.jsonl'} from the run folder {out}" in res.stderr
    assert (tmp_path / "plots" / "accuracy.png").is_file()
    res = invoke("eval", out, "--attacks", "fgsm", "--n", 50, "--threads", 1, "--json", tmp_path / "e.json")
    assert res.exit_code == 0 and f"using {student} from the run folder {out}" in res.stderr, res.output
    assert json.loads((tmp_path / "e.json").read_text())["model"]["sha256"] == sha256_file(student)
    res = invoke("inspect", out, "--json", tmp_path / "i.json")
    assert res.exit_code == 0 and f"using {out / 'export'} from the run folder {out}" in res.stderr
    assert json.loads((tmp_path / "i.json").read_text())["path"] == str(out / "export" / "manifest.json")
    # verify DIR: each artifact of its manifest, against its pack, with its recipe's gates
    res = invoke("verify", out, "--live", "none", "--threads", 1)
    assert res.exit_code == 0, res.output
    assert f"verify: 2 artifacts of the run folder {out} (model.onnx, model.int8.onnx) against {out / 'pack.npz'}, " \
           "with gates min_clean 0.9, min_robust 0.3," in res.stderr
    assert res.stdout.count("PASSED") == 2 and "model.int8.onnx" in res.stdout
    res = invoke("verify", out, "--live", "none", "--threads", 1, "--min-clean", 0.9999)  # flags override the recipe
    assert res.exit_code == 1 and "model.onnx: 1 of 6 gates failed: min_clean" in res.stderr, res.output
    # an artifact in the run folder's export/ finds its pack
    res = invoke("verify", out / "export" / "model.int8.onnx", "--live", "none", "--json", tmp_path / "v.json")
    assert res.exit_code == 0 and f"using {out / 'pack.npz'} from the run folder {out}" in res.stderr, res.output
    rep = json.loads((tmp_path / "v.json").read_text())
    assert rep["pack"]["path"] == str(out / "pack.npz") and rep["artifact"]["pack_matches_source"] is True
    assert rep["status"] == "not_gated"  # gates from the recipe only for the whole folder
    assert snapshot(out) == before  # nothing written into the run folder


# --------------------------------------------------------------------------- re-runs
def test_second_run_skips_every_stage_and_touches_no_output(first, sets, snapshot):
    out = first["out"]
    before = snapshot(out)
    res, summary, seconds = run_cli(out, sets)
    assert res.exit_code == 0, res.stderr
    assert stage_actions(summary) == dict.fromkeys(("distill", "export", "pack", "verify"), "skipped")
    assert res.stderr.count("skipped (up to date)") == 4 and "PASSED" in res.stdout
    assert snapshot(out) == before
    assert seconds < first["seconds"] / 3, (seconds, first["seconds"])


def test_from_verify_reruns_only_verify(first, sets, snapshot):
    out = first["out"]
    before = snapshot(out)
    res, summary, _ = run_cli(out, sets, "--from", "verify")
    assert res.exit_code == 0, res.stderr
    assert stage_actions(summary) == {"distill": "skipped", "export": "skipped", "pack": "skipped", "verify": "ran"}
    after = snapshot(out)
    upstream = [k for k in before if not k.startswith("verify/")]
    assert upstream and all(after[k] == before[k] for k in upstream)
    assert after["verify/onnx.json"][0] > before["verify/onnx.json"][0]  # written again
    # seeded Square on the same files: the same numbers
    again = json.loads((out / "verify" / "onnx-int8.json").read_text())["metrics"]["worst_case_acc"]
    assert again == json.loads(first["summary"].read_text())["artifacts"][1]["worst_case"]["acc"]


def test_from_export_reruns_export_pack_and_verify_but_not_training(first, sets, snapshot):
    import numpy as np

    from ciard_deploy.verify import load_pack

    out = first["out"]
    before = snapshot(out)
    old_pack = load_pack(out / "pack.npz")
    res, summary, _ = run_cli(out, sets, "--from", "export")
    assert res.exit_code == 0, res.stderr
    assert stage_actions(summary) == {"distill": "skipped", "export": "ran", "pack": "ran", "verify": "ran"}
    assert "export: running (forced (--from export))" in res.stderr
    after = snapshot(out)
    training = [k for k in before if k.startswith("run/")]
    assert training and all(after[k] == before[k] for k in training)  # the student was not touched
    for rel in ("export/manifest.json", "export/model.int8.onnx", "pack.npz", "verify/onnx-int8.json"):
        assert after[rel][0] > before[rel][0], rel  # each written again
    # same student, same seeds: the same images, labels and logits (only the meta times differ)
    new_pack = load_pack(out / "pack.npz")
    assert new_pack.meta["created"] >= old_pack.meta["created"]
    for key, arr in old_pack.arrays().items():
        assert key == "meta" or np.array_equal(new_pack.arrays()[key], arr), key
    st = json.loads((out / "workflow.json").read_text())
    assert st["status"] == "passed" and st["stages"]["export"]["runs"] == 2 and st["stages"]["distill"]["runs"] == 1


def test_a_stricter_gate_rejudges_only_verify_and_exits_1(first, sets, snapshot):
    out = first["out"]
    before = snapshot(out)
    measured = json.loads((out / "verify" / "onnx.json").read_text())["metrics"]
    res, summary, _ = run_cli(out, sets + ["deploy.gates.min_clean=0.9999"])
    assert_one_line_error(res, 1, "onnx: 1 of 6 gates failed: min_clean", "required 0.9999")
    assert stage_actions(summary) == {"distill": "skipped", "export": "skipped", "pack": "skipped",
                                      "verify": "rejudged"}
    assert "FAIL 5/6" in res.stdout and "gates of export/model.onnx" in res.stdout
    after = snapshot(out)
    assert all(after[k] == before[k] for k in before if not k.startswith("verify/"))
    rep = json.loads((out / "verify" / "onnx.json").read_text())
    assert rep["status"] == "failed" and rep["gates"]["min_clean"] == 0.9999
    assert rep["metrics"] == measured  # judged again, not measured again
    assert ET.parse(out / "verify" / "onnx-int8.xml").getroot().get("failures") == "1"
    st = json.loads((out / "workflow.json").read_text())
    assert st["status"] == "failed" and st["stages"]["verify"]["action"] == "rejudge"
    # the old gates again: re-judged back, passing
    res, summary, _ = run_cli(out, sets)
    assert res.exit_code == 0 and stage_actions(summary)["verify"] == "rejudged"
    assert json.loads((out / "verify" / "onnx.json").read_text())["status"] == "passed"


def test_no_gates_is_not_gated_never_passed(first, sets, tmp_path):
    """The recipe's gates removed: verify is re-judged (nothing measured again), the run exits 0 and every
    summary and report says NOT GATED, never passed (`ciard run --set 'deploy.formats=[onnx]'` on a recipe
    without gates used to print "no gates" and then "every gate passed")."""
    import re
    import shutil

    out = tmp_path / "digits"
    shutil.copytree(first["out"], out)
    res, summary, _ = run_cli(out, sets + ["deploy.gates={}"])
    assert res.exit_code == 0, (res.stdout, res.stderr)
    assert stage_actions(summary)["verify"] == "rejudged"
    assert "NOT GATED: no gates set for 2 artifacts" in res.stdout and "not gated" in res.stdout
    result = json.loads(summary.read_text())
    assert result["status"] == "not_gated" and result["failures"] == []
    assert json.loads((out / "workflow.json").read_text())["status"] == "not_gated"
    texts = [res.stdout]
    for name in ("onnx", "onnx-int8"):
        assert json.loads((out / "verify" / f"{name}.json").read_text())["status"] == "not_gated"
        texts += [(out / "verify" / f"{name}.md").read_text(), (out / "verify" / f"{name}.xml").read_text()]
    for text in texts:
        assert not re.search(r"\bpass(ed)?\b", text, re.IGNORECASE), text


def _measured(report: Path) -> dict:
    """A verify report's measured numbers (not its seconds, nor where Square's came from)."""
    rep = json.loads(report.read_text())
    for a in rep["results"]["attacks"]:
        a.pop("seconds"), a.pop("origin", None)
    return {k: rep[k] for k in ("results", "metrics", "parity", "per_sample")}


def test_an_interrupted_verify_stage_resumes_from_its_state_files(first, sets, tmp_path):
    """Ctrl-C as the second artifact's Square starts: the first artifact's state holds its finished Square,
    which the next `ciard run` reuses; the reports equal the uninterrupted ones and the states are gone."""
    import shutil

    from ciard_deploy import workflow
    from ciard_deploy.config import find_recipe

    out = tmp_path / "digits"
    shutil.copytree(first["out"], out)
    measured = {name: _measured(out / "verify" / f"{name}.json") for name in ("onnx", "onnx-int8")}

    def ctrl_c(done, total=None, stage=None):
        if stage == "verify onnx-int8 square300@0.15":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        workflow.run(find_recipe(RECIPE), out, overrides=sets, threads=1, from_stage="verify", progress=ctrl_c)
    st = json.loads((out / "workflow.json").read_text())
    assert st["stages"]["verify"]["status"] == "interrupted"
    onnx_state = json.loads((out / "verify" / "onnx.state.json").read_text())
    assert onnx_state["kind"] == "ciard.verify_state"
    assert [(a["label"], a["done"] == a["total"]) for a in onnx_state["attacks"]] == [("square300@0.15", True)]
    assert (out / "verify" / "onnx-int8.state.json").is_file()

    res, summary, _ = run_cli(out, sets)
    assert res.exit_code == 0, (res.stdout, res.stderr)
    assert stage_actions(summary) == {"distill": "skipped", "export": "skipped", "pack": "skipped", "verify": "ran"}
    assert "verify: running (interrupted earlier)" in res.stderr
    origins = {name: json.loads((out / "verify" / f"{name}.json").read_text())["results"]["attacks"][-1]["origin"]
               for name in measured}
    assert origins == {"onnx": "reused", "onnx-int8": "ran"}
    assert {name: _measured(out / "verify" / f"{name}.json") for name in measured} == measured
    assert not list((out / "verify").glob("*.state.json"))  # done: only the reports are the stage's outputs
    st = json.loads((out / "workflow.json").read_text())
    assert workflow.outputs_problem(out, st["stages"]["verify"]["outputs"]) is None
    assert not [k for k in st["stages"]["verify"]["outputs"] if "state" in k]
    res, summary, _ = run_cli(out, sets)
    assert res.exit_code == 0 and stage_actions(summary)["verify"] == "skipped", res.stderr


def test_an_interrupted_pack_stage_resumes_from_its_partial_folder(first, sets, tmp_path):
    """Ctrl-C as the pack's second attack starts: the next call takes the first from DIR/pack.npz.partial/ (pgd20 and
    the clean pass do not run again), the pack's arrays equal the uninterrupted one's, and the folder is removed and
    never recorded in workflow.json. Square is off in these calls, so the verify stage a new pack brings stays cheap."""
    import shutil

    import numpy as np

    from ciard_deploy import workflow
    from ciard_deploy.config import find_recipe
    from ciard_deploy.verify import load_pack

    out = tmp_path / "digits"
    shutil.copytree(first["out"], out)
    cheap = sets + ["deploy.square_queries=0"]  # an input of verify only: distill, export and pack stay as they are
    partial = out / "pack.npz.partial"

    def ctrl_c(done, total=None, stage=None):
        if stage == "pack fgsm@0.15":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        workflow.run(find_recipe(RECIPE), out, overrides=cheap, threads=1, from_stage="pack", progress=ctrl_c)
    st = json.loads((out / "workflow.json").read_text())
    assert st["stages"]["pack"]["status"] == "interrupted" and "outputs" not in st["stages"]["pack"]
    assert [a["label"] for a in json.loads((partial / "state.json").read_text())["attacks"]] == ["pgd20@0.15"]

    stages: list[str] = []
    result = workflow.run(find_recipe(RECIPE), out, overrides=cheap, threads=1,
                          progress=lambda done, total=None, stage=None: stages.append(stage))
    assert {k: v.action for k, v in result.stages.items()} == {"distill": "skipped", "export": "skipped",
                                                               "pack": "ran", "verify": "ran"}
    assert "pack fgsm@0.15" in stages and not {"pack pgd20@0.15", "pack clean"} & set(stages)
    assert not partial.exists()
    old, new = load_pack(first["out"] / "pack.npz").arrays(), load_pack(out / "pack.npz").arrays()
    for key, arr in old.items():
        assert key == "meta" or (arr.dtype == new[key].dtype and np.array_equal(new[key], arr)), key
    recorded = json.dumps({k: (v.get("inputs"), v.get("outputs")) for k, v in result.state["stages"].items()})
    assert "partial" not in recorded and list(result.state["stages"]["pack"]["outputs"]) == ["pack.npz"]
    assert workflow.outputs_problem(out, result.state["stages"]["pack"]["outputs"]) is None


TRAIN_RECIPE = "quick/digits_pgd_at_none_to_tiny_cnn_linf0.15"  # kind: train, its deploy: from the quick base
TRAIN_SETS = ["deploy.formats=[onnx]", "train.epochs=2", "train.eval_every=2", "train.final_attacks=[]",
              "deploy.pack.attacks=[fgsm]", "deploy.pack.artifact_attacks=[mtpgd10]", "deploy.pack.n=100", "deploy.parity_n=100", "deploy.square_queries=50",
              "deploy.square_n=20", "deploy.gates={min_clean: 0.5, min_agreement: 0.99}"]  # these gates alone


def test_a_train_recipe_runs_the_chain_and_from_distill_trains_again_from_scratch(tmp_path, snapshot):
    out = tmp_path / "pgd-at"
    res, summary, _ = run_cli(out, TRAIN_SETS, recipe=TRAIN_RECIPE)
    assert res.exit_code == 0, (res.stdout, res.stderr)
    assert stage_actions(summary) == dict.fromkeys(("distill", "export", "pack", "verify"), "ran")
    result = json.loads(summary.read_text())
    assert result["state"]["recipe"]["kind"] == "train" and result["state"]["recipe"]["method"] == "pgd_at"
    assert result["state"]["stages"]["distill"]["inputs"]["teachers"] == {}  # nothing to cache or hash
    (row,) = result["artifacts"]
    assert row["name"] == "onnx" and row["clean"] >= 0.5 and row["agreement"] >= 0.99
    assert row["worst_case"]["label"] == "worst(wb(mtpgd10)+fgsm+square50)@0.15" and row["gates"]["failed"] == []
    assert json.loads((out / "run" / "teachers.json").read_text()) == {}
    before = snapshot(out)

    res, summary, _ = run_cli(out, TRAIN_SETS, "--from", "distill", recipe=TRAIN_RECIPE)
    assert res.exit_code == 0, res.stderr
    assert stage_actions(summary) == dict.fromkeys(("distill", "export", "pack", "verify"), "ran")
    assert "distill: running (forced (--from distill))" in res.stderr and "resuming" not in res.stderr
    epochs = [json.loads(ln)["epoch"] for ln in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]  # trained again from epoch 1, not appended to the old run
    after = snapshot(out)
    student = "run/student_best.safetensors"
    assert after[student][0] > before[student][0]
    # one thread, same seed: training is reproducible, so the retrained student is the same bytes
    assert after[student][1] == before[student][1]


def test_bad_inputs_exit_2_and_leave_the_workflow_alone(first, sets, tmp_path, snapshot):
    out = first["out"]
    before = snapshot(out)
    res = invoke("run", RECIPE, "--out", out, "--from", "deploy")
    assert_one_line_error(res, 2, "--from 'deploy' is not a stage", "distill, export, pack, verify")
    res = invoke("run", "teachers/digits_natural_small_cnn", "--out", tmp_path / "x")  # teachers are not deployed
    assert_one_line_error(res, 2, "has no deploy: section")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("%")
    res = invoke("run", RECIPE, "--out", tmp_path / "mine")
    assert_one_line_error(res, 2, "is not a ciard workflow dir")
    res = invoke("quickstart", "--out", out)  # made by `ciard run`, not by the quickstart
    assert_one_line_error(res, 2, "not a quickstart one")
    assert snapshot(out) == before and not (tmp_path / "x").exists()
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]
