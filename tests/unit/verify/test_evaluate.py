"""The runtime cascade on a real onnxruntime model (linear, numpy-made): numbers, worst case, Square, run()."""

from __future__ import annotations

import numpy as np
import pytest

from ciard_deploy.errors import ArtifactError, UsageError
from ciard_deploy.runtime import open_backend
from ciard_deploy.verify import Gates, evaluate_runtime, load_pack, run, stratified_subset
from ciard_deploy.verify.pack import save_pack

pytestmark = pytest.mark.unit


def test_stratified_subset():
    y = np.repeat(np.arange(10), [30, 30, 30, 30, 30, 30, 30, 30, 30, 3])
    idx = stratified_subset(y, 50, seed=0)
    assert len(idx) == 50 and len(set(idx.tolist())) == 50 and np.all(np.diff(idx) > 0)
    counts = np.bincount(y[idx], minlength=10)
    assert counts.min() >= 3 and counts.max() <= 6  # the small class gives all it has, others fill
    np.testing.assert_array_equal(idx, stratified_subset(y, 50, seed=0))
    assert not np.array_equal(idx, stratified_subset(y, 50, seed=1))
    np.testing.assert_array_equal(stratified_subset(y, 1000, 0), np.arange(len(y)))


def test_numbers_match_numpy_reference(linear_onnx, pack_file, linear, h):
    pack = load_pack(pack_file)
    with open_backend(linear_onnx) as backend:
        ev = evaluate_runtime(backend, pack, square_queries=0, batch_size=32)
    clean = h.logits(linear, pack.x).argmax(1) == pack.y
    assert ev.clean_acc == pytest.approx(clean.mean())
    for o, xa in zip(ev.transfer, pack.adv):
        expect = clean & (h.logits(linear, xa).argmax(1) == pack.y)
        assert o.kind == "transfer" and o.n == pack.n
        assert o.robust_acc == pytest.approx(expect.mean()) == pytest.approx(o.reference_acc)
        np.testing.assert_array_equal(o.per_sample, expect)
    assert ev.parity.clean.top1_agreement == 1.0 and ev.parity.clean.max_abs_diff < 1e-4
    assert ev.parity.adversarial.n == 2 * pack.n and ev.parity.adversarial.flips == 0
    wt = ev.worst_transfer
    assert wt["label"] == "worst(pgd10+fgsm)@0.1" and wt["acc"] == pytest.approx(pack.reference["worst_case_acc"])
    assert ev.worst_case["acc"] == wt["acc"] and not ev.query
    assert ev.timings["inference_images"] == 3 * pack.n and ev.timings["inference_images_per_s"] > 0
    assert ev["fgsm@0.1"].name == "fgsm"


def test_square_on_the_runtime(linear_onnx, pack_file):
    pack = load_pack(pack_file)
    calls = []
    with open_backend(linear_onnx) as backend:
        ev = evaluate_runtime(backend, pack, square_queries=60, square_n=40, batch_size=16, seed=3,
                              progress=lambda d, t, stage: calls.append((d, t, stage)))
    sq = ev.query[0]
    assert sq.label == "square60@0.1" and sq.kind == "query" and sq.n == 40 and len(ev.live_indices) == 40
    assert sq.queries > 40 and sq.settings["seed"] == 3 and sq.settings["started_from"] == "clean images"
    assert sq.robust_acc < ev.clean_acc  # a linear digits model is not robust at 0.1
    # the worst case covers Square's subset and is no better than any attack on it
    idx = ev.live_indices
    wc = ev.worst_case
    assert wc["n"] == 40 and wc["label"] == "worst(pgd10+fgsm+square60)@0.1"
    assert wc["acc"] <= min(sq.robust_acc, *(o.per_sample[idx].mean() for o in ev.transfer)) + 1e-12
    stages = {s for _, _, s in calls}
    assert stages == {"inference", "square60@0.1"}
    assert calls[-1][0] == calls[-1][1]  # the last update says done
    inf = [c for c in calls if c[2] == "inference"]
    assert inf[0][0] == 0 and inf[-1][:2] == (3 * pack.n, 3 * pack.n)


def test_square_is_seeded(linear_onnx, pack_file):
    pack = load_pack(pack_file)
    with open_backend(linear_onnx) as backend:
        a = evaluate_runtime(backend, pack, square_queries=30, square_n=20, seed=1).query[0]
        b = evaluate_runtime(backend, pack, square_queries=30, square_n=20, seed=1).query[0]
    np.testing.assert_array_equal(a.per_sample, b.per_sample)


def test_run_returns_a_complete_report(linear_onnx, pack_file):
    rep = run(linear_onnx, pack_file, square_queries=30, square_n=20, gates=Gates.create(min_clean=0.5))
    assert rep.passed and rep.status == "passed"
    assert rep.artifact["backend"] == "onnxruntime" and rep.artifact["precision"] == "fp32"
    assert rep.artifact["pack_matches_source"] is True  # metadata source_sha256 == the pack's model sha
    assert rep.metrics["clean_acc"] == rep.results["clean_acc"] and rep.metrics["square_acc"] is not None
    assert rep.settings["live_attacks"] == ["square30"] and rep.per_sample["live_indices"] is not None
    assert len(rep.per_sample["clean"]) == 120
    codes = {f.code for f in rep.warnings}
    assert "V104" not in codes and "V106" not in codes


@pytest.mark.parametrize("kwargs,match", [
    ({"square_queries": 1}, "--square-queries"),
    ({"square_queries": -5}, "--square-queries"),
    ({"square_n": 0}, "--square-n"),
    ({"batch_size": 0}, "--batch-size"),
])
def test_run_bad_settings(linear_onnx, pack_file, kwargs, match):
    with pytest.raises(UsageError, match=match):
        run(linear_onnx, pack_file, **kwargs)


def test_run_refuses_packs_for_other_models(tmp_path, linear, linear_onnx, test_xy, h):
    x, y = test_xy
    small = np.ascontiguousarray(x[:, :, :4, :4])
    wb4 = (linear[0][:16], linear[1])
    p = save_pack(h.pack(wb4, small, y, attacks=("fgsm",)), tmp_path / "shape.npz")
    with pytest.raises(ArtifactError, match=r"shape \(1, 4, 4\).*takes \(1, 8, 8\)"):
        run(linear_onnx, p, square_queries=0)
    wb5 = (linear[0][:, :5], linear[1][:5])
    keep = y < 5
    p = save_pack(h.pack(wb5, x[keep], y[keep], attacks=("fgsm",), num_classes=5), tmp_path / "classes.npz")
    with pytest.raises(ArtifactError, match="5 classes but linear.onnx outputs 10"):
        run(linear_onnx, p, square_queries=0)


def test_gates_that_cannot_be_measured(tmp_path, linear, linear_onnx, test_xy, h):
    p = save_pack(h.pack(linear, *test_xy, attacks=()), tmp_path / "clean_only.npz")
    with pytest.raises(UsageError, match="--max-robust-drop needs robust_drop"):
        run(linear_onnx, p, square_queries=0, gates=Gates.create(max_robust_drop=0.1))
    with pytest.raises(UsageError, match="--min-robust needs worst_case_acc"):
        run(linear_onnx, p, square_queries=0, gates=Gates.create(min_robust=0.1))
    rep = run(linear_onnx, p, square_queries=20, square_n=10, gates=Gates.create(min_robust=0.0))
    assert rep.passed and rep.results["worst_case"]["label"] == "worst(square20)@0.1"
    rep = run(linear_onnx, p, square_queries=0)
    assert "V110" in {f.code for f in rep.warnings} and rep.results["worst_case"] is None
