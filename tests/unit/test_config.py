"""Typed recipes: validation that names every bad key, extends, overrides, hashes, shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ciard_deploy.config import (DistillRecipe, TrainRecipe, apply_overrides, check_recipe_tree, deep_merge,
                                 field_docs, find_recipe, list_recipes, load_raw, load_recipe, recipe_from_dict,
                                 recipes_dir)
from ciard_deploy.errors import RecipeError

pytestmark = pytest.mark.unit

DISTILL = {
    "kind": "distill",
    "student": {"arch": "tiny_cnn"},
    "teachers": {"clean": {"checkpoint": "/x/clean.safetensors"},
                 "robust": {"checkpoint": "/x/robust.pt", "arch": "small_cnn_wide"}},
    "method": {"name": "ciard"},
    "attack": {"eps": "8/255"},
    "train": {"epochs": 2},
}


def write(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def problems_of(data: dict, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as ei:
        recipe_from_dict(data, overrides)
    return ei.value.problems if hasattr(ei.value, "problems") else [str(ei.value)]


def test_valid_recipe_fills_defaults_and_parses_eps():
    r = recipe_from_dict(DISTILL)
    assert isinstance(r, DistillRecipe)
    assert r.attack.eps == pytest.approx(8 / 255) and r.attack.step_size == pytest.approx(2 / 255)
    assert r.method.name == "ciard" and r.method.params["push_loss"] is True  # the method's own defaults
    assert r.optim.lr == 0.1 and r.optim.schedule == "ciard" and r.train.selection == "holdout"
    d = r.to_dict()
    assert d["attack"]["eps"] == "8/255"  # written back the way people write it
    assert d["method"]["teacher_lr"] == pytest.approx(1e-4)


def test_every_problem_reported_at_once_with_key_paths_and_suggestions():
    bad = deep_merge(DISTILL, {"method": {"push_los": True}, "optim": {"shedule": "step", "lr": -1},
                               "train": {"epoch": 3}, "data": {"dataset": "digit"}})
    probs = problems_of(bad)
    text = "\n".join(probs)
    assert "method.push_los: unknown key (did you mean 'push_loss'?)" in probs
    assert "optim.shedule: unknown key (did you mean 'schedule'?)" in probs
    assert "train.epoch: unknown key (did you mean 'epochs'?)" in probs
    assert any(p.startswith("optim.lr:") and "greater than 0" in p for p in probs)
    assert "data.dataset" in text and "'digits'" in text
    assert len(probs) == 5


def test_message_is_one_line_for_one_problem():
    with pytest.raises(RecipeError) as ei:
        recipe_from_dict(deep_merge(DISTILL, {"attack": {"eps": "9"}}))
    msg = str(ei.value)
    assert "\n" not in msg
    assert "attack.eps" in msg and "9/255" in msg


@pytest.mark.parametrize("patch, needle", [
    ({"kind": "distil"}, "did you mean 'distill'"),
    ({"teachers": {"clean": None}}, "teachers.clean: required by method 'ciard'"),
    ({"method": {"name": "rslad"}}, "teachers.clean: method 'rslad' does not use a clean teacher"),
    ({"method": {"name": "ciardd"}}, "method.name: unknown method 'ciardd' (did you mean 'ciard'?)"),
    ({"teachers": {"clean": {"recipe": "/a.yaml"}}}, "exactly one of 'checkpoint' or 'recipe'"),
    ({"teachers": {"robust": {"arch": None}}}, "needs 'arch'"),
    ({"optim": {"schedule": "step"}}, "optim.milestones"),
    ({"train": {"selection": "holdout"}, "data": {"holdout": 0}}, "data.holdout"),
    ({"train": {"eval_attack": "pgdx"}}, "train.eval_attack"),
    ({"train": {"eval_attack": None}}, "select_by 'mean' needs an eval_attack"),
    ({"train": {"amp": "fp8"}}, "train.amp"),
    ({"schema_version": 2}, "schema_version"),
    ({"deploy": {"onnx": True}}, "deploy.onnx: unknown key"),
])
def test_specific_problems(patch, needle):
    text = "\n".join(problems_of(deep_merge(DISTILL, patch)))
    assert needle in text


def test_train_recipe_rejects_teacher_methods():
    data = {"kind": "train", "model": {"arch": "tiny_cnn"}, "method": {"name": "mtard"}}
    assert any("use kind: distill" in p for p in problems_of(data))
    r = recipe_from_dict({"kind": "train", "model": {"arch": "tiny_cnn"}, "method": {"name": "trades", "beta": 3}})
    assert isinstance(r, TrainRecipe) and r.method.params["beta"] == 3


def test_overrides_parse_yaml_scalars_and_create_sections():
    d = apply_overrides(DISTILL, ["train.epochs=5", "attack.eps=0.1", "train.final_attacks=[pgd20, fgsm]",
                                  "data.data_root=/tmp/x", "train.eval_attack=null"])
    assert d["train"]["epochs"] == 5 and d["attack"]["eps"] == 0.1
    assert d["train"]["final_attacks"] == ["pgd20", "fgsm"] and d["train"]["eval_attack"] is None
    assert d["data"] == {"data_root": "/tmp/x"}
    assert DISTILL["train"] == {"epochs": 2}  # the input is not modified
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        apply_overrides(DISTILL, ["train.epochs"])
    with pytest.raises(RecipeError, match="train.epochs is a value"):
        apply_overrides(DISTILL, ["train.epochs.x=1"])
    assert any("train.epoch: unknown key (did you mean 'epochs'?)" in p for p in problems_of(DISTILL, ["train.epoch=1"]))


def test_extends_deep_merges_relative_to_the_file_and_resolves_paths(tmp_path):
    write(tmp_path / "base" / "_b.yaml", {"data": {"dataset": "digits", "batch_size": 32},
                                          "train": {"epochs": 7, "seed": 3}})
    write(tmp_path / "teach.yaml", {"kind": "train", "model": {"arch": "tiny_cnn"}, "method": {"name": "natural"},
                                    "train": {"eval_attack": None, "select_by": "clean"}})
    child = write(tmp_path / "sub" / "r.yaml", "# ciard distill sub/r.yaml\n" + yaml.safe_dump({
        "extends": "../base/_b.yaml", "kind": "distill", "student": {"arch": "tiny_cnn"},
        "teachers": {"clean": {"recipe": "../teach.yaml"}, "robust": {"checkpoint": "../rob.safetensors"}},
        "method": {"name": "mtard"}, "train": {"epochs": 2}}))
    r = load_recipe(child)
    assert r.data.batch_size == 32 and r.train.epochs == 2 and r.train.seed == 3  # merged, child wins
    assert Path(r.teachers.clean.recipe) == (tmp_path / "teach.yaml").resolve()
    assert Path(r.teachers.robust.checkpoint) == (tmp_path / "rob.safetensors").resolve()
    assert r.source == child
    assert check_recipe_tree(r) == []
    # a teacher recipe of the wrong kind or dataset is caught by the tree check
    write(tmp_path / "teach.yaml", yaml.safe_dump({**DISTILL, "student": {"arch": "tiny_cnn"}}))
    assert "kind 'distill'" in check_recipe_tree(load_recipe(child))[0]


def test_extends_errors(tmp_path):
    a = write(tmp_path / "a.yaml", {"extends": "b.yaml", "kind": "train"})
    write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(RecipeError, match="extends itself"):
        load_raw(a)
    c = write(tmp_path / "c.yaml", {"extends": "missing.yaml"})
    with pytest.raises(RecipeError, match="extends 'missing.yaml', which is not found"):
        load_raw(c)


def test_missing_file_and_bad_yaml_are_one_line(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = write(tmp_path / "bad.yaml", "kind: distill\nstudent: {arch: tiny_cnn\n")
    with pytest.raises(RecipeError) as ei:
        load_recipe(bad)
    assert "not valid YAML" in str(ei.value) and "line" in str(ei.value) and "\n" not in str(ei.value)
    lst = write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(lst)


def test_hash_is_canonical_and_changes_with_content(tmp_path):
    r1 = recipe_from_dict(DISTILL)
    r2 = recipe_from_dict({**DISTILL, "attack": {"eps": 8 / 255}})  # same value, written differently
    r3 = recipe_from_dict(DISTILL, ["train.epochs=3"])
    assert r1.hash == r2.hash and len(r1.hash) == 64
    assert r3.hash != r1.hash
    # the resolved YAML loads back to the same recipe
    p = write(tmp_path / "resolved.yaml", r1.to_yaml())
    assert load_recipe(p).hash == r1.hash


def test_recipes_are_frozen():
    r = recipe_from_dict(DISTILL)
    with pytest.raises(Exception):
        r.train.epochs = 3  # type: ignore[misc]


def test_field_docs_cover_sections_with_descriptions():
    rows = {k: (t, d) for k, t, d in field_docs()}
    for key in ("data.dataset", "optim.schedule", "train.selection", "teachers.robust", "attack.eps", "model"):
        assert key in rows
    assert all(d for k, (t, d) in rows.items() if "." in k), [k for k, (t, d) in rows.items() if not d]


def test_shipped_recipes_found_by_name():
    assert recipes_dir() is not None
    shipped = list_recipes()
    name = "quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15"
    assert name in shipped and not any(Path(p).name.startswith("_") for p in shipped.values())
    assert find_recipe(name) == shipped[name]
    assert find_recipe(name.split("/")[-1]) == shipped[name]  # the last part alone is unique
    with pytest.raises(RecipeError, match="did you mean"):
        find_recipe("digits_ciard_small_cnn_to_tiny_cnn_linf0.3")
