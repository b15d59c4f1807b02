"""`ciard eval` and `ciard pack` measure at the budget the model was trained for, and say so.

The untrained tiny_cnn checkpoint of conftest.py records eps 0.1: with no --eps both verbs use 0.1; an
--eps that differs is used and flagged in the table and the JSON; a checkpoint that records none
needs --eps (exit 2, one line). `pack` without --attacks picks what runs in reasonable time on the
device and names the choice on stderr.
"""

import json

import pytest
import torch
from typer.testing import CliRunner

from ciard_deploy.attacks.budget import choose_eps
from ciard_deploy.cli import app
from ciard_deploy.errors import UsageError
from ciard_deploy.models import create_model
from ciard_deploy.verify.pack_build import DEFAULT_ATTACKS, default_attacks

pytestmark = pytest.mark.unit
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_choose_eps():
    c = choose_eps(None, 0.15)
    assert (c.eps, c.explicit, c.differs, c.warning) == (0.15, False, False, None)
    assert c.note() == "eps 0.15: the training eps recorded in the checkpoint"
    c = choose_eps("8/255", 0.15)
    assert c.differs and c.warning == "eps 8/255 differs from the training eps 0.15 recorded in the checkpoint"
    assert c.to_dict() == {"eps": 8 / 255, "eps_label": "8/255", "eps_source": "--eps", "training_eps": 0.15,
                           "eps_warning": c.warning}
    assert not choose_eps("0.15", 0.15).differs and not choose_eps("8/255", None).differs
    with pytest.raises(UsageError, match="records no training eps: pass --eps"):
        choose_eps(None, None)


def test_eval_defaults_to_the_checkpoint_eps(ckpt, tmp_path):
    res = invoke("eval", ckpt, "--attacks", "fgsm", "--n", 20, "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["eps"] == 0.1 and rep["eps_source"] == "metadata" and rep["training_eps"] == 0.1
    assert rep["eps_warning"] is None and rep["attacks"][0]["label"] == "fgsm@0.1"
    assert "eps 0.1: the training eps recorded in the checkpoint" in res.stdout


def test_eval_flags_an_eps_other_than_the_training_one(ckpt, tmp_path):
    res = invoke("eval", ckpt, "--attacks", "fgsm", "--n", 20, "--eps", "8/255", "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    warning = "eps 8/255 differs from the training eps 0.1 recorded in the checkpoint"
    assert rep["eps_warning"] == warning and rep["eps_source"] == "--eps"
    assert rep["attacks"][0]["label"] == "fgsm@8/255"
    assert warning in res.stdout  # the line under the table


def test_a_checkpoint_without_an_eps_needs_one(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save(create_model("tiny_cnn", 10, 1).net.state_dict(), plain)
    res = invoke("eval", plain, "--arch", "tiny_cnn", "--dataset", "digits", "--attacks", "fgsm", "--n", 10)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the checkpoint records no training eps: pass --eps")
    res = invoke("-q", "eval", plain, "--arch", "tiny_cnn", "--dataset", "digits", "--attacks", "fgsm", "--n", 10,
                 "--eps", "0.1")
    assert res.exit_code == 0, res.output


def test_pack_defaults_to_the_checkpoint_eps_and_the_device_attacks(ckpt, tmp_path):
    assert default_attacks("cpu") == ["apgd-ce", "apgd-t"] and default_attacks("cuda") == ["apgd-ce", "apgd-t", "fab-t"]
    assert set(DEFAULT_ATTACKS) >= {"cpu", "cuda"}
    res = invoke("pack", ckpt, "--out", tmp_path / "p.npz", "--n", 10, "--device", "cpu", "--json",
                 tmp_path / "p.json")
    assert res.exit_code == 0, res.output
    chosen = [ln for ln in res.stderr.splitlines() if ln.startswith("pack: attacks")]
    assert chosen == ["pack: attacks apgd-ce,apgd-t (the default on cpu; choose others with --attacks)"]
    summary = json.loads((tmp_path / "p.json").read_text())
    assert summary["eps"] == 0.1 and summary["training_eps"] == 0.1 and summary["eps_warning"] is None
    assert [a["label"] for a in summary["attacks"]] == ["apgd-ce@0.1", "apgd-t@0.1"]
    assert "eps 0.1: the training eps recorded in the checkpoint" in res.stdout

    res = invoke("pack", ckpt, "--out", tmp_path / "q.npz", "--n", 10, "--attacks", "fgsm", "--eps", "8/255",
                 "--json", tmp_path / "q.json")
    assert res.exit_code == 0, res.output
    assert "pack: attacks" not in res.stderr  # named by the user: nothing to announce
    summary = json.loads((tmp_path / "q.json").read_text())
    warning = "eps 8/255 differs from the training eps 0.1 recorded in the checkpoint"
    assert summary["eps_warning"] == warning and summary["attacks"][0]["label"] == "fgsm@8/255"
    assert warning in res.stdout  # the line under the table
    assert warning in " ".join(res.stderr.split())  # and a log warning before the attacks run
