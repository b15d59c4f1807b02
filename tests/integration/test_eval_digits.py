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
