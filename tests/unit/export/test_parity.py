"""Decision-level parity gates; element-wise differences are reported."""

from __future__ import annotations

import numpy as np
import pytest

from ciard_deploy.export.parity_gate import compare_logits

pytestmark = pytest.mark.unit


def test_identical_logits():
    ref = np.random.default_rng(0).normal(size=(50, 10)).astype(np.float32)
    r = compare_logits(ref, ref.copy(), threshold=0.999)
    assert r and r.top1_agreement == 1.0 and r.flips == 0 and r.max_abs_diff == 0.0


def test_small_noise_passes_decision_gate_but_shows_elementwise_difference():
    ref = np.eye(10, dtype=np.float32)[np.arange(40) % 10] * 5.0
    cand = ref + 0.01
    r = compare_logits(ref, cand, threshold=0.99)
    assert r.passed and r.max_abs_diff == pytest.approx(0.01, rel=1e-3)


def test_flips_fail_the_gate_and_name_the_worst_image():
    ref = np.eye(10, dtype=np.float32)[np.arange(100) % 10] * 3.0
    cand = ref.copy()
    cand[7] = np.roll(cand[7], 1)  # image 7 now predicts another class
    r = compare_logits(ref, cand, threshold=0.999)
    assert not r and r.flips == 1 and r.top1_agreement == pytest.approx(0.99) and r.worst_index == 7
    assert "1/100 flipped" in r.summary() and r.to_dict()["passed"] is False
    assert compare_logits(ref, cand).passed  # no threshold: report only


def test_shape_mismatch_is_a_bug_not_a_gate():
    with pytest.raises(ValueError):
        compare_logits(np.zeros((3, 10)), np.zeros((3, 9)))
