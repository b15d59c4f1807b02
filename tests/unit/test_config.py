"""Typed recipes: validation that names every bad key, extends, overrides, hashes, shipped recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ciard_deploy.config import (DistillRecipe, TrainRecipe, apply_overrides, check_recipe_tree, check_teacher_pin,
                                 deep_merge, field_docs, find_recipe, list_recipes, load_raw, load_recipe,
                                 load_teacher_recipe, recipe_from_dict, recipes_dir)
from ciard_deploy.errors import RecipeError

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]

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


def test_every_quick_recipe_has_a_deploy_section_and_says_how_to_run_it():
    """`ciard run` takes every quick recipe (the deploy: section comes from the quick base); the digits
    teachers, which extend that base too, are not deployed."""
    shipped = list_recipes()
    quick = {n: p for n, p in shipped.items() if n.startswith("quick/")}
    assert len(quick) == 7
    for name, path in quick.items():
        r = load_recipe(path)
        assert r.deploy is not None and r.deploy.formats == ["onnx", "onnx-int8"], name
        gates = r.deploy.gates_mapping()
        assert gates["min_clean"] == 0.9 and gates["min_agreement"] == 0.97, name
        if r.method.name == "natural":  # undefended: nothing to gate on robustness
            assert "min_robust" not in gates and "min_agreement_adv" not in gates
        else:
            assert gates["min_robust"] == 0.45, name
        header = "\n".join(path.read_text().splitlines()[:4])
        assert f"\n#   ciard run recipes/{name}.yaml --out " in header, header
    for name in ("teachers/digits_natural_small_cnn", "teachers/digits_trades_small_cnn_linf0.15"):
        assert load_recipe(shipped[name]).deploy is None


# --------------------------------------------------------------------------- teachers in the hash
TEACHER_BASE = {"data": {"dataset": "digits", "batch_size": 32}, "train": {"eval_attack": None, "select_by": "clean"}}


def teacher_tree(root: Path, epochs: int = 5) -> Path:
    """A clean teacher recipe that extends a base next to it; returns the teacher file."""
    write(root / "_base.yaml", TEACHER_BASE)
    return write(root / "clean.yaml", {"extends": "_base.yaml", "kind": "train", "model": {"arch": "small_cnn"},
                                       "method": {"name": "natural"}, "train": {"epochs": epochs}})


def student(path: Path, clean_ref: str, **teachers_extra) -> Path:
    return write(path, {"kind": "distill", "student": {"arch": "tiny_cnn"}, "method": {"name": "mtard"},
                        "teachers": {"clean": {"recipe": clean_ref},
                                     "robust": {"checkpoint": "/ckpt/robust.safetensors"}, **teachers_extra},
                        "train": {"epochs": 2}})


def test_editing_a_teacher_recipe_changes_the_student_hash(tmp_path):
    teacher = teacher_tree(tmp_path / "teachers")
    s = student(tmp_path / "students" / "s.yaml", "../teachers/clean.yaml")
    h0 = load_recipe(s).hash
    teacher_tree(tmp_path / "teachers", epochs=6)  # the teacher file itself
    h1 = load_recipe(s).hash
    assert h1 != h0
    write(tmp_path / "teachers" / "_base.yaml", deep_merge(TEACHER_BASE, {"data": {"batch_size": 64}}))
    assert load_recipe(s).hash not in (h0, h1)  # what it extends is part of its content
    teacher_tree(tmp_path / "teachers")  # back to the first content: back to the first hash
    assert load_recipe(s).hash == h0
    assert teacher.exists()


def test_a_moved_or_renamed_teacher_recipe_keeps_the_student_hash(tmp_path):
    teacher_tree(tmp_path / "teachers")
    h0 = load_recipe(student(tmp_path / "students" / "s.yaml", "../teachers/clean.yaml")).hash
    # the same content elsewhere, under another name, named by another spelling of its path
    moved = tmp_path / "elsewhere" / "deep" / "clean_teacher.yaml"
    write(moved.parent / "_base.yaml", TEACHER_BASE)
    moved.write_text((tmp_path / "teachers" / "clean.yaml").read_text())
    spellings = [str(moved), f"{moved.parent}/./../deep/{moved.name}", "../elsewhere/deep/clean_teacher.yaml"]
    for i, ref in enumerate(spellings):
        r = load_recipe(student(tmp_path / "students" / f"s{i}.yaml", ref))
        assert Path(r.teachers.clean.recipe) == moved.resolve()
        assert r.hash == h0, ref
        assert str(tmp_path) not in json.dumps(r.hash_payload()["teachers"]["clean"])  # no path in the hash


def test_teacher_hash_is_the_teacher_cache_key_with_the_students_data_root(tmp_path):
    teacher = teacher_tree(tmp_path / "teachers")
    r = load_recipe(student(tmp_path / "s.yaml", str(teacher)))
    assert r.teacher_hashes() == {"clean": load_teacher_recipe(teacher, "clean", "digits").hash}
    moved_data = load_recipe(student(tmp_path / "s.yaml", str(teacher)), ["data.data_root=/data/digits"])
    assert moved_data.teacher_hash("clean") == load_teacher_recipe(teacher, "clean", "digits", "/data/digits").hash
    assert moved_data.teacher_hash("clean") != r.teacher_hash("clean")  # as the cache key does


def test_a_recipe_hash_is_a_snapshot_and_a_changed_teacher_is_caught(tmp_path):
    teacher = teacher_tree(tmp_path / "teachers")
    r = load_recipe(student(tmp_path / "s.yaml", str(teacher)))
    h0 = r.hash
    teacher_tree(tmp_path / "teachers", epochs=9)
    assert r.hash == h0  # the object does not change under its user...
    now = load_teacher_recipe(teacher, "clean", "digits")
    with pytest.raises(RecipeError, match=r"teachers.clean.recipe: .*clean.yaml changed: .*load the recipe again"):
        check_teacher_pin(r, "clean", now)  # ...and a run that reads the edited teacher refuses it


def test_resolved_recipe_pins_its_teachers(tmp_path):
    teacher = teacher_tree(tmp_path / "teachers")
    r = load_recipe(student(tmp_path / "s.yaml", str(teacher)))
    assert r.to_dict()["teachers"]["clean"]["recipe_hash"] == r.teacher_hash("clean")
    assert r.to_dict()["teachers"]["robust"]["recipe_hash"] is None  # a checkpoint teacher has none
    pinned_path = write(tmp_path / "run" / "recipe.yaml", r.to_yaml())  # what a run dir stores
    pinned = load_recipe(pinned_path)
    assert pinned.teachers.clean.recipe_hash == r.teacher_hash("clean") and pinned.hash == r.hash
    assert check_recipe_tree(pinned) == []
    # the teacher is edited: the pinned recipe keeps its hash (no file read), a fresh load differs,
    # and the pinned teacher no longer validates
    teacher_tree(tmp_path / "teachers", epochs=9)
    assert load_recipe(pinned_path).hash == r.hash
    assert load_recipe(student(tmp_path / "s.yaml", str(teacher))).hash != r.hash
    probs = check_recipe_tree(load_recipe(pinned_path))
    assert len(probs) == 1 and "changed" in probs[0] and "remove the pin" in probs[0]
    teacher.unlink()
    assert load_recipe(pinned_path).hash == r.hash  # a finished run's recipe hashes without its teachers


def test_teacher_pin_is_checked(tmp_path):
    assert any("not a sha256" in p for p in problems_of(
        deep_merge(DISTILL, {"teachers": {"clean": {"checkpoint": None, "recipe": "/t.yaml", "recipe_hash": "abc"}}})))
    assert any("a checkpoint teacher has none" in p for p in problems_of(
        deep_merge(DISTILL, {"teachers": {"clean": {"recipe_hash": "0" * 64}}})))


def test_hash_needs_a_readable_teacher_recipe_but_show_and_to_dict_do_not(tmp_path):
    r = load_recipe(student(tmp_path / "s.yaml", "missing_teacher.yaml"))
    with pytest.raises(RecipeError, match="teachers.clean.recipe: recipe not found"):
        r.hash  # noqa: B018 -- never a hash that silently leaves the teacher out
    assert r.to_dict()["teachers"]["clean"]["recipe_hash"] is None  # shown without one
    assert "recipe not found" in check_recipe_tree(r)[0]


def test_checkpoint_teachers_hash_by_resolved_path_without_reading_the_file(tmp_path):
    """Checkpoint teachers: the path after resolution (files are never read to hash a recipe; the
    weights' sha256 is recorded by the run, in teachers.json and ``ciard run``'s stage inputs)."""
    base = deep_merge(DISTILL, {"teachers": {"clean": {"checkpoint": str(tmp_path / "none" / "clean.safetensors")}}})
    r = recipe_from_dict(base)
    assert not (tmp_path / "none").exists() and len(r.hash) == 64  # no file needed
    relative = {"teachers": {"clean": {"checkpoint": "../none/clean.safetensors"}}}
    write(tmp_path / "a" / "r.yaml", deep_merge(base, relative))
    assert load_recipe(tmp_path / "a" / "r.yaml").hash == r.hash  # another spelling, the same file
    other = recipe_from_dict(deep_merge(base, {"teachers": {"clean": {"checkpoint": "/elsewhere/clean.safetensors"}}}))
    assert other.hash != r.hash


# --------------------------------------------------------------------------- where recipes are found
def test_ciard_recipes_env_comes_first(tmp_path, monkeypatch):
    teacher_tree(tmp_path / "mine" / "teachers")
    monkeypatch.setenv("CIARD_RECIPES", str(tmp_path / "mine"))
    assert recipes_dir() == tmp_path / "mine"
    assert list(list_recipes()) == ["teachers/clean"]  # _base.yaml is a base, not a recipe
    assert find_recipe("clean") == tmp_path / "mine" / "teachers" / "clean.yaml"
    monkeypatch.setenv("CIARD_RECIPES", str(tmp_path / "nowhere"))
    with pytest.raises(RecipeError, match="CIARD_RECIPES=.*not a folder"):
        list_recipes()
    monkeypatch.delenv("CIARD_RECIPES")
    assert recipes_dir() == REPO / "recipes"  # the source checkout (this test runs from one)


def test_pyproject_packages_ship_every_module_and_recipe_folder():
    """pyproject.toml lists the packages by hand (to map recipes/ into ciard_deploy/recipes/): each
    subpackage and each recipe folder must be in that list, or a wheel leaves it out."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    from setuptools import find_namespace_packages

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"] == {"ciard_deploy.recipes": "recipes"}
    code = {p for p in find_namespace_packages(str(REPO), include=["ciard_deploy*"]) if "__pycache__" not in p}
    folders = {p.relative_to(REPO / "recipes").as_posix().replace("/", ".") for p in (REPO / "recipes").rglob("*")
               if p.is_dir() and any(p.glob("*.yaml"))}
    recipes = {"ciard_deploy.recipes"} | {f"ciard_deploy.recipes.{f}" for f in folders}
    assert set(cfg["packages"]) == code | recipes
    assert all(f.count(".") == 0 for f in folders), "package-data globs reach one folder level: */*.yaml"
