"""Teacher loading: ciard checkpoints, users' plain state dicts (module. prefixes), and clear errors."""

from __future__ import annotations

import pytest
import torch
import yaml

from ciard_deploy.config import TeacherSpec, recipe_from_dict
from ciard_deploy.data import get_dataset_info
from ciard_deploy.distill.teachers import load_teacher
from ciard_deploy.config import load_teacher_recipe
from ciard_deploy.distill.trainer import resolve_teachers, run
from ciard_deploy.errors import ArtifactError, RecipeError
from ciard_deploy.checkpoints import CheckpointMeta, save_checkpoint
from ciard_deploy.models import create_model

pytestmark = pytest.mark.unit
INFO = get_dataset_info("digits")


def test_plain_state_dict_with_module_prefix(tmp_path):
    torch.manual_seed(0)
    net = create_model("tiny_cnn", 10, 1).net  # a bare network, as users save them
    sd = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 99}, tmp_path / "robust.pth")
    model, ref = load_teacher(TeacherSpec(checkpoint=str(tmp_path / "robust.pth"), arch="tiny_cnn"), "robust",
                              INFO, torch.device("cpu"))
    assert torch.equal(model.net.features[0].weight, net.features[0].weight)
    assert ref["source"] == "checkpoint" and ref["arch"] == "tiny_cnn" and len(ref["sha256"]) == 64
    # no normalization inside unless asked: the network sees [0, 1] pixels as the reference checkpoints expect
    assert float(model.mean.sum()) == 0.0 and float(model.std.prod()) == 1.0
    normed, _ = load_teacher(TeacherSpec(checkpoint=str(tmp_path / "robust.pth"), arch="tiny_cnn", normalize=True),
                             "robust", INFO, torch.device("cpu"))
    assert float(normed.mean.flatten()[0]) == pytest.approx(INFO.mean[0])


def test_checkpoint_errors(tmp_path):
    cpu = torch.device("cpu")
    with pytest.raises(ArtifactError, match="not found"):
        load_teacher(TeacherSpec(checkpoint=str(tmp_path / "nope.pt"), arch="tiny_cnn"), "clean", INFO, cpu)
    m = create_model("tiny_cnn", 10, 1)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ArtifactError, match="give teachers.clean.arch"):
        load_teacher(TeacherSpec(checkpoint=str(tmp_path / "bare.safetensors")), "clean", INFO, cpu)
    with pytest.raises(ArtifactError, match="does not fit"):
        load_teacher(TeacherSpec(checkpoint=str(tmp_path / "bare.safetensors"), arch="small_cnn"), "clean", INFO, cpu)
    wide = create_model("tiny_cnn", 5, 1)
    save_checkpoint(tmp_path / "five", wide, CheckpointMeta("tiny_cnn", 5, INFO.input_shape, INFO.mean, INFO.std))
    with pytest.raises(ArtifactError, match="5 classes"):
        load_teacher(TeacherSpec(checkpoint=str(tmp_path / "five.safetensors")), "clean", INFO, cpu)
    torch.save({"w": torch.zeros(1), "obj": ArtifactError("x")}, tmp_path / "pickled.pt")
    with pytest.raises(ArtifactError, match="refusing|cannot read"):
        load_teacher(TeacherSpec(checkpoint=str(tmp_path / "pickled.pt"), arch="tiny_cnn"), "clean", INFO, cpu)


def test_teacher_recipe_must_be_kind_train_on_the_same_dataset(tmp_path):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"kind": "train", "model": {"arch": "tiny_cnn"},
                                                     "method": {"name": "natural"}, "data": {"dataset": "cifar10"}}))
    with pytest.raises(RecipeError, match="trains on 'cifar10', the student on 'digits'"):
        load_teacher_recipe(tmp_path / "t.yaml", "clean", "digits")
    (tmp_path / "bad.yaml").write_text("kind: train\nmodel: {arch: tiny_cnn}\nmethod: {name: natural, x: 1}\n")
    with pytest.raises(RecipeError, match=r"teachers.robust.recipe: .*method.x: unknown key"):
        load_teacher_recipe(tmp_path / "bad.yaml", "robust", "digits")


def test_resolve_teachers_gives_models_on_device_and_references(tmp_path):
    for role in ("clean", "robust"):
        save_checkpoint(tmp_path / role, create_model("tiny_cnn", 10, 1, INFO.mean, INFO.std),
                        CheckpointMeta("tiny_cnn", 10, INFO.input_shape, INFO.mean, INFO.std, "digits",
                                       recipe_hash="abc"))
    r = recipe_from_dict({"kind": "distill", "student": {"arch": "tiny_cnn"}, "method": {"name": "mtard"},
                          "teachers": {role: {"checkpoint": str(tmp_path / f"{role}.safetensors")}
                                       for role in ("clean", "robust")}})
    models, refs = resolve_teachers(r, INFO, torch.device("cpu"))
    assert set(models) == {"clean", "robust"} and refs["robust"]["recipe_hash"] == "abc"
    assert refs["clean"]["path"].endswith("clean.safetensors")


def test_bf16_autocast_on_cpu_trains(tmp_path):
    r = recipe_from_dict({"kind": "train", "model": {"arch": "tiny_cnn"}, "method": {"name": "pgd_at"},
                          "data": {"train_subset": 120, "holdout": 20, "batch_size": 50},
                          "attack": {"eps": 0.15, "steps": 2, "step_size": 0.08},
                          "train": {"epochs": 1, "device": "cpu", "amp": "bf16", "eval_n": 20, "final_eval_n": 20}})
    s = run(r, tmp_path / "run")
    assert s["status"] == "complete" and s["amp"] == "bf16"
    assert 0.0 <= s["last"]["pgd20@0.15"] <= s["last"]["clean"] <= 1.0
    assert torch.isfinite(torch.tensor(s["final_train_metrics"]["loss"]))


def test_teacher_recipe_takes_the_students_data_root(tmp_path):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"kind": "train", "model": {"arch": "tiny_cnn"},
                                                     "method": {"name": "natural"},
                                                     "data": {"dataset": "imagefolder", "data_root": "/nowhere"},
                                                     "train": {"eval_attack": None, "select_by": "clean"}}))
    assert load_teacher_recipe(tmp_path / "t.yaml", "clean", "imagefolder").data.data_root == "/nowhere"
    moved = load_teacher_recipe(tmp_path / "t.yaml", "clean", "imagefolder", data_root="/data/my: cifar")
    assert moved.data.data_root == "/data/my: cifar"


def test_one_teacher_hash_keys_the_cache_and_enters_the_student_hash(tmp_path):
    """The teacher cache folder and the student's hash come from the same teacher recipe hash, and a
    run refuses a teacher recipe that changed after the student recipe pinned it (before training)."""
    from ciard_deploy.distill.teachers import cached_run_dir, teacher_cache_dir

    teacher = tmp_path / "t.yaml"
    teacher.write_text(yaml.safe_dump({"kind": "train", "model": {"arch": "tiny_cnn"}, "method": {"name": "natural"},
                                       "train": {"epochs": 1, "eval_attack": None, "select_by": "clean"}}))
    r = recipe_from_dict({"kind": "distill", "student": {"arch": "tiny_cnn"}, "method": {"name": "mtard"},
                          "teachers": {"clean": {"recipe": str(teacher)},
                                       "robust": {"checkpoint": str(tmp_path / "robust.safetensors")}}})
    assert cached_run_dir(load_teacher_recipe(teacher, "clean", "digits")).name == r.teacher_hash("clean")[:16]
    pinned = recipe_from_dict(r.to_dict())  # as a run dir's recipe.yaml stores it
    assert pinned.teachers.clean.recipe_hash == r.teacher_hash("clean") and pinned.hash == r.hash
    teacher.write_text(teacher.read_text().replace("epochs: 1", "epochs: 2"))
    before = sorted(teacher_cache_dir().glob("*"))  # the session's cache: other tests' teachers live there too
    with pytest.raises(RecipeError, match=r"teachers.clean.recipe: .*t.yaml changed: .*remove the pin"):
        resolve_teachers(pinned, INFO, torch.device("cpu"))
    assert sorted(teacher_cache_dir().glob("*")) == before  # refused before any training


def test_resume_notices_an_edited_teacher_recipe(tmp_path):
    """A run dir's recipe.yaml pins its teacher recipes' hashes: after the teacher recipe is edited, a
    resume from that file refuses to train on, and a resume with the (re-read) original recipe file
    is refused as a different recipe, naming the teacher."""
    from ciard_deploy.config import load_recipe

    small = {"dataset": "digits", "train_subset": 100, "holdout": 20, "batch_size": 50}
    train = {"device": "cpu", "eval_n": 20, "final_eval_n": 20, "eval_attack": None, "select_by": "clean",
             "final_attacks": []}
    teacher = tmp_path / "robust.yaml"
    teacher.write_text(yaml.safe_dump({"kind": "train", "model": {"arch": "tiny_cnn"}, "method": {"name": "natural"},
                                       "data": small, "train": {**train, "epochs": 1}}))
    student = tmp_path / "student.yaml"
    student.write_text(yaml.safe_dump({"kind": "distill", "student": {"arch": "tiny_cnn"}, "method": {"name": "ard"},
                                       "teachers": {"robust": {"recipe": "robust.yaml"}}, "data": small,
                                       "attack": {"eps": 0.2, "steps": 1, "step_size": 0.2},
                                       "train": {**train, "epochs": 2}}))
    out = tmp_path / "run"
    s = run(load_recipe(student), out, stop_after_epoch=1, handle_signals=False)
    assert s["status"] != "complete"
    stored = load_recipe(out / "recipe.yaml")
    assert stored.teachers.robust.recipe_hash == load_teacher_recipe(teacher, "robust", "digits").hash
    teacher.write_text(teacher.read_text().replace("epochs: 1", "epochs: 2"))
    with pytest.raises(RecipeError, match=r"teachers.robust.recipe: .*robust.yaml changed"):
        run(stored, out, resume=True, handle_signals=False)
    with pytest.raises(RecipeError, match=r"recipe differs .*teachers.robust.recipe_hash"):
        run(load_recipe(student), out, resume=True, handle_signals=False)
