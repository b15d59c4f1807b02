"""RobustBench teachers: the real robustbench package builds its model-zoo architecture (Ding2020MMA, a
WRN-28-4, the smallest CIFAR-10 Linf entry) and reads random weights this test saves in its model_dir
layout, as RobustBench's checkpoints are (``{"state_dict": {"module.<key>": ...}}``); nothing downloads.
A distillation from it really runs (a few images, one step), and bad input is refused before any work."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ciard_deploy.config import DistillRecipe, TeacherSpec, deep_merge, find_recipe, load_recipe, recipe_from_dict
from ciard_deploy.data import get_dataset_info
from ciard_deploy.data.base import DatasetInfo
from ciard_deploy.distill import robustbench_teachers as rbt
from ciard_deploy.distill.teachers import load_teacher
from ciard_deploy.distill.trainer import run
from ciard_deploy.errors import EXIT_BAD_INPUT, EXIT_ENVIRONMENT, ArtifactError, EnvironmentMissing, RecipeError
from ciard_deploy.workflow import Layout, plan, stage_inputs
from ciard_deploy.workflow.planning import teacher_inputs
from ciard_deploy.fingerprint import canonical_json_hash

pytestmark = pytest.mark.unit
MODEL_ID = "Ding2020MMA"
CIFAR10 = get_dataset_info("cifar10")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A model_dir holding ``cifar10/Linf/Ding2020MMA.pt`` (random weights of robustbench's own architecture,
    with a DataParallel ``module.`` prefix) and the network they came from."""
    rb = rbt.import_robustbench()
    torch.manual_seed(0)
    net = rb.model_dicts[rb.Dataset("cifar10")][rb.ThreatModel("Linf")][MODEL_ID]["model"]().eval()
    model_dir = tmp_path_factory.mktemp("robustbench-models")
    (model_dir / "cifar10" / "Linf").mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}},
               model_dir / "cifar10" / "Linf" / f"{MODEL_ID}.pt")
    return model_dir, net


def _spec(model_dir: Path, **kw) -> TeacherSpec:
    return TeacherSpec(**{"robustbench": MODEL_ID, "model_dir": str(model_dir), **kw})


def test_a_zoo_model_loads_with_the_saved_weights_and_is_recorded(zoo):
    model_dir, net = zoo
    model, ref = load_teacher(_spec(model_dir), "robust", CIFAR10, CPU)
    assert type(model).__name__ == type(net).__name__ == "Ding2020MMANet"
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), net(x), rtol=0, atol=0)  # the same network, the same weights
    weights = model_dir / "cifar10" / "Linf" / f"{MODEL_ID}.pt"
    assert ref == {"role": "robust", "source": "robustbench", "robustbench": MODEL_ID, "threat_model": "Linf",
                   "dataset": "cifar10", "path": str(weights), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                   "arch": f"robustbench:{MODEL_ID}", "recipe": None, "recipe_hash": None, "metrics": {}}


def test_wrong_id_dataset_or_threat_model_is_one_line_naming_it(zoo):
    model_dir, _ = zoo
    cases = [
        ({"robustbench": "Ding2020MM"}, CIFAR10, "unknown RobustBench cifar10 Linf model 'Ding2020MM' (did you mean "
                                                 "'Ding2020MMA'?)"),
        ({"robustbench": "Augustin2020Adversarial"}, CIFAR10, "Augustin2020Adversarial is a RobustBench cifar10 L2 "
                                                              "model, not cifar10 Linf"),
        ({"robustbench": "Gowal2020Uncovering_extra"}, CIFAR10, "cifar100 Linf model, not cifar10 Linf"),
        ({"robustbench": MODEL_ID}, get_dataset_info("cifar100"), "Ding2020MMA is a RobustBench cifar10 Linf and "
                                                                  "cifar10 L2 model, not cifar100 Linf"),
    ]
    for kw, info, needle in cases:
        with pytest.raises(RecipeError) as ei:
            load_teacher(_spec(model_dir, **kw), "robust", info, CPU)
        assert needle in str(ei.value) and "\n" not in str(ei.value) and ei.value.exit_code == EXIT_BAD_INPUT


def test_a_missing_weights_file_is_refused_with_the_path_and_how_to_download_it(zoo, tmp_path):
    with pytest.raises(ArtifactError) as ei:
        load_teacher(_spec(tmp_path), "robust", CIFAR10, CPU)
    msg = str(ei.value)
    assert msg.startswith(f"teachers.robust.robustbench: {MODEL_ID}: no weights file "
                          f"{tmp_path / 'cifar10' / 'Linf' / MODEL_ID}.pt; download it as RobustBench does: ")
    assert f"load_model('{MODEL_ID}', model_dir='{tmp_path}', dataset='cifar10', threat_model='Linf')" in msg
    assert "\n" not in msg and list(tmp_path.iterdir()) == []  # nothing downloaded, nothing made


def test_data_that_does_not_fit_and_weights_of_another_network(zoo, tmp_path):
    model_dir, _ = zoo
    folder100 = DatasetInfo("imagefolder", tuple(map(str, range(100))), (3, 32, 32), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ArtifactError, match=r"Ding2020MMA is a cifar10 model \(10 classes\); this run's data has "
                                            r"100 classes"):
        load_teacher(_spec(model_dir, dataset="cifar10"), "robust", folder100, CPU)
    big = DatasetInfo("imagefolder", CIFAR10.classes, (3, 64, 64), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ArtifactError, match="cifar10 models take 3x32x32 images; this run's are 3x64x64"):
        load_teacher(_spec(model_dir, dataset="cifar10"), "robust", big, CPU)
    (tmp_path / "cifar10" / "Linf").mkdir(parents=True)
    torch.save({"state_dict": {"conv1.weight": torch.zeros(3)}}, tmp_path / "cifar10" / "Linf" / f"{MODEL_ID}.pt")
    with pytest.raises(ArtifactError, match=f"does not load into RobustBench's {MODEL_ID}: Error"):
        load_teacher(_spec(tmp_path), "robust", CIFAR10, CPU)


def test_robustbench_not_installed_is_exit_3_naming_the_extra(zoo, monkeypatch):
    monkeypatch.setitem(sys.modules, "robustbench", None)
    with pytest.raises(EnvironmentMissing) as ei:
        load_teacher(_spec(zoo[0]), "clean", CIFAR10, CPU)
    assert ei.value.exit_code == EXIT_ENVIRONMENT
    assert str(ei.value) == "RobustBench teachers need the robustbench package: pip install 'ciard-deploy[robustbench]'"


# --------------------------------------------------------------------------- recipes
BASE = {"kind": "distill", "student": {"arch": "small_cnn"}, "method": {"name": "ard"},
        "data": {"dataset": "cifar10"}, "teachers": {"robust": {"robustbench": MODEL_ID}}}


def test_recipe_keys_defaults_and_hash():
    r = recipe_from_dict(BASE)
    assert isinstance(r, DistillRecipe) and r.teachers.robust.threat_model == "Linf"  # RobustBench's default
    assert r.to_dict()["teachers"]["robust"] == {
        "checkpoint": None, "recipe": None, "recipe_hash": None, "arch": None, "normalize": False,
        "robustbench": MODEL_ID, "threat_model": "Linf", "dataset": None, "model_dir": None}
    # the hash names the entry, not where its weights lie
    moved = recipe_from_dict(deep_merge(BASE, {"teachers": {"robust": {"model_dir": "/elsewhere"}}}))
    assert moved.hash == r.hash
    other = recipe_from_dict(deep_merge(BASE, {"teachers": {"robust": {"robustbench": "Zhang2019Theoretically"}}}))
    assert other.hash != r.hash
    # a checkpoint teacher's resolved recipe has none of the new keys (hashes of existing recipes unchanged)
    ck = recipe_from_dict(deep_merge(BASE, {"teachers": {"robust": {"robustbench": None, "checkpoint": "/x.safetensors"}}}))
    assert set(ck.to_dict()["teachers"]["robust"]) == {"checkpoint", "recipe", "recipe_hash", "arch", "normalize"}


@pytest.mark.parametrize("patch, needle", [
    ({"teachers": {"robust": {"arch": "wrn-34-10"}}}, "come from its model zoo: remove arch"),
    ({"teachers": {"robust": {"checkpoint": "/x.safetensors"}}}, "exactly one of 'checkpoint' or 'recipe' or "
                                                                 "'robustbench'"),
    ({"teachers": {"robust": {"robustbench": None, "checkpoint": "/x.safetensors", "threat_model": "Linf"}}},
     "threat_model: only for a RobustBench teacher"),
    ({"teachers": {"robust": {"threat_model": "L2"}}}, "teachers.robust.threat_model: 'L2', but the recipe trains "
                                                       "against L-inf attacks"),
    ({"teachers": {"robust": {"threat_model": "Linf2"}}}, "teachers.robust.threat_model"),
    ({"teachers": {"robust": {"dataset": "cifar100"}}}, "teachers.robust.dataset: 'cifar100', but this recipe trains "
                                                        "on 'cifar10'"),
    ({"data": {"dataset": "digits"}}, "RobustBench has models for cifar10, cifar100, imagenet only, this recipe "
                                      "trains on 'digits'"),
    ({"data": {"dataset": "imagefolder"}}, "teachers.robust.dataset: required for an imagefolder recipe"),
])
def test_recipe_problems(patch, needle):
    with pytest.raises(RecipeError) as ei:
        recipe_from_dict(deep_merge(BASE, patch))
    assert needle in str(ei.value)


def test_ciard_run_inputs_pin_the_weights(zoo, tmp_path):
    """A changed weights file under the same ID runs ``ciard run``'s distill stage again."""
    model_dir, _ = zoo
    rec = recipe_from_dict(deep_merge(BASE, {"teachers": {"robust": {"model_dir": str(model_dir)}},
                                             "deploy": {"formats": ["onnx"]}}))
    weights = model_dir / "cifar10" / "Linf" / f"{MODEL_ID}.pt"
    ins = teacher_inputs(rec)
    assert ins == {"robust": {"robustbench": MODEL_ID, "threat_model": "Linf", "dataset": "cifar10",
                              "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}}
    layout = Layout(tmp_path)
    before = stage_inputs("distill", rec, layout, teachers=ins)
    record = {"status": "done", "inputs": before, "inputs_hash": canonical_json_hash(before), "outputs": {}}
    changed = dict(ins, robust=dict(ins["robust"], sha256="0" * 64))
    action, why = plan("distill", record, stage_inputs("distill", rec, layout, teachers=changed), tmp_path)
    assert action == "run" and "teachers.robust.sha256" in why
    missing = recipe_from_dict(deep_merge(BASE, {"teachers": {"robust": {"model_dir": str(tmp_path)}}}))
    with pytest.raises(ArtifactError, match="no weights file"):
        teacher_inputs(missing)


# --------------------------------------------------------------------------- a real distillation
def _image_folder(root: Path, per_class: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c in CIFAR10.classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_a_distillation_from_a_robustbench_teacher_runs(zoo, tmp_path):
    model_dir, _ = zoo
    data = _image_folder(tmp_path / "data", {"train": 1, "test": 1})
    recipe = deep_merge(BASE, {
        "data": {"dataset": "imagefolder", "data_root": str(data), "holdout": 0, "batch_size": 10, "augment": False,
                 "eval_batch_size": 10},
        "teachers": {"robust": {"dataset": "cifar10", "model_dir": str(model_dir)}},
        "attack": {"eps": "8/255", "steps": 1, "step_size": "8/255"},
        "train": {"epochs": 1, "device": "cpu", "selection": "test", "eval_n": 10, "eval_attack": "fgsm",
                  "final_attacks": []},
    })
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))
    summary = run(path, tmp_path / "run", handle_signals=False)
    assert summary["status"] == "complete"
    teachers = json.loads((tmp_path / "run" / "teachers.json").read_text())
    weights = model_dir / "cifar10" / "Linf" / f"{MODEL_ID}.pt"
    assert teachers["robust"]["robustbench"] == MODEL_ID
    assert teachers["robust"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s]
    assert losses and all(np.isfinite(losses)) and losses[0] > 0


@pytest.mark.parametrize("name, model_id, dataset", [
    ("cifar10/cifar10_ciard_robustbench-zhang2019-wrn-34-10_to_resnet18_linf8", "Zhang2019Theoretically", "cifar10"),
    ("cifar100/cifar100_ciard_robustbench-gowal2020-wrn-70-16_to_resnet18_linf8", "Gowal2020Uncovering",
     "cifar100"),
])
def test_the_paper_recipes_name_teachers_of_the_installed_model_zoo(name, model_id, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("CIARD_CACHE", str(tmp_path))
    r = load_recipe(find_recipe(name))
    entry = rbt.locate(r.teachers.robust, "robust", r.data.dataset)
    assert (entry.model_id, entry.dataset, entry.threat_model) == (model_id, dataset, "Linf")
    assert entry.files == (tmp_path / "robustbench" / dataset / "Linf" / f"{model_id}.pt",)  # the default model_dir


def test_the_cli_says_it_in_one_line_with_the_exit_code(zoo, tmp_path, invoke, monkeypatch):
    """``ciard distill``: missing weights exit 2, robustbench absent exit 3; no traceback either way."""
    data = _image_folder(tmp_path / "data", {"train": 1, "test": 1})
    recipe = deep_merge(BASE, {"data": {"dataset": "imagefolder", "data_root": str(data), "holdout": 0},
                               "teachers": {"robust": {"dataset": "cifar10", "model_dir": str(tmp_path / "empty")}},
                               "train": {"device": "cpu", "selection": "test"}})
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))
    res = invoke("distill", path, "--out", tmp_path / "run")
    assert res.exit_code == EXIT_BAD_INPUT and "Traceback" not in res.output, res.output
    assert f"{MODEL_ID}: no weights file {tmp_path / 'empty' / 'cifar10' / 'Linf' / MODEL_ID}.pt" in res.output
    monkeypatch.setitem(sys.modules, "robustbench", None)
    res = invoke("distill", path, "--out", tmp_path / "run2")
    assert res.exit_code == EXIT_ENVIRONMENT and "pip install 'ciard-deploy[robustbench]'" in res.output, res.output
