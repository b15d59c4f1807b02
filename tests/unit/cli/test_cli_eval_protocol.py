"""`ciard eval --protocol ciard`: the CIARD paper's table as one preset, on tiny digits models (CPU, seconds).

The target is a tiny_cnn trained on digits (``train_on_digits``); the black-box columns are crafted on
another model. AutoAttack standard runs in the CLI test on 8 images at eps 0.3, where its first attack
(APGD-CE) breaks every image, so the others have nothing left to do (the wiring, not its strength: at the
training eps 0.1 it takes ~13 s here)."""

from __future__ import annotations

import json

import pytest
import torch

from ciard_deploy.attacks import create_attack, run_cascade
from ciard_deploy.attacks.protocols import CIARD, build_attacks, protocol_table
from ciard_deploy.checkpoints import CheckpointMeta, save_checkpoint
from ciard_deploy.data import get_dataset_info
from ciard_deploy.data.digits import load_digits_split
from ciard_deploy.fingerprint import sha256_file
from ciard_deploy.models import create_model

pytestmark = pytest.mark.unit

COLUMNS = ["Clean", "FGSM", "PGD-SAT", "PGD-TRADES", "CW-inf", "AA", "BB-PGD", "BB-CW", "Square"]
LABELS = ["clean", "fgsm@0.3", "pgd20@0.3", "pgdt20@0.3", "cw30@0.3", "aa@0.3", "transfer-pgdt20@0.3",
          "transfer-cw30@0.3", "square100@0.3"]


@pytest.fixture(scope="module")
def target(train_on_digits, tmp_path_factory):
    """A trained tiny_cnn (about 95 % clean on digits) saved as a ciard checkpoint with eps 0.1."""
    model = train_on_digits("tiny_cnn", 3e-3)
    info = get_dataset_info("digits")
    d = tmp_path_factory.mktemp("proto")
    save_checkpoint(d / "target", model, CheckpointMeta("tiny_cnn", 10, info.input_shape, info.mean, info.std,
                                                        "digits", info.classes, eps=0.1))
    return model, d / "target.safetensors"


@pytest.fixture(scope="module")
def plain_source(tmp_path_factory):
    """An untrained tiny_cnn as a plain state dict (no card): loaded with --transfer-arch."""
    torch.manual_seed(5)
    p = tmp_path_factory.mktemp("src") / "source.pt"
    torch.save(create_model("tiny_cnn", 10, 1).state_dict(), p)
    return p


def test_cli_prints_the_papers_columns_and_writes_them_to_json(target, plain_source, tmp_path, invoke):
    out = tmp_path / "r.json"
    res = invoke("eval", target[1], "--protocol", "ciard", "--n", 8, "--transfer-from", plain_source,
                 "--transfer-arch", "tiny_cnn", "--eps", "0.3", "--threads", 1, "--json", out)
    assert res.exit_code == 0, res.output
    head = next(ln for ln in res.stdout.splitlines() if "Clean" in ln)
    assert [c for c in COLUMNS if c in head] == COLUMNS  # every paper column name, uncut, in order
    rep = json.loads(out.read_text())
    cols = rep["protocol"]["columns"]
    assert [c["column"] for c in cols] == COLUMNS and [c["label"] for c in cols] == LABELS
    assert rep["protocol"]["transfer_from"] == {"path": str(plain_source.resolve()), "arch": "tiny_cnn",
                                                "sha256": sha256_file(plain_source), "dataset": "digits"}
    acc = {c["column"]: c["accuracy"] for c in cols}
    assert acc["Clean"] == rep["clean_acc"] >= 7 / 8
    assert all(0 <= a <= acc["Clean"] for a in acc.values())
    assert acc["AA"] <= min(acc["PGD-SAT"], acc["CW-inf"])  # AutoAttack is the strongest white-box column
    assert acc["BB-PGD"] >= acc["PGD-TRADES"]  # crafted on an untrained model: weaker than white-box
    assert rep["robust_acc"]["transfer-cw30@0.3"] == acc["BB-CW"] and rep["eps"] == 0.3


def test_attacks_have_the_papers_settings_and_self_transfer_equals_white_box(target):
    model, path = target
    atks = build_attacks(CIARD, 0.1, model, {"path": str(path)})
    d = {a.label: a.describe() for a in atks}
    steps = {k: (v["budget"]["steps"], v["budget"]["step_size"]) for k, v in d.items() if k != "aa@0.1"}
    assert steps == ({"fgsm@0.1": (1, 0.1), "pgd20@0.1": (20, 2 / 255), "pgdt20@0.1": (20, 0.003),
                                   "cw30@0.1": (30, 2 / 255), "transfer-pgdt20@0.1": (20, 0.003),
                                   "transfer-cw30@0.1": (30, 0.003), "square100@0.1": (100, None)})
    assert d["transfer-cw30@0.1"]["options"]["attack"]["label"] == "cw30@0.1"
    assert d["pgd20@0.1"]["options"]["seed"] == 0 and d["pgd20@0.1"]["options"]["random_start"]
    assert d["transfer-pgdt20@0.1"]["options"]["crafted_on"] == {"path": str(path)}
    assert d["aa@0.1"]["options"]["version"] == "standard"
    x, y = load_digits_split("test").tensors()
    x, y = x[:48], y[:48]
    keep = [a for a in atks if a.name != "aa"]  # AutoAttack is exercised by the CLI test
    res = run_cascade(model, x, y, keep, batch_size=64)
    r = res.to_dict()["robust_acc"]
    assert r["transfer-pgdt20@0.1"] == r["pgdt20@0.1"]  # crafted on the model itself: the same images
    cw = run_cascade(model, x, y, [create_attack("cw30", 0.1, step_size=0.003)], batch_size=64)
    assert r["transfer-cw30@0.1"] == cw.attacks[0].robust_acc
    table = protocol_table(CIARD, atks, res.clean_acc, {**r, "aa@0.1": 0.25})
    assert [(row["column"], row["label"]) for row in table][5:7] == [("AA", "aa@0.1"), ("BB-PGD", "transfer-pgdt20@0.1")]
    assert table[5]["accuracy"] == 0.25 and table[6]["accuracy"] == r["transfer-pgdt20@0.1"]


@pytest.mark.parametrize("args, needles", [
    (["--protocol", "ciard"], ["--transfer-from", "BB-PGD, BB-CW"]),
    (["--protocol", "ciard", "-a", "pgd20"], ["--protocol ciard names its own attacks"]),
    (["--transfer-from", "x.pt"], ["--transfer-from", "give --protocol"]),
    (["--protocol", "ciardd"], ["unknown protocol 'ciardd'", "Did you mean 'ciard'"]),
    (["--protocol", "ciard", "--transfer-from", "PLAIN"], ["--transfer-from", "arch"]),
])
def test_bad_protocol_options_are_one_line_errors(args, needles, ckpt, plain_source, invoke, assert_one_line_error):
    args = [plain_source if a == "PLAIN" else a for a in args]
    assert_one_line_error(invoke("eval", ckpt, "--n", 8, *args), 2, *needles)
