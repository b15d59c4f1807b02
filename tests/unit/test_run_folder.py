"""`run_folder.resolve_run_folder`: the part of a `ciard run` folder a verb needs, or what it lacks.

A run folder here is made by hand (workflow.json and the files of the layout, empty where only their
presence matters); the integration tests in tests/integration/test_workflow.py use a real one.
"""

import json

import pytest

from ciard_deploy.errors import ArtifactError
from ciard_deploy.run_folder import (artifact_name, exported_artifacts, is_run_folder, qat_artifacts,
                                     resolve_run_folder, run_folder_of, stale_qat, verify_settings)
from ciard_deploy.workflow import STATE_FORMAT, Layout, paths_of

pytestmark = pytest.mark.unit


def make_run_folder(root, stages):
    root.mkdir(parents=True)
    (root / "workflow.json").write_text(json.dumps({"format": STATE_FORMAT, "stages": stages}))
    return root


def test_a_run_folder_gives_each_part_and_names_what_it_lacks(tmp_path):
    root = make_run_folder(tmp_path / "wf", {"distill": {"status": "done"}, "export": {"status": "interrupted"},
                                             "pack": {"status": "done"}, "verify": {"status": "pending"}})
    (root / "run").mkdir()
    (root / "run" / "student_best.safetensors").write_bytes(b"")
    (root / "run" / "metrics.jsonl").write_text("{}\n")
    assert is_run_folder(root) and not is_run_folder(root / "run")
    assert resolve_run_folder(root, "checkpoint") == root / "run" / "student_best.safetensors"
    assert resolve_run_folder(root, "metrics") == root / "run" / "metrics.jsonl"
    with pytest.raises(ArtifactError, match=r"without exported artifacts \(export/manifest.json\): its export stage "
                                            r"is interrupted; finish it with `ciard run RECIPE --out "):
        resolve_run_folder(root, "export")
    with pytest.raises(ArtifactError, match=r"without a robustness pack \(pack.npz\): its pack stage is done but "
                                            r"its output is gone"):
        resolve_run_folder(root, "pack")
    with pytest.raises(ArtifactError, match="is not a `ciard run` folder"):
        exported_artifacts(root / "run")
    assert verify_settings(root) == {}  # its verify stage never started


def test_anything_else_is_returned_as_it_is_or_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "student_best.safetensors").write_bytes(b"")
    (run / "metrics.jsonl").write_text("{}\n")
    assert resolve_run_folder(run, "checkpoint") == run  # a training run dir: read as before
    assert resolve_run_folder(run, "metrics") == run
    assert resolve_run_folder(tmp_path / "model.onnx", "export") == tmp_path / "model.onnx"  # files pass through
    with pytest.raises(ArtifactError, match=r"is neither an export folder \(manifest.json\) nor a `ciard run` "
                                            r"folder \(workflow.json\)"):
        resolve_run_folder(run, "export")
    with pytest.raises(ArtifactError, match=r"neither a pack file \(.npz\)"):
        resolve_run_folder(run, "pack")


def test_an_artifact_knows_its_run_folder_and_the_verify_settings_are_read(tmp_path):
    inputs = {"gates": {"min_clean": 0.9}, "policy": {"allow_mismatch": False, "strict": True},
              "settings": {"live_attacks": ["square300"], "live_n": 100, "seed": 0, "provider": "cpu"}}
    root = make_run_folder(tmp_path / "wf", {"verify": {"status": "done", "inputs": {**inputs, "pack": {}}}})
    (root / "export").mkdir()
    (root / "export" / "manifest.json").write_text("{}")
    assert run_folder_of(root / "export" / "model.onnx") == root
    assert run_folder_of(tmp_path / "export" / "model.onnx") is None  # no workflow.json above it
    assert resolve_run_folder(root, "export") == root / "export"
    assert verify_settings(root) == inputs


def test_the_qat_folder_is_a_part_its_artifact_knows_its_run_folder_and_is_named_apart(tmp_path):
    """DIR/qat/ (the quantize stage's, a recipe with quantize:) is a part like export/; a run folder whose
    recipe never had quantize: has no QAT artifact ([]), one whose quantize stage is recorded but whose
    qat/ is missing says so (the stage's status and the command that finishes it)."""
    root = make_run_folder(tmp_path / "wf", {"export": {"status": "done"}, "quantize": {"status": "interrupted"}})
    with pytest.raises(ArtifactError, match=r"without a QAT artifact \(qat/manifest.json\): its quantize stage is "
                                            r"interrupted; finish it with `ciard run RECIPE --out "):
        qat_artifacts(root)
    (root / "qat").mkdir()
    (root / "qat" / "manifest.json").write_text("{}")
    assert resolve_run_folder(root, "qat") == root / "qat"
    assert resolve_run_folder(root / "qat", "qat") == root / "qat"  # a QAT folder itself: as it is
    assert run_folder_of(root / "qat" / "model.qat.int8.onnx") == root
    assert artifact_name(root / "qat" / "model.qat.int8.onnx") == "onnx-int8 (qat)"  # as ciard run's summary
    assert artifact_name(root / "export" / "model.int8.onnx") == "model.int8.onnx"
    assert artifact_name(tmp_path / "qat" / "model.qat.int8.onnx") == "model.qat.int8.onnx"  # not in a run folder
    plain = make_run_folder(tmp_path / "plain", {"export": {"status": "done"}})
    assert qat_artifacts(plain) == []  # no quantize stage recorded: nothing to add


def test_the_paths_name_the_qat_folder_only_with_a_quantize_section(tmp_path):
    layout = Layout(tmp_path)
    assert "qat" not in paths_of(layout) and "qat_manifest" not in paths_of(layout)
    paths = paths_of(layout, qat=True)
    assert paths["qat"] == str(tmp_path / "qat") and paths["qat_manifest"] == str(tmp_path / "qat" / "manifest.json")
    assert list(paths) == ["state", "recipe", "run", "plots", "export", "manifest", "qat", "qat_manifest", "pack",
                           "verify"]


def test_a_qat_folder_left_by_a_recipe_that_dropped_quantize_is_not_an_artifact_of_the_run(tmp_path):
    """The last `ciard run` ran a recipe without quantize: (workflow.json's recipe.stages): DIR/qat/ and the
    quantize record stay, but the run has no QAT artifact to verify (`ciard verify DIR` used to take the stale
    folder); with quantize: in the stages, or a workflow.json from before that record, the quantize stage's
    own record decides, as before (here: interrupted, so DIR/qat/ is incomplete and named)."""
    stages = {"export": {"status": "done"}, "quantize": {"status": "interrupted"}}
    root = make_run_folder(tmp_path / "wf", stages)
    (root / "qat").mkdir()
    with pytest.raises(ArtifactError, match="its quantize stage is interrupted"):
        qat_artifacts(root)  # a workflow.json without recipe.stages
    assert stale_qat(root) is None
    state = {"format": STATE_FORMAT, "stages": stages, "recipe": {"stages": ["distill", "export", "pack", "verify"]}}
    (root / "workflow.json").write_text(json.dumps(state))
    assert qat_artifacts(root) == [] and stale_qat(root) == root / "qat"
    state["recipe"]["stages"] = ["distill", "export", "quantize", "pack", "verify"]
    (root / "workflow.json").write_text(json.dumps(state))
    with pytest.raises(ArtifactError, match="its quantize stage is interrupted"):
        qat_artifacts(root)
    assert stale_qat(root) is None
