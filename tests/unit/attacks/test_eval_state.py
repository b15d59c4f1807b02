"""The resumable evaluation state: JSON round trip, mismatch detection, and `run_cascade` reusing,
resuming and saving it on a real trained tiny model (the attack math is never mocked: the
stand-ins below wrap real attacks and only count calls or stop like Ctrl-C)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ciard_deploy.attacks import FGSM, Attack, create_attack, run_cascade
from ciard_deploy.resume import (
    AttackRecord,
    EvaluationKey,
    EvaluationState,
    StateMismatch,
    flags_from_str,
    flags_to_str,
    open_state,
)
from ciard_deploy.errors import EXIT_BAD_INPUT, ArtifactError, UsageError

pytestmark = pytest.mark.unit

EPS = 0.1
N = 96
BATCH = 16


class Wrapped(Attack):
    """A real attack under its own name, budget and options (so a state made by the plain attack
    fits it), which counts what it is given and, like Ctrl-C, can stop on its ``stop_at``-th call.
    ``on_call(k)`` runs before the k-th call (1-based) does any work."""

    def __init__(self, inner: Attack, stop_at: int | None = None, on_call: Any = None,
                 exc: type[BaseException] = KeyboardInterrupt) -> None:
        self.inner, self.stop_at, self.on_call, self.exc = inner, stop_at, on_call, exc
        self.name, self.budget, self.requires = inner.name, inner.budget, inner.requires
        self.calls = 0
        self.samples = 0

    def options(self) -> dict[str, Any]:
        return self.inner.options()

    def run(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self.calls)
        if self.stop_at is not None and self.calls >= self.stop_at:
            raise self.exc()
        self.samples += len(x)
        return self.inner.run(model, x, y)


@pytest.fixture
def data(digits_test):
    return digits_test[0][:N], digits_test[1][:N]


def _key(x, y, **changes) -> EvaluationKey:
    base = dict(model_sha256="a" * 64, arch="tiny_cnn", dataset="digits", split="test", seed=0, eps=EPS,
                indices=np.arange(len(y)))
    base.update(changes)
    return EvaluationKey.create(x, y, **base)


def _pgd() -> Attack:
    return create_attack("pgd5", EPS, seed=0)


# --------------------------------------------------------------------------- the file format

def test_flag_strings_round_trip_and_reject_garbage():
    flags = np.array([1, 0, 0, 1, 1], dtype=bool)
    assert flags_to_str(flags) == "10011" and flags_to_str(np.zeros(0, bool)) == ""
    np.testing.assert_array_equal(flags_from_str("10011", 5, "f"), flags)
    for bad in ("1001", "10021", 10011):
        with pytest.raises(ValueError, match="5 characters 0/1"):
            flags_from_str(bad, 5, "f")


def test_state_json_round_trip_and_atomic_save(tmp_path, data):
    x, y = data
    clean = np.zeros(N, bool)
    clean[:10] = True
    robust = clean.copy()
    robust[5:] = False
    attack = _pgd()
    state = EvaluationState(_key(x, y), clean_correct=clean, info={"model_source": "m.safetensors"})
    state.put(AttackRecord(attack.label, attack.name, EPS, attack.describe(), 10, 10, 1.25, robust, "cpu", 16))
    state.put(AttackRecord("fgsm@0.1", "fgsm", EPS, FGSM(EPS).describe(), 10, 4, 0.5, robust & (np.arange(N) < 4)))
    path = state.save(tmp_path / "sub" / "state.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]  # no temp file left behind
    d = json.loads(path.read_text())
    assert d["kind"] == "ciard.eval_state" and d["schema_version"] == 1 and d["key"]["eps"] == EPS
    assert d["clean_correct"] == "1" * 10 + "0" * (N - 10) and d["attacks"][0]["per_sample"].startswith("11111000")
    back = EvaluationState.load(path)
    assert back.key == state.key and back.path == path and back.info["model_source"] == "m.safetensors"
    np.testing.assert_array_equal(back.clean_correct, clean)
    assert [(r.label, r.done, r.total, r.finished, r.seconds) for r in back.attacks] == [
        ("pgd5@0.1", 10, 10, True, 1.25), ("fgsm@0.1", 4, 10, False, 0.5)]
    np.testing.assert_array_equal(back.record("pgd5@0.1").per_sample, robust)
    assert back.differences(state.key, [attack, FGSM(EPS)]) == []
    res = back.result(["pgd5@0.1"])
    assert res.clean_acc == 10 / N and res["pgd5"].robust_acc == 5 / N and res["pgd5"].origin == "reused"
    with pytest.raises(ValueError, match="not finished"):
        back.result(["fgsm@0.1"])


def test_key_differences_name_every_field(data):
    x, y = data
    key = _key(x, y)
    assert key.differences(_key(x, y)) == []
    assert key.differences(_key(x, y, eps=0.2)) == ["eps 0.1 (file) vs 0.2 (now)"]
    assert key.differences(_key(x, y, seed=1, arch="small_cnn")) == [
        "arch \"tiny_cnn\" (file) vs \"small_cnn\" (now)", "seed 0 (file) vs 1 (now)"]
    diffs = key.differences(_key(x, y, model_sha256="b" * 64))
    assert diffs == ["model sha256 aaaaaaaaaaaa... (file) vs bbbbbbbbbbbb... (now)"]
    x2 = x.clone()
    x2[0, 0, 0, 0] = 1 - x2[0, 0, 0, 0]  # one pixel of one image
    assert [d.split(" ")[0] for d in key.differences(_key(x2, y))] == ["images/labels"]
    assert [d.split(" ")[0] for d in key.differences(_key(x, y, indices=np.arange(N) + 1))] == ["sample"]
    assert [d.split(" ")[0] for d in key.differences(_key(x[:-1], y[:-1], indices=np.arange(N - 1)))] == [
        "n", "sample", "images/labels"]


def test_attack_settings_must_match_but_other_attacks_are_fine(data):
    x, y = data
    state = EvaluationState(_key(x, y), clean_correct=np.zeros(N, bool))
    attack = _pgd()
    state.put(AttackRecord(attack.label, attack.name, EPS, attack.describe(), 0, 0, 0.0, np.zeros(N, bool)))
    # a superset (new attacks) and a subset (attacks the state holds but not asked for) both fit
    assert state.differences(state.key, [FGSM(EPS), _pgd(), create_attack("cw5", EPS)]) == []
    assert state.differences(state.key, []) == []
    other = create_attack("pgd5", EPS, seed=1, restarts=2)
    assert state.differences(state.key, [other]) == ["pgd5@0.1 options.restarts 1 (file) vs 2 (now)",
                                                     "pgd5@0.1 options.seed 0 (file) vs 1 (now)"]
    with pytest.raises(StateMismatch, match="options.seed 0 .file. vs 1 .now.") as exc:
        state.check(state.key, [other])
    assert isinstance(exc.value, ArtifactError) and exc.value.exit_code == EXIT_BAD_INPUT


def test_open_state_creates_reuses_refuses_and_never_overwrites(tmp_path, data):
    x, y = data
    path = tmp_path / "state.json"
    state, existed = open_state(path, _key(x, y), [FGSM(EPS)])
    assert not existed and state.path == path and not path.exists()  # nothing written until a save
    state.clean_correct = np.ones(N, bool)
    state.save()
    before = path.read_bytes()

    again, existed = open_state(path, _key(x, y), [FGSM(EPS)])
    assert existed and again.clean_correct.all()
    with pytest.raises(StateMismatch, match=r"state file .*state.json holds a different evaluation: "
                                            r"seed 0 \(file\) vs 2 \(now\); eps 0.1 \(file\) vs 0.3 \(now\); "
                                            r"pass --fresh$"):
        open_state(path, _key(x, y, eps=0.3, seed=2), [FGSM(0.3)], mismatch_hint="pass --fresh")
    assert path.read_bytes() == before
    fresh, existed = open_state(path, _key(x, y, eps=0.3), fresh=True)
    assert existed and fresh.clean_correct is None and fresh.attacks == [] and fresh.key.eps == 0.3
    assert path.read_bytes() == before  # replaced only by the first save

    other = tmp_path / "model.json"  # e.g. a checkpoint's metadata, given by mistake
    other.write_text('{"arch": "tiny_cnn"}\n')
    for kwargs in ({}, {"fresh": True}):
        with pytest.raises(ArtifactError, match="not a valid ciard evaluation state: kind None"):
            open_state(other, _key(x, y), **kwargs)
    assert other.read_text() == '{"arch": "tiny_cnn"}\n'
    with pytest.raises(UsageError, match="is a directory"):
        open_state(tmp_path, _key(x, y))


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d.update(schema_version=99), "newer"),
    (lambda d: d["key"].pop("data_sha256"), "key lacks data_sha256"),
    (lambda d: d.update(clean_correct="1" * 5), "clean_correct must be a string of"),
    (lambda d: d["attacks"][0].update(total=3, done=3), "total 3 is not the 10 clean-correct"),
    (lambda d: d["attacks"][0].update(done=11), "out of range"),
    (lambda d: d["attacks"][0].update(per_sample="1" * N), "robust flags on samples that are wrong on clean"),
    (lambda d: d["attacks"].append(dict(d["attacks"][0])), "recorded twice"),
])
def test_a_tampered_state_file_is_refused_with_the_reason(tmp_path, data, edit, needle):
    x, y = data
    clean = np.arange(N) < 10
    state = EvaluationState(_key(x, y), clean_correct=clean)
    state.put(AttackRecord("fgsm@0.1", "fgsm", EPS, FGSM(EPS).describe(), 10, 10, 0.1, clean.copy()))
    path = state.save(tmp_path / "s.json")
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match=needle):
        EvaluationState.load(path)
    path.write_text("{not json")
    with pytest.raises(ArtifactError, match="not a valid ciard evaluation state"):
        EvaluationState.load(path)


# --------------------------------------------------------------------------- run_cascade with a state

def _state(tmp_path: Path, x, y) -> EvaluationState:
    return open_state(tmp_path / "state.json", _key(x, y))[0]


def test_run_cascade_saves_and_a_second_call_runs_only_the_new_attack(tmp_path, trained_tiny, data):
    x, y = data
    first = run_cascade(trained_tiny, x, y, [FGSM(EPS), _pgd()], batch_size=BATCH, state=_state(tmp_path, x, y))
    saved = json.loads((tmp_path / "state.json").read_text())
    assert [(a["label"], a["done"] == a["total"]) for a in saved["attacks"]] == [("fgsm@0.1", True),
                                                                                ("pgd5@0.1", True)]
    assert [a.origin for a in first.attacks] == ["ran", "ran"]

    events = []
    fgsm, pgd, cw = Wrapped(FGSM(EPS)), Wrapped(_pgd()), Wrapped(create_attack("cw5", EPS))
    second = run_cascade(trained_tiny, x, y, [fgsm, pgd, cw], batch_size=BATCH, state=_state(tmp_path, x, y),
                      on_state=events.append)
    assert fgsm.calls == pgd.calls == 0 and cw.samples == int(first.clean_correct.sum())  # only cw ran
    assert [(e.kind, e.stage) for e in events] == [("reused", "clean"), ("reused", "fgsm@0.1"),
                                                   ("reused", "pgd5@0.1")]
    assert events[2].seconds == pytest.approx(first["pgd5"].seconds, abs=1e-4)
    assert [a.origin for a in second.attacks] == ["reused", "reused", "ran"]
    for label in ("fgsm@0.1", "pgd5@0.1"):
        np.testing.assert_array_equal(second[label].per_sample, first[label].per_sample)
        assert second[label].seconds == pytest.approx(first[label].seconds, abs=1e-4)
    assert second.worst_case_acc <= first.worst_case_acc
    assert second.worst_case_label == "worst(fgsm+pgd5+cw5)@0.1"

    # a subset: nothing runs, the result holds just that attack, the state keeps all three
    only = run_cascade(trained_tiny, x, y, [Wrapped(_pgd())], batch_size=BATCH, state=_state(tmp_path, x, y))
    assert [a.label for a in only.attacks] == ["pgd5@0.1"] and only.attacks[0].origin == "reused"
    assert len(EvaluationState.load(tmp_path / "state.json").attacks) == 3


def test_ctrl_c_keeps_finished_batches_and_the_next_call_continues_there(tmp_path, trained_tiny, data):
    x, y = data
    reference = run_cascade(trained_tiny, x, y, [FGSM(EPS)], batch_size=BATCH)
    n_correct = int(reference.clean_correct.sum())
    path = tmp_path / "state.json"
    seen: list[int] = []

    def on_call(k: int) -> None:  # with save_every=0 the file holds every batch finished before call k
        seen.append(json.loads(path.read_text())["attacks"][-1]["done"] if k > 1 else 0)

    stopping = Wrapped(FGSM(EPS), stop_at=4, on_call=on_call)
    with pytest.raises(KeyboardInterrupt):
        run_cascade(trained_tiny, x, y, [_pgd(), stopping], batch_size=BATCH, state=_state(tmp_path, x, y),
                 save_every=0)
    assert seen == [0, BATCH, 2 * BATCH, 3 * BATCH]
    saved = EvaluationState.load(path)
    assert saved.record("pgd5@0.1").finished  # the attack before the interrupted one is kept whole
    partial = saved.record("fgsm@0.1")
    assert (partial.done, partial.total, partial.finished) == (3 * BATCH, n_correct, False)

    events = []
    pgd, resumed = Wrapped(_pgd()), Wrapped(FGSM(EPS))
    res = run_cascade(trained_tiny, x, y, [pgd, resumed], batch_size=BATCH, state=_state(tmp_path, x, y),
                   on_state=events.append)
    assert pgd.calls == 0 and resumed.samples == n_correct - 3 * BATCH  # only the samples not yet attacked
    assert [(e.kind, e.stage, e.done) for e in events][1:] == [("reused", "pgd5@0.1", n_correct),
                                                               ("resumed", "fgsm@0.1", 3 * BATCH)]
    assert res["fgsm"].origin == "resumed"
    np.testing.assert_array_equal(res["fgsm"].per_sample, reference["fgsm"].per_sample)  # FGSM is deterministic
    assert EvaluationState.load(path).record("fgsm@0.1").finished


def test_an_error_inside_an_attack_also_saves_its_finished_batches(tmp_path, trained_tiny, data):
    """With the default save_every (seconds), the batches done before a failure are written on the way out."""
    x, y = data
    with pytest.raises(RuntimeError, match="boom"):
        run_cascade(trained_tiny, x, y, [Wrapped(FGSM(EPS), stop_at=3, exc=lambda: RuntimeError("boom"))],
                 batch_size=BATCH, state=_state(tmp_path, x, y))
    assert EvaluationState.load(tmp_path / "state.json").record("fgsm@0.1").done == 2 * BATCH


def test_run_cascade_refuses_a_state_for_other_data_eps_or_settings(tmp_path, trained_tiny, data):
    x, y = data
    state = _state(tmp_path, x, y)
    run_cascade(trained_tiny, x, y, [_pgd()], batch_size=BATCH, state=state)
    before = (tmp_path / "state.json").read_bytes()
    with pytest.raises(UsageError, match="for 96 samples, not 95"):
        run_cascade(trained_tiny, x[:-1], y[:-1], [_pgd()], state=state)
    with pytest.raises(UsageError, match="other images or labels"):
        run_cascade(trained_tiny, x.flip(0), y.flip(0), [_pgd()], state=state)
    with pytest.raises(UsageError, match="state is for eps 0.1; fgsm@0.2 has another budget"):
        run_cascade(trained_tiny, x, y, [FGSM(0.2)], state=state)
    with pytest.raises(StateMismatch, match="pgd5@0.1 options.seed 0 .file. vs None .now."):
        run_cascade(trained_tiny, x, y, [create_attack("pgd5", EPS)], state=state)
    assert (tmp_path / "state.json").read_bytes() == before


def test_the_state_module_imports_no_torch():
    """Like the results, a state file can be read (and re-judged) on a torch-free edge device."""
    import subprocess
    import sys

    code = ("import sys; from ciard_deploy.resume import EvaluationState, open_state; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
