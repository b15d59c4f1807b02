"""The partial-results folder behind a resumable ``build_pack``, torch-free: the linear model's numpy attacks stand
in for finished attacks (the real build, interrupted and resumed, is in tests/integration/test_verify_e2e.py).

What is saved loads back byte for byte; a folder made for another pack is refused and left as it is, or discarded
(the CLI's own); a damaged file is refused, or dropped and run again; other people's files are never touched.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace

import numpy as np
import pytest

from ciard_deploy.resume import StateMismatch
from ciard_deploy.errors import ArtifactError, UsageError
from ciard_deploy.verify.pack_partial import (PARTIAL_KIND, PackKey, PartialFolder, check_partial_dir, discard_partial, partial_dir, read_partial)

pytestmark = pytest.mark.unit


class FakeAttack:
    """What the partial folder needs of an ``Attack``: name, label, eps and ``describe()``."""

    def __init__(self, name: str, eps: float = 0.1, step: float = 0.025) -> None:
        self.name, self.eps, self.step = name, eps, step
        self.label = f"{name}@{eps:g}"

    def describe(self) -> dict:
        return {"name": self.name, "label": self.label, "budget": {"eps": self.eps, "step_size": self.step},
                "options": {"seed": 0}}


def make_key(**change) -> PackKey:
    key = PackKey(model_sha256="ab" * 32, arch="linear", dataset="digits", split="test", n=120, seed=0, eps=0.1,
                  indices_sha256=None, data_sha256="cd" * 32, batch_size=256, device="cpu", torch_version="2.x")
    return replace(key, **change)


@pytest.fixture
def arrays(linear, test_xy, h):
    x, y = test_xy
    lc = h.logits(linear, x)
    pgd = h.pgd(linear, x, y, h.eps)
    fgsm = h.fgsm(linear, x, y, h.eps)
    return {"x": x, "y": y, "lc": lc, "pgd": (pgd, h.logits(linear, pgd)), "fgsm": (fgsm, h.logits(linear, fgsm))}


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def open_partial(folder, attacks, key=None, on_mismatch="refuse", events=None):
    return PartialFolder(folder, key or make_key(), attacks, on_mismatch, (events.append if events is not None else None),
                    info={"model_source": "test"})


@pytest.fixture
def saved_pgd(tmp_path, arrays):
    """A partial folder holding one finished attack (pgd10), as a build leaves it when stopped during the next."""
    folder = tmp_path / "pack.npz.partial"
    pgd = FakeAttack("pgd10")
    part = open_partial(folder, [pgd, FakeAttack("fgsm")])
    assert part.clean(arrays["y"], 10) is None and not folder.exists()  # nothing saved, nothing made yet
    part.save(pgd, *arrays["pgd"], arrays["y"], arrays["lc"], seconds=1.5, device="cpu", batch_size=256)
    return folder


def test_partial_dir_sits_beside_the_pack(tmp_path):
    assert partial_dir(tmp_path / "deploy" / "pack.npz") == tmp_path / "deploy" / "pack.npz.partial"


def test_saved_attacks_load_back_byte_for_byte(saved_pgd, arrays):
    names = sorted(p.name for p in saved_pgd.iterdir())
    assert len(names) == 3 and re.fullmatch(r"attack-[0-9a-f]{16}\.npz", names[0]) and names[1:] == ["clean.npz",
                                                                                                    "state.json"]
    state = json.loads((saved_pgd / "state.json").read_text())
    assert state["kind"] == PARTIAL_KIND and state["key"]["n"] == 120 and state["key"]["device"] == "cpu"
    (rec,) = state["attacks"]
    assert rec["label"] == "pgd10@0.1" and rec["done"] == rec["total"] == 120 and rec["seconds"] == 1.5
    events = []
    part = open_partial(saved_pgd, [FakeAttack("pgd10"), FakeAttack("fgsm")], events=events)
    lc = part.clean(arrays["y"], 10)
    assert lc.tobytes() == arrays["lc"].tobytes()
    xa, la, rec = part.take(FakeAttack("pgd10"), arrays["x"], arrays["y"], lc)
    assert xa.tobytes() == arrays["pgd"][0].tobytes() and la.tobytes() == arrays["pgd"][1].tobytes()
    assert rec.seconds == 1.5 and part.take(FakeAttack("fgsm"), arrays["x"], arrays["y"], lc) is None
    assert [(e.kind, e.stage, e.done, e.seconds) for e in events] == [("reused", "pgd10@0.1", 120, 1.5)]
    assert [a.label for a in read_partial(saved_pgd).attacks] == ["pgd10@0.1"]


def test_another_pack_is_refused_and_left_as_it_is(saved_pgd):
    before = files(saved_pgd)
    with pytest.raises(StateMismatch, match=r"holds a different pack: seed 0 \(file\) vs 1 \(now\); device type "
                                            r"\"cpu\" \(file\) vs \"cuda\" \(now\); the folder was left as it is"):
        open_partial(saved_pgd, [FakeAttack("pgd10")], key=make_key(seed=1, device="cuda"))
    with pytest.raises(StateMismatch, match=r"pgd10@0\.1 budget\.step_size 0\.025 \(file\) vs 0\.05 \(now\)"):
        open_partial(saved_pgd, [FakeAttack("pgd10", step=0.05)])
    assert files(saved_pgd) == before


def test_another_pack_is_discarded_with_a_log_line_when_the_folder_is_the_callers_temp_data(saved_pgd, arrays,
                                                                                             caplog):
    with caplog.at_level(logging.INFO, logger="ciard_deploy.verify.pack_partial"):
        part = open_partial(saved_pgd, [FakeAttack("pgd10")], key=make_key(batch_size=64), on_mismatch="discard")
    assert "discarding the partial pack results" in caplog.text and "batch size 256 (file) vs 64 (now)" in caplog.text
    assert not saved_pgd.exists() and part.clean(arrays["y"], 10) is None
    assert part.take(FakeAttack("pgd10"), arrays["x"], arrays["y"], arrays["lc"]) is None


def test_a_damaged_attack_is_refused_or_run_again(saved_pgd, arrays):
    (npz,) = saved_pgd.glob("attack-*.npz")
    with np.load(npz) as z:
        edited = {k: z[k] for k in z.files}
    edited["logits_adv"] = edited["logits_adv"] + np.float32(1)  # stored checksum no longer matches
    with open(npz, "wb") as f:
        np.savez(f, **edited)
    before = files(saved_pgd)
    part = open_partial(saved_pgd, [FakeAttack("pgd10")])
    lc = part.clean(arrays["y"], 10)
    with pytest.raises(ArtifactError, match="fails its checksum; the folder was left as it is"):
        part.take(FakeAttack("pgd10"), arrays["x"], arrays["y"], lc)
    assert files(saved_pgd) == before
    events = []
    part = open_partial(saved_pgd, [FakeAttack("pgd10")], on_mismatch="discard", events=events)
    lc = part.clean(arrays["y"], 10)
    assert part.take(FakeAttack("pgd10"), arrays["x"], arrays["y"], lc) is None
    assert [(e.kind, e.stage) for e in events] == [("discarded", "pgd10@0.1")]


def test_images_outside_eps_or_flags_that_disagree_are_not_reused(saved_pgd, arrays):
    part = open_partial(saved_pgd, [FakeAttack("pgd10")])
    lc = part.clean(arrays["y"], 10)
    far = np.clip(arrays["x"] + np.float32(0.3), 0, 1)  # other clean images: the saved ones lie outside eps
    with pytest.raises(ArtifactError, match="outside eps"):
        part.take(FakeAttack("pgd10"), far, arrays["y"], lc)
    with pytest.raises(ArtifactError, match="disagree with the flags"):
        part.take(FakeAttack("pgd10"), arrays["x"], (arrays["y"] + 1) % 10, lc)


def test_other_peoples_files_are_never_touched(tmp_path, saved_pgd):
    blocker = tmp_path / "file.partial"
    blocker.write_text("mine")
    with pytest.raises(UsageError, match="is a file"):
        check_partial_dir(blocker)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "state.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"holds files a pack build does not write \(notes\.txt\)"):
        check_partial_dir(mine)
    assert discard_partial(mine) is False and (mine / "notes.txt").read_text() == "mine"
    assert not (mine / "state.json").exists()  # a name a build writes: its own
    check_partial_dir(saved_pgd)  # the build's own names (and their temp files) only: fine
    # a state.json of another kind is never overwritten, not even by a caller that discards its own stale folders
    (saved_pgd / "state.json").write_text(json.dumps({"kind": "ciard.eval_state", "schema_version": 1}))
    before = files(saved_pgd)
    with pytest.raises(ArtifactError, match="kind 'ciard.eval_state'"):
        open_partial(saved_pgd, [FakeAttack("pgd10")], on_mismatch="discard")
    assert files(saved_pgd) == before
    # our own state, damaged: refused by default, discarded by a caller that owns the folder
    (saved_pgd / "state.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not a valid ciard pack partial-results state"):
        open_partial(saved_pgd, [FakeAttack("pgd10")])
    open_partial(saved_pgd, [FakeAttack("pgd10")], on_mismatch="discard")
    assert not saved_pgd.exists()
