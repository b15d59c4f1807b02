"""`ciard eval --state`: the options' bad inputs (one line, exit 2, the file untouched) and Ctrl-C in a
later attack keeping the earlier one, on an untrained digits checkpoint (fast).

Ctrl-C is raised by a stand-in attack registered for these tests only (the registry is patched
back afterwards); the attacks before it are the real ones."""

import dataclasses
import json

import pytest

from ciard_deploy.attacks import ATTACKS, AttackEntry, Budget
from ciard_deploy.attacks.base import Attack

pytestmark = pytest.mark.unit


class CtrlC(Attack):
    """Stands in for the user pressing Ctrl-C while this attack runs."""

    def __init__(self, eps: float) -> None:
        self.name, self.budget = "ctrlc", Budget("Linf", float(eps), 1, None)

    def run(self, model, x, y):
        raise KeyboardInterrupt


@dataclasses.dataclass(frozen=True)
class _CtrlCEntry(AttackEntry):
    def load(self):
        return CtrlC


@pytest.fixture
def ctrlc_attack(monkeypatch):
    monkeypatch.setitem(ATTACKS._items, "ctrlc", _CtrlCEntry("ctrlc", "ctrlc", "tests:CtrlC"))


def test_fresh_needs_state_and_state_is_not_the_json_file(ckpt, tmp_path, invoke, assert_one_line_error):
    assert_one_line_error(invoke("eval", ckpt, "-a", "fgsm", "--n", 20, "--fresh"), 2, "--fresh", "--state")
    same = tmp_path / "out.json"
    assert_one_line_error(invoke("eval", ckpt, "-a", "fgsm", "--n", 20, "--state", same, "--json", same),
                          2, "--state and --json name the same file")
    assert not same.exists()


@pytest.mark.parametrize("fresh", [[], ["--fresh"]])
def test_a_file_that_is_no_state_is_never_overwritten(ckpt, tmp_path, fresh, invoke, assert_one_line_error):
    meta = ckpt.with_suffix(".json")  # the checkpoint's own metadata, given by mistake
    before = meta.read_bytes()
    res = invoke("eval", ckpt, "-a", "fgsm", "--n", 20, "--eps", "0.1", "--state", meta, *fresh)
    assert_one_line_error(res, 2, "is the same file as the card of CHECKPOINT")  # refused before it is read
    assert meta.read_bytes() == before


def test_ctrl_c_in_a_later_attack_keeps_the_earlier_one(ckpt, tmp_path, ctrlc_attack, invoke):
    state = tmp_path / "eval.state.json"
    res = invoke("-q", "eval", ckpt, "-a", "fgsm,ctrlc", "--n", 40, "--eps", "0.1", "--state", state)
    assert res.exit_code == 130, res.output
    assert "interrupted" in res.stderr and f"finished work is in {state}" in res.stderr.replace("\n", " ")
    saved = json.loads(state.read_text())
    assert [(a["label"], a["done"] == a["total"]) for a in saved["attacks"]] == [("fgsm@0.1", True)]

    res = invoke("eval", ckpt, "-a", "fgsm,pgd5", "--n", 40, "--eps", "0.1", "--state", state,
                 "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    assert f"state: reusing fgsm@0.1 from {state}" in res.stderr.replace("\n", " ")
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["state"] == str(state)
    assert [(a["label"], a["origin"]) for a in rep["attacks"]] == [("fgsm@0.1", "reused"), ("pgd5@0.1", "ran")]
    assert "(reused)" in res.stdout  # the table says so too

    res = invoke("-q", "eval", ckpt, "-a", "fgsm", "--n", 40, "--eps", "0.1", "--state", state, "--fresh")
    assert res.exit_code == 0 and "reusing" not in res.stderr, res.output
    assert [a["label"] for a in json.loads(state.read_text())["attacks"]] == ["fgsm@0.1"]  # started over
