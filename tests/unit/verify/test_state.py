"""The resumable verify state: JSON round trip, key mismatches, and `run`/`evaluate_runtime` interrupted
during Square and resumed, on the real onnxruntime linear model with the numpy Square really running.

Ctrl-C is stood in for by a progress callback (after N finished Square batches) or by a backend
wrapper that raises in the middle of a batch; neither touches the attack. The resumed report's
numbers must equal those of an uninterrupted run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ciard_deploy.attacks.base import create_attack
from ciard_deploy.resume import AttackRecord, EvaluationState, StateMismatch
from ciard_deploy.errors import EXIT_BAD_INPUT, ArtifactError, UsageError
from ciard_deploy.runtime import open_backend
from ciard_deploy.verify import VerifyKey, VerifyState, evaluate_runtime, load_pack, run
from ciard_deploy.verify.live import live_size

pytestmark = pytest.mark.unit

#: Square settings of these tests: 60 of the pack's 120 images, batches of 8, so about 7 batches
SQUARE = dict(square_queries=30, square_n=60, batch_size=8, seed=2)


def square_attack(queries: int, eps: float, **options):
    return create_attack(f"square{queries}", eps, **options)


def _key(**changes) -> VerifyKey:
    base = dict(artifact_sha256="a" * 64, pack_checksum="sha256:" + "b" * 64, backend="onnxruntime", provider="cpu",
                n=120, eps=0.1, live_n=60, seed=2, batch_size=8)
    base.update(changes)
    return VerifyKey.create(**base)


def _state(**key_changes) -> VerifyState:
    clean = np.arange(120) % 3 != 0  # 80 clean-correct
    attack = square_attack(30, 0.1, seed=2, batch_size=8)
    per_sample = clean & (np.arange(120) < 40)
    rec = AttackRecord(attack.label, attack.name, 0.1, attack.describe(), 50, 16, 2.5, per_sample, "cpu", 8,
                       queries=1234)
    return VerifyState(_key(**key_changes), clean_correct=clean, attacks=[rec], info={"artifact": "m.onnx"})


def _measured(report) -> dict:
    """Every measured number of a report: results (without seconds and origin), metrics, parity, per-sample flags."""
    results = json.loads(json.dumps(report.results))
    for a in results["attacks"]:
        a.pop("seconds"), a.pop("origin")
    return {"results": results, "metrics": report.metrics, "parity": report.parity, "per_sample": report.per_sample,
            "gates": [g.to_dict() for g in report.gate_results]}


class StopAfterSquareBatches:
    """A progress callback standing in for Ctrl-C right after the ``n``-th finished Square batch."""

    def __init__(self, n: int) -> None:
        self.n, self.batches = n, 0

    def __call__(self, done: int, total: int | None = None, stage: str | None = None) -> None:
        if stage and stage.startswith("square") and done > 0:
            self.batches += 1
            if self.batches == self.n:
                raise KeyboardInterrupt


class CountingBackend:
    """The real backend, counting the images it serves; raises KeyboardInterrupt on the ``stop_at``-th call."""

    def __init__(self, inner, stop_at: int | None = None) -> None:
        self.inner, self.stop_at, self.calls, self.images = inner, stop_at, 0, 0

    def predict(self, images, batch_size=None):
        self.calls += 1
        if self.stop_at is not None and self.calls == self.stop_at:
            raise KeyboardInterrupt
        self.images += len(images)
        return self.inner.predict(images, batch_size=batch_size)

    @property
    def stats(self):
        return self.inner.stats


# --------------------------------------------------------------------------- the file

def test_state_json_round_trip_and_atomic_save(tmp_path):
    state = _state()
    path = state.save(tmp_path / "sub" / "v.state.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["v.state.json"]  # no temp file left behind
    d = json.loads(path.read_text())
    assert d["kind"] == "ciard.verify_state" and d["schema_version"] == 2
    assert d["key"]["live_n"] == 60 and d["key"]["pack_checksum"].startswith("sha256:")
    assert d["attacks"][0]["queries"] == 1234 and d["attacks"][0]["done"] == 16
    back = VerifyState.load(path)
    assert back.key == state.key and back.to_dict() == state.to_dict() and back.path == path
    assert back.info["artifact"] == "m.onnx"
    np.testing.assert_array_equal(back.record("square30@0.1").per_sample, state.attacks[0].per_sample)
    assert back.differences(state.key, [square_attack(30, 0.1, seed=2, batch_size=8)]) == []


def test_key_differences_name_every_field():
    key = _key()
    assert key.live_n == 60 and _key(live_n=None).live_n == 120 and _key(live_n=500).live_n == 120
    assert live_size(120, 500) == 120 and live_size(120, None) == 120 and live_size(120, 7) == 7
    assert key.differences(_key()) == []
    assert key.differences(_key(seed=3, batch_size=16)) == ["seed 2 (file) vs 3 (now)",
                                                            "batch size 8 (file) vs 16 (now)"]
    assert key.differences(_key(artifact_sha256="c" * 64, pack_checksum="sha256:" + "d" * 64)) == [
        "artifact sha256 aaaaaaaaaaaa... (file) vs cccccccccccc... (now)",
        "pack checksum sha256:bbbbbbbbbbbb... (file) vs sha256:dddddddddddd... (now)"]
    assert key.differences(_key(provider="cuda", live_n=50)) == [
        "provider \"cpu\" (file) vs \"cuda\" (now)", "live n 60 (file) vs 50 (now)"]
    assert key.settings_differences(eps=0.2) == ["eps 0.1 (file) vs 0.2 (now)"]


def test_open_creates_reuses_refuses_and_never_overwrites(tmp_path):
    path = tmp_path / "v.state.json"
    state, existed = VerifyState.open(path, _key())
    assert not existed and state.attacks == [] and not path.exists()  # nothing written until a save
    _state().save(path)
    before = path.read_bytes()
    again, existed = VerifyState.open(path, _key(), [square_attack(30, 0.1, seed=2, batch_size=8)])
    assert existed and again.record("square30@0.1").done == 16
    with pytest.raises(StateMismatch, match=r"holds a different verification: seed 2 \(file\) vs 5 \(now\); "
                                            r"pass --fresh$") as exc:
        VerifyState.open(path, _key(seed=5), mismatch_hint="pass --fresh")
    assert isinstance(exc.value, ArtifactError) and exc.value.exit_code == EXIT_BAD_INPUT
    assert path.read_bytes() == before
    fresh, existed = VerifyState.open(path, _key(seed=5), fresh=True)
    assert existed and fresh.attacks == [] and fresh.clean_correct is None and path.read_bytes() == before
    # files of another kind: a verify report, an eval state; with or without fresh, never taken
    report = tmp_path / "report.json"
    report.write_text('{"kind": "ciard.verify_report"}\n')
    eval_state = tmp_path / "eval.state.json"
    eval_state.write_text(json.dumps({"kind": "ciard.eval_state", "schema_version": 1}))
    for other, kind in ((report, "ciard.verify_report"), (eval_state, "ciard.eval_state")):
        text = other.read_text()
        for fresh_ in (False, True):
            with pytest.raises(ArtifactError, match=f"not a valid ciard verify state: kind '{kind}'"):
                VerifyState.open(other, _key(), fresh=fresh_)
        assert other.read_text() == text
    with pytest.raises(ArtifactError, match="not a valid ciard evaluation state: kind 'ciard.verify_state'"):
        EvaluationState.load(path)
    with pytest.raises(UsageError, match="is a directory"):
        VerifyState.open(tmp_path, _key())


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d.update(schema_version=3), "verify state schema 3 is newer"),
    (lambda d: d["key"].pop("batch_size"), "key lacks batch_size"),
    (lambda d: d["attacks"][0].update(done=13), "done 13 is not a whole number of batches of 8"),
    (lambda d: d["attacks"][0].update(total=81, done=16), "total 81 is more than the 80 clean-correct"),
    (lambda d: d["attacks"][0].pop("queries"), "no query count"),
    (lambda d: d["attacks"][0].update(queries=-1), "negative"),
    (lambda d: d["attacks"][0].update(per_sample="1" * 120), "robust flags on samples that are wrong on clean"),
    (lambda d: d["key"].update(batch_size=0), "batch_size 0 must be >= 1"),
])
def test_a_tampered_state_file_is_refused_with_the_reason(tmp_path, edit, needle):
    path = _state().save(tmp_path / "v.json")
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match=needle):
        VerifyState.load(path)


# --------------------------------------------------------------------------- interrupted and resumed

def test_run_interrupted_after_square_batches_resumes_to_the_same_report(tmp_path, linear_onnx, pack_file):
    whole = run(linear_onnx, pack_file, **SQUARE)
    path = tmp_path / "v.state.json"
    with pytest.raises(KeyboardInterrupt):
        run(linear_onnx, pack_file, state_path=path, progress=StopAfterSquareBatches(3), **SQUARE)
    saved = json.loads(path.read_text())
    (rec,) = saved["attacks"]
    assert rec["label"] == "square30@0.1" and rec["done"] == 3 * 8 < rec["total"] and rec["queries"] > 0

    events = []
    resumed = run(linear_onnx, pack_file, state_path=path, on_state=events.append, **SQUARE)
    assert [(e.kind, e.stage, e.done, e.total) for e in events] == [("resumed", "square30@0.1", 24, rec["total"])]
    assert _measured(resumed) == _measured(whole)
    sq = resumed.results["attacks"][-1]
    assert sq["origin"] == "resumed" and sq["queries"] == whole.results["attacks"][-1]["queries"]
    assert resumed.settings["state"] == str(path) and whole.settings["state"] is None
    assert json.loads(path.read_text())["attacks"][0]["done"] == rec["total"]  # finished now

    events.clear()  # a third call: Square finished in the state, taken whole
    again = run(linear_onnx, pack_file, state_path=path, on_state=events.append, **SQUARE)
    assert [(e.kind, e.done) for e in events] == [("reused", rec["total"])]
    assert _measured(again) == _measured(whole) and again.results["attacks"][-1]["origin"] == "reused"

    fresh = run(linear_onnx, pack_file, state_path=path, fresh=True, on_state=events.append, **SQUARE)
    assert len(events) == 1 and fresh.results["attacks"][-1]["origin"] == "ran"
    assert _measured(fresh) == _measured(whole)


def test_ctrl_c_inside_a_batch_keeps_the_finished_ones_and_resumes_with_fewer_queries(tmp_path, linear_onnx,
                                                                                        pack_file):
    pack = load_pack(pack_file)
    with open_backend(linear_onnx) as inner:
        full = CountingBackend(inner)
        whole = evaluate_runtime(full, pack, **SQUARE)
        before_square = 3 * 15 + 1  # clean and two transferred attacks in 15 calls each, the determinism call
        path = tmp_path / "v.state.json"
        key = _key(artifact_sha256="f" * 64, pack_checksum=pack.checksum)
        state, _ = VerifyState.open(path, key)
        first = CountingBackend(inner, stop_at=(before_square + full.calls) // 2)  # inside some Square batch
        with pytest.raises(KeyboardInterrupt):
            evaluate_runtime(first, pack, state=state, save_every=3600, **SQUARE)  # saved on Ctrl-C all the same
        rec = VerifyState.load(path).record("square30@0.1")
        assert 0 < rec.done < rec.total and rec.done % 8 == 0

        second = CountingBackend(inner)
        state, _ = VerifyState.open(path, key)
        resumed = evaluate_runtime(second, pack, state=state, **SQUARE)
    for a, b in zip(whole.attacks, resumed.attacks):
        assert (a.label, a.robust_acc, a.queries) == (b.label, b.robust_acc, b.queries)
        np.testing.assert_array_equal(a.per_sample, b.per_sample)
    assert resumed.worst_case == whole.worst_case and resumed.query[0].origin == "resumed"
    np.testing.assert_array_equal(resumed.live_indices, whole.live_indices)
    # only the unfinished batches were attacked again: fewer runtime images than a whole run
    square_images = whole.query[0].queries
    assert full.images - second.images == pytest.approx(rec.queries) and rec.queries < square_images


def test_a_state_for_other_settings_or_other_clean_predictions(tmp_path, linear_onnx, pack_file):
    pack = load_pack(pack_file)
    with open_backend(linear_onnx) as backend:
        state = VerifyState(_key(pack_checksum=pack.checksum))
        with pytest.raises(UsageError, match=r"other settings: live n 60 \(file\) vs 50 \(now\)"):
            evaluate_runtime(backend, pack, **{**SQUARE, "square_n": 50}, state=state)
        whole = evaluate_runtime(backend, pack, state=state, **SQUARE)
        assert state.record("square30@0.1").finished
        # the runtime now "classifies" one sample outside Square's subset differently: the saved batches
        # were made on other clean flags and are dropped (a non-deterministic runtime), Square runs again
        outside = next(i for i in range(pack.n) if i not in set(whole.live_indices.tolist()))
        state.clean_correct = state.clean_correct.copy()
        state.clean_correct[outside] = ~state.clean_correct[outside]
        events = []
        again = evaluate_runtime(backend, pack, state=state, on_state=events.append, **SQUARE)
    assert [(e.kind, e.stage) for e in events] == [("discarded", "square30@0.1")]
    assert again.query[0].origin == "ran" and again.worst_case == whole.worst_case
    np.testing.assert_array_equal(again.query[0].per_sample, whole.query[0].per_sample)
    np.testing.assert_array_equal(state.clean_correct, whole.clean_correct)


def test_run_refuses_bad_state_files_before_any_work(tmp_path, linear_onnx, pack_file):
    with pytest.raises(UsageError, match="--fresh discards a --state file"):
        run(linear_onnx, pack_file, fresh=True, **SQUARE)
    with pytest.raises(UsageError, match="is a directory"):
        run(linear_onnx, pack_file, state_path=tmp_path, **SQUARE)
    # the pack itself given as the state: refused, untouched
    before = pack_file.read_bytes()
    with pytest.raises(ArtifactError, match="not a valid ciard verify state"):
        run(linear_onnx, pack_file, state_path=pack_file, **SQUARE)
    assert pack_file.read_bytes() == before
    path = tmp_path / "v.state.json"
    run(linear_onnx, pack_file, state_path=path, **{**SQUARE, "seed": 3})
    saved = path.read_bytes()
    with pytest.raises(StateMismatch, match=r"seed 3 \(file\) vs 2 \(now\).*pass --fresh"):
        run(linear_onnx, pack_file, state_path=path, **SQUARE)
    assert path.read_bytes() == saved
