"""`ciard eval` on two digits models trained for real: it must rank robustness correctly.

An undefended tiny_cnn and a PGD-trained one (the shipped quick recipes, fewer epochs) are
each trained for a few seconds; `ciard eval` must put the PGD-trained one far ahead under
pgd20 and the undefended one at least level on clean images.
"""

import json

import pytest
from typer.testing import CliRunner

from ciard_deploy.cli import app
from ciard_deploy.config import find_recipe
from ciard_deploy.distill.trainer import run as train

pytestmark = pytest.mark.integration
EPS = "0.15"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_digits")
    train(find_recipe("quick/digits_natural_none_to_tiny_cnn"), out / "natural", handle_signals=False)
    train(find_recipe("quick/digits_pgd_at_none_to_tiny_cnn_linf0.15"), out / "pgd_at", handle_signals=False,
          overrides=["train.epochs=10"])
    return out


def _eval(run_dir, json_path):
    res = CliRunner().invoke(app, ["-q", "eval", str(run_dir), "--attacks", "fgsm,pgd20", "--eps", EPS,
                                   "--n", "360", "--json", str(json_path)])
    assert res.exit_code == 0, res.output
    rep = json.loads(json_path.read_text())
    return rep["clean_acc"], {a["name"]: a["robust_acc"] for a in rep["attacks"]}, rep


def test_eval_ranks_the_pgd_trained_model_above_the_undefended_one(runs, tmp_path):
    clean_nat, rob_nat, rep_nat = _eval(runs / "natural", tmp_path / "nat.json")
    clean_pgd, rob_pgd, rep_pgd = _eval(runs / "pgd_at", tmp_path / "pgd.json")
    # the whole digits test split, seeded: labels name attack and budget
    assert rep_pgd["n"] == 360 and [a["label"] for a in rep_pgd["attacks"]] == ["fgsm@0.15", "pgd20@0.15"]
    assert clean_nat >= 0.95 and clean_pgd >= 0.90
    assert rob_pgd["pgd20"] >= rob_nat["pgd20"] + 0.4, (rob_pgd, rob_nat)
    assert clean_nat >= clean_pgd, (clean_nat, clean_pgd)
    # the worst case is never above any single attack
    for rep in (rep_nat, rep_pgd):
        assert rep["worst_case_acc"] <= min(a["robust_acc"] for a in rep["attacks"]) <= rep["clean_acc"]


def test_eval_state_runs_only_new_attacks_and_refuses_another_evaluation(runs, tmp_path):
    """`--state`: a second call with one more attack reuses the two finished ones (stderr says so, their
    recorded seconds and flags are untouched) and runs only the new one; another eps, seed or model is
    exit 2 naming the difference, with the file left byte-identical."""
    state = tmp_path / "eval.state.json"

    def run(model, attacks, *extra):
        return CliRunner().invoke(app, ["eval", str(runs / model), "--attacks", attacks, "--eps", EPS,
                                        "--n", "120", "--state", str(state), *extra])

    res = run("pgd_at", "fgsm,pgd10", "--json", str(tmp_path / "first.json"))
    assert res.exit_code == 0, res.output
    assert "reusing" not in res.stderr
    first_state = json.loads(state.read_text())
    first = json.loads((tmp_path / "first.json").read_text())
    assert [a["origin"] for a in first["attacks"]] == ["ran", "ran"]

    res = run("pgd_at", "fgsm,pgd10,cw10", "--json", str(tmp_path / "second.json"))
    assert res.exit_code == 0, res.output
    err = res.stderr.replace("\n", " ")
    assert f"state: reusing fgsm@0.15 from {state}" in err and f"state: reusing pgd10@0.15 from {state}" in err
    assert "reusing cw10" not in err and "eval cw10@0.15" in err  # cw10 alone shows progress: it alone ran
    assert "eval pgd10@0.15" not in err and "eval clean" not in err
    second_state = json.loads(state.read_text())
    assert second_state["clean_correct"] == first_state["clean_correct"]
    assert second_state["attacks"][:2] == first_state["attacks"]  # seconds, flags, settings: byte for byte
    assert [a["label"] for a in second_state["attacks"]] == ["fgsm@0.15", "pgd10@0.15", "cw10@0.15"]
    second = json.loads((tmp_path / "second.json").read_text())
    assert [(a["label"], a["origin"]) for a in second["attacks"]] == [
        ("fgsm@0.15", "reused"), ("pgd10@0.15", "reused"), ("cw10@0.15", "ran")]
    for old, new in zip(first["attacks"], second["attacks"]):
        assert (new["robust_acc"], new["seconds"]) == (old["robust_acc"], old["seconds"])
    assert second["clean_acc"] == first["clean_acc"] and second["worst_case_acc"] <= first["worst_case_acc"]
    assert second["worst_case_label"] == "worst(fgsm+pgd10+cw10)@0.15"

    before = state.read_bytes()
    for extra, model, needles in [
        (["--eps", "0.1"], "pgd_at", ["eps 0.15 (file) vs 0.1 (now)"]),
        (["--seed", "1"], "pgd_at", ["seed 0 (file) vs 1 (now)", "sample indices"]),
        ([], "natural", ["model sha256"]),
    ]:
        res = CliRunner().invoke(app, ["-q", "eval", str(runs / model), "--attacks", "fgsm", "--n", "120",
                                       "--state", str(state), *(extra if "--eps" in extra else ["--eps", EPS, *extra])])
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        msg = " ".join(lines)
        assert msg.startswith("error: state file") and "holds a different evaluation" in msg and "--fresh" in msg
        for needle in needles:
            assert needle in msg, msg
        assert state.read_bytes() == before


def test_eval_measures_at_the_training_eps_by_default(digits_robust_run, tmp_path):
    """The session's robust small_cnn was trained at eps 0.15: with no --eps, eval attacks at 0.15 (not 8/255)
    and says where the budget came from; --eps 8/255 is allowed, and the table and JSON say it differs."""
    res = CliRunner().invoke(app, ["eval", str(digits_robust_run), "--attacks", "pgd20", "--n", "60",
                                   "--json", str(tmp_path / "default.json")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "default.json").read_text())
    assert [a["label"] for a in rep["attacks"]] == ["pgd20@0.15"] and rep["eps"] == 0.15
    assert rep["eps_source"] == "metadata" and rep["eps_warning"] is None
    assert "pgd20@0.15" in res.stdout and "eps 0.15: the training eps recorded in the checkpoint" in res.stdout
    res = CliRunner().invoke(app, ["eval", str(digits_robust_run), "--attacks", "pgd20", "--n", "60", "--eps", "8/255",
                                   "--json", str(tmp_path / "other.json")])
    assert res.exit_code == 0, res.output
    other = json.loads((tmp_path / "other.json").read_text())
    warning = "eps 8/255 differs from the training eps 0.15 recorded in the checkpoint"
    assert other["attacks"][0]["label"] == "pgd20@8/255" and other["eps_warning"] == warning
    assert warning in res.stdout
    # the smaller budget flatters the model: exactly what a silent 8/255 default used to print
    assert other["attacks"][0]["robust_acc"] > rep["attacks"][0]["robust_acc"]
