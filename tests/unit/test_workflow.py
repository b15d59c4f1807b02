"""The workflow's decisions without training: the deploy section, the skip/resume/rejudge plan, the
state file and the output-folder rules (``ciard_deploy.workflow``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ciard_deploy.cli import app
from ciard_deploy.config import DeployConfig, deep_merge, load_recipe, recipe_from_dict
from ciard_deploy.errors import RecipeError, UsageError
from ciard_deploy.fingerprint import canonical_json_hash, sha256_file
from ciard_deploy.options.gates import SPECS
from ciard_deploy.verify.gates import gates_from_mapping
from ciard_deploy.workflow import (STAGES, STATE_FORMAT, STATE_NAME, Layout, QUICKSTART_RECIPE,
                                   changed_keys, check_out_dir, load_deploy_recipe, load_state, outputs_problem, plan,
                                   quickstart_recipe, stage_inputs)

pytestmark = pytest.mark.unit
runner = CliRunner()

DISTILL = {
    "kind": "distill",
    "student": {"arch": "tiny_cnn"},
    "teachers": {"clean": {"checkpoint": "/x/clean.safetensors"},
                 "robust": {"checkpoint": "/x/robust.pt", "arch": "small_cnn_wide"}},
    "method": {"name": "ciard"},
    "attack": {"eps": 0.15},
    "train": {"epochs": 2},
}
DEPLOY = {"deploy": {"formats": ["onnx", "onnx-int8"], "pack": {"attacks": ["pgd20", "fgsm"], "n": 100},
                     "gates": {"min_clean": 0.9, "min_robust": "40%"}}}


def problems(patch: dict) -> list[str]:
    with pytest.raises(RecipeError) as ei:
        recipe_from_dict(deep_merge(DISTILL, patch))
    return getattr(ei.value, "problems", [str(ei.value)])


# --------------------------------------------------------------------------- the deploy section
def test_deploy_section_defaults_parse_and_round_trip(tmp_path):
    r = recipe_from_dict(deep_merge(DISTILL, DEPLOY))
    d = r.deploy
    assert isinstance(d, DeployConfig)
    assert d.formats == ["onnx", "onnx-int8"] and d.calib == "clean" and d.live_attacks == ["square1000"]
    assert d.pack.eps is None and d.pack.n == 100
    assert d.gates_mapping() == {"min_clean": 0.9, "min_robust": 0.4}  # "40%" read as verify reads it
    assert gates_from_mapping({"gates": d.gates_mapping()}).min_robust == 0.4
    # the gates section has exactly verify's gates
    assert set(type(d.gates).model_fields) == set(SPECS)
    # written back and loaded again: the same recipe
    p = tmp_path / "r.yaml"
    p.write_text(r.to_yaml())
    again = load_recipe(p)
    assert again.deploy == d and again.hash == r.hash


def test_deploy_is_not_part_of_the_training_hash():
    plain = recipe_from_dict(DISTILL)
    with_deploy = recipe_from_dict(deep_merge(DISTILL, DEPLOY))
    stricter = recipe_from_dict(deep_merge(DISTILL, DEPLOY), ["deploy.gates.min_clean=0.99"])
    assert plain.hash == with_deploy.hash == stricter.hash
    assert "deploy" not in plain.to_dict() and "deploy" in with_deploy.to_dict()
    assert recipe_from_dict(DISTILL, ["train.epochs=3"]).hash != plain.hash


@pytest.mark.parametrize("patch, needle", [
    ({"deploy": {"formats": ["onx"]}}, "deploy.formats: unknown export format 'onx'. Did you mean 'onnx'?"),
    ({"deploy": {"formats": []}}, "deploy.formats: give at least one format"),
    ({"deploy": {"calib": "noisy"}}, "deploy.calib"),
    ({"deploy": {"opset": 9}}, "deploy.opset: opset must lie in 13..23"),
    ({"deploy": {"square_queries": 1}}, "deploy.square_queries: Square needs at least 2 queries"),
    ({"deploy": {"live_attacks": ["pgd20"]}}, "deploy.live_attacks: pgd20 needs gradients, which a runtime does not "
                                              "give, so it cannot run live; white-box attacks belong in "
                                              "deploy.pack.attacks"),
    ({"deploy": {"live_attacks": ["sqaure100"]}}, "deploy.live_attacks: unknown attack 'sqaure100'. Did you mean "
                                                  "'square100'?"),
    ({"deploy": {"live_attacks": ["square1"]}}, "deploy.live_attacks: attack 'square1': queries must be >= 2"),
    ({"deploy": {"live_attacks": ["square50", "Square50"]}}, "deploy.live_attacks: square50 listed twice"),
    ({"deploy": {"live_attacks": "square50"}}, "deploy.live_attacks: give a list of query-only attacks"),
    ({"deploy": {"live_n": 0}}, "deploy.live_n: Input should be greater than 0"),
    ({"deploy": {"live_attack": ["square50"]}}, "deploy.live_attack: unknown key (did you mean 'live_attacks'?)"),
    ({"deploy": {"pack": {"attacks": ["pgd20", "foo"]}}}, "deploy.pack.attacks: unknown attack 'foo'"),
    ({"deploy": {"pack": {"attacks": []}}}, "deploy.pack.attacks: give at least one attack"),
    ({"deploy": {"pack": {"eps": "9"}}}, "deploy.pack.eps"),
    ({"deploy": {"pack": {"nn": 3}}}, "deploy.pack.nn: unknown key (did you mean 'n'?)"),
    ({"deploy": {"gates": {"min_clen": 0.9}}}, "deploy.gates.min_clen: unknown key (did you mean 'min_clean'?)"),
    ({"deploy": {"gates": {"min_robust": 45}}}, "deploy.gates.min_robust: 45 is outside [0, 1]: thresholds are "
                                                "fractions, not percents (did you mean 0.45?)"),
    ({"deploy": {"gates": {"max_clean_drop": -0.1}}}, "deploy.gates.max_clean_drop: -0.1 is negative"),
    ({"deploy": {"gates": {"min_agreement": "lots"}}}, "deploy.gates.min_agreement: must be a number in [0, 1]"),
])
def test_deploy_problems_name_the_key(patch, needle):
    text = "\n".join(problems(patch))
    assert needle in text, text


def test_deploy_live_attacks_and_the_old_square_keys(tmp_path):
    r = recipe_from_dict(deep_merge(DISTILL, {"deploy": {"live_attacks": ["Square50", "square80"], "live_n": 30}}))
    assert r.deploy.live_attacks == ["square50", "square80"] and r.deploy.live_n == 30
    assert recipe_from_dict(deep_merge(DISTILL, {"deploy": {"live_attacks": []}})).deploy.live_attacks == []
    # an old recipe's square_queries / square_n are read as the new keys (0: no live attack)
    old = recipe_from_dict(deep_merge(DISTILL, {"deploy": {"square_queries": 300, "square_n": 100}}))
    assert old.deploy.live_attacks == ["square300"] and old.deploy.live_n == 100
    assert recipe_from_dict(deep_merge(DISTILL, {"deploy": {"square_queries": 0}})).deploy.live_attacks == []
    # the old key given over a recipe with the new one (an old `--set`) wins: it was given last
    new = deep_merge(DISTILL, {"deploy": {"live_attacks": ["square1000"], "live_n": 200}})
    over = recipe_from_dict(new, ["deploy.square_queries=0", "deploy.square_n=50"])
    assert over.deploy.live_attacks == [] and over.deploy.live_n == 50
    # written back, the recipe has only the new keys and reads the same
    p = tmp_path / "r.yaml"
    p.write_text(old.to_yaml())
    text = p.read_text()
    assert "live_attacks:\n  - square300" in text and "square_queries" not in text and "square_n" not in text
    assert load_recipe(p).deploy == old.deploy
    # the verify stage's inputs name the live attacks
    layout = Layout(tmp_path)
    (tmp_path / "pack.npz").write_bytes(b"pack")
    settings = stage_inputs("verify", old, layout, state={})["settings"]
    assert settings == {"live_attacks": ["square300"], "live_n": 100, "seed": 0, "provider": "cpu"}


def test_every_deploy_problem_at_once():
    probs = problems({"deploy": {"formats": ["onx"], "gates": {"min_clean": 2, "min_clen": 1}, "calib_n": 0}})
    assert len(probs) == 4, probs


def test_a_recipe_without_deploy_is_refused_with_the_fix():
    with pytest.raises(RecipeError, match="has no deploy: section, which `ciard run` needs"):
        load_deploy_recipe(recipe_from_dict(DISTILL))


def test_the_quickstart_recipe_is_shipped_with_gates():
    r = load_recipe(quickstart_recipe())
    assert QUICKSTART_RECIPE in quickstart_recipe().as_posix()
    assert r.method.name == "ciard" and r.data.dataset == "digits"
    assert set(r.deploy.formats) == {"onnx", "onnx-int8"}
    g = r.deploy.gates_mapping()
    assert set(g) == set(SPECS) and g["min_robust"] >= 0.3  # a robustness gate an undefended model cannot pass


# --------------------------------------------------------------------------- the plan
def _done(tmp_path: Path, inputs: dict, files: dict[str, bytes]) -> dict:
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    return {"status": "done", "inputs": inputs, "inputs_hash": canonical_json_hash(inputs),
            "outputs": {rel: sha256_file(tmp_path / rel) for rel in files}}


def test_plan_skips_only_what_is_done_unchanged_and_intact(tmp_path):
    inputs = {"checkpoint": {"run/a.safetensors": "abc"}, "options": {"formats": ["onnx"]}}
    rec = _done(tmp_path, inputs, {"export/model.onnx": b"onnx", "export/manifest.json": b"{}"})
    assert plan("export", rec, inputs, tmp_path) == ("skip", "up to date")
    assert plan("export", None, inputs, tmp_path) == ("run", "first run")
    assert plan("export", {"status": "pending"}, inputs, tmp_path)[0] == "run"
    assert plan("export", rec, inputs, tmp_path, forced=True, from_stage="export") == ("run", "forced (--from export)")
    changed = {**inputs, "options": {"formats": ["onnx", "onnx-int8"]}}
    assert plan("export", rec, changed, tmp_path) == ("run", "inputs changed: options.formats")
    (tmp_path / "export/model.onnx").write_bytes(b"tampered")
    assert plan("export", rec, inputs, tmp_path) == ("run", "export/model.onnx changed since it was written")
    (tmp_path / "export/model.onnx").unlink()
    assert plan("export", rec, inputs, tmp_path) == ("run", "export/model.onnx is missing")
    assert plan("export", {**rec, "status": "failed"}, inputs, tmp_path) == ("run", "failed earlier")


def test_plan_rejudges_verify_when_only_the_gates_changed(tmp_path):
    inputs = {"artifacts": {"export/model.onnx": "h1"}, "pack": {"pack.npz": "h2"},
              "settings": {"square_queries": 300}, "gates": {"min_clean": 0.9}}
    rec = _done(tmp_path, inputs, {"verify/onnx.json": b"{}"})
    action, reason = plan("verify", rec, {**inputs, "gates": {"min_clean": 0.9999}}, tmp_path)
    assert action == "rejudge" and "min_clean" in reason
    # a new gate is a gate change too; anything else is measured again
    assert plan("verify", rec, {**inputs, "gates": {"min_clean": 0.9, "min_robust": 0.4}}, tmp_path)[0] == "rejudge"
    assert plan("verify", rec, {**inputs, "settings": {"square_queries": 100}}, tmp_path)[0] == "run"
    assert plan("verify", rec, {**inputs, "gates": {}, "pack": {"pack.npz": "h3"}}, tmp_path)[0] == "run"
    # reports gone: nothing to re-judge
    (tmp_path / "verify/onnx.json").unlink()
    assert plan("verify", rec, {**inputs, "gates": {"min_clean": 0.5}}, tmp_path)[0] == "run"
    # only verify re-judges
    rec2 = _done(tmp_path, {"gates": {"a": 1}}, {"x.json": b"{}"})
    assert plan("pack", rec2, {"gates": {"a": 2}}, tmp_path)[0] == "run"


def test_plan_rejudges_verify_when_only_the_warning_policy_changed(tmp_path):
    inputs = {"artifacts": {"export/model.onnx": "h1"}, "pack": {"pack.npz": "h2"}, "gates": {"min_clean": 0.9},
              "policy": {"allow_mismatch": False, "strict": False}}
    rec = _done(tmp_path, inputs, {"verify/onnx.json": b"{}"})
    action, reason = plan("verify", rec, {**inputs, "policy": {"allow_mismatch": True, "strict": False}}, tmp_path)
    assert action == "rejudge" and "allow_mismatch" in reason
    both = {**inputs, "gates": {}, "policy": {"allow_mismatch": False, "strict": True}}
    assert plan("verify", rec, both, tmp_path)[0] == "rejudge"
    # a workflow dir from before the policy existed: re-judged under today's default, not measured again
    old = {k: v for k, v in inputs.items() if k != "policy"}
    assert plan("verify", _done(tmp_path, old, {"verify/onnx.json": b"{}"}), inputs, tmp_path)[0] == "rejudge"


def test_deploy_policy_defaults_and_inputs(tmp_path):
    r = recipe_from_dict(deep_merge(DISTILL, DEPLOY))
    assert (r.deploy.allow_mismatch, r.deploy.strict) == (False, False)
    assert r.deploy.policy_mapping() == {"allow_mismatch": False, "strict": False}
    strict = recipe_from_dict(deep_merge(DISTILL, DEPLOY), ["deploy.strict=true", "deploy.allow_mismatch=true"])
    assert strict.deploy.policy_mapping() == {"allow_mismatch": True, "strict": True} and strict.hash == r.hash
    state = {"stages": {"export": {"outputs": {"export/model.onnx": "h1"}}}}
    inputs = stage_inputs("verify", strict, Layout(tmp_path), state=state)
    assert inputs["policy"] == {"allow_mismatch": True, "strict": True}
    assert "allow_mismatch" in problems({"deploy": {"allow_mismach": True}})[0]


def test_plan_resumes_an_interrupted_distill_with_the_same_inputs(tmp_path):
    inputs = {"recipe_hash": "r1", "teachers": {}}
    rec = {"status": "interrupted", "inputs": inputs, "inputs_hash": canonical_json_hash(inputs)}
    assert plan("distill", rec, inputs, tmp_path) == ("run", "interrupted earlier")  # no training state saved
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_state.pt").write_bytes(b"state")
    assert plan("distill", rec, inputs, tmp_path)[0] == "resume"
    assert plan("distill", {**rec, "status": "running"}, inputs, tmp_path)[0] == "resume"  # killed hard
    assert plan("distill", rec, {"recipe_hash": "r2", "teachers": {}}, tmp_path)[0] == "run"  # another recipe
    assert plan("distill", rec, inputs, tmp_path, forced=True, from_stage="distill")[0] == "run"
    assert plan("export", {**rec, "inputs": {}}, {}, tmp_path)[0] == "run"  # only training resumes


def test_changed_keys_and_outputs_problem(tmp_path):
    assert changed_keys({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 4}) == ["a.c", "d"]
    assert changed_keys(None, {"a": 1}) == ["a"]
    assert outputs_problem(tmp_path, {}) == "no outputs recorded"
    assert canonical_json_hash({"b": 1, "a": [1, 2]}) == canonical_json_hash({"a": [1, 2], "b": 1})


def test_verify_inputs_hold_the_artifacts_pack_and_gates(tmp_path):
    r = recipe_from_dict(deep_merge(DISTILL, DEPLOY))
    layout = Layout(tmp_path)
    (tmp_path / "pack.npz").write_bytes(b"pack")
    state = {"stages": {"export": {"outputs": {"export/model.onnx": "h1", "export/manifest.json": "h2"}}}}
    inputs = stage_inputs("verify", r, layout, state=state)
    assert inputs["artifacts"] == {"export/model.onnx": "h1"}
    assert inputs["pack"] == {"pack.npz": sha256_file(tmp_path / "pack.npz")}
    assert inputs["gates"] == {"min_clean": 0.9, "min_robust": 0.4}
    assert stage_inputs("distill", r, layout, teachers={"clean": {"sha256": "t"}}) == \
        {"recipe_hash": r.hash, "teachers": {"clean": {"sha256": "t"}}}


# --------------------------------------------------------------------------- the output folder
def _state(tmp_path: Path, entry: str = "run") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / STATE_NAME).write_text(json.dumps({"format": STATE_FORMAT, "entry": entry,
                                                   "stages": {s: {"status": "pending"} for s in STAGES}}))
    return tmp_path


def test_out_dir_rules(tmp_path):
    assert check_out_dir(tmp_path / "new") is None
    (tmp_path / "empty").mkdir()
    assert check_out_dir(tmp_path / "empty") is None
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="exists and is not a ciard workflow dir"):
        check_out_dir(theirs)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        check_out_dir(tmp_path / "file")
    ours = _state(tmp_path / "ours")
    assert check_out_dir(ours)["entry"] == "run"
    with pytest.raises(UsageError, match="not a quickstart one"):
        check_out_dir(ours, entry="quickstart")
    assert check_out_dir(_state(tmp_path / "qs", "quickstart"), entry="quickstart")["entry"] == "quickstart"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / STATE_NAME).write_text("{not json")
    with pytest.raises(UsageError, match="not a readable workflow state"):
        load_state(bad)
    (bad / STATE_NAME).write_text(json.dumps({"format": "other"}))
    with pytest.raises(UsageError, match="is not a ciard-workflow/1 file"):
        check_out_dir(bad)


# --------------------------------------------------------------------------- CLI wiring (no training)
def assert_one_line_error(res, code, *needles):
    assert res.exit_code == code, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs_exit_2_with_one_line_before_any_work(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("a user's file")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(deep_merge(DISTILL, DEPLOY)))
    no_deploy = tmp_path / "plain.yaml"
    no_deploy.write_text(yaml.safe_dump(DISTILL))
    cases = [
        (["run", recipe, "--out", tmp_path / "o1", "--from", "exprt"], "--from 'exprt' is not a stage (did you mean "
                                                                       "'export'?)"),
        (["run", no_deploy, "--out", tmp_path / "o2"], "has no deploy: section"),
        (["run", recipe, "--out", theirs], "is not a ciard workflow dir"),
        (["run", recipe, "--out", theirs / "keep.txt"], "is a file"),
        (["run", recipe, "--out", tmp_path / "o3", "--set", "deploy.gates.min_clean=95"], "deploy.gates.min_clean"),
        (["run", tmp_path / "nope.yaml", "--out", tmp_path / "o4"], "recipe not found"),
        (["run", recipe, "--out", tmp_path / "o5", "--threads", "0"], "--threads must be >= 1"),
        (["quickstart", "--out", theirs], "is not a ciard workflow dir"),
        (["quickstart", "--out", _state(tmp_path / "a_run_dir")], "not a quickstart one"),
    ]
    for args, needle in cases:
        res = runner.invoke(app, [str(a) for a in args])
        assert_one_line_error(res, 2, needle)
    assert [p.name for p in theirs.iterdir()] == ["keep.txt"]  # nothing written into someone else's folder
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_help_names_the_stages_and_exit_codes():
    res = runner.invoke(app, ["run", "--help"])
    assert res.exit_code == 0
    assert "distill -> export -> pack -> verify" in res.stdout and "Exit codes" in res.stdout
    res = runner.invoke(app, ["quickstart", "--help"])
    assert res.exit_code == 0 and "digits" in res.stdout
