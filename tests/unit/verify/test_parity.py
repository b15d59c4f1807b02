"""Parity at two levels: decision (agreement, flips) and element (logit differences)."""

from __future__ import annotations

import numpy as np
import pytest

from ciard_deploy.runtime.parity_metrics import MAX_LISTED_FLIPS, Parity, compare, pooled
from ciard_deploy.verify.parity_report import ParityReport

pytestmark = pytest.mark.unit


def test_identical_and_flipped():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 10)).astype(np.float32)
    same = compare(ref, ref.copy())
    assert same.top1_agreement == 1.0 and same.flips == 0 and same.max_abs_diff == 0.0 and same.flip_indices == ()
    cand = ref.copy()
    cand[7] = -cand[7]  # flips image 7's decision
    cand[3] += 1e-3     # tiny change, same decision
    p = compare(ref, cand)
    assert p.flips == 1 and p.flip_indices == (7,) and p.top1_agreement == pytest.approx(0.98)
    assert p.worst_index == 7 and p.max_abs_diff == pytest.approx(float(np.abs(2 * ref[7]).max()), rel=1e-6)
    assert 0 < p.max_prob_change <= 1 and "1/50 flipped" in p.summary()
    assert Parity.from_dict(p.to_dict()) == p


def test_listed_flips_are_capped_and_count_exact():
    ref = np.eye(3, dtype=np.float32)[np.zeros(100, int)]
    cand = np.eye(3, dtype=np.float32)[np.ones(100, int)]
    p = compare(ref, cand)
    assert p.flips == 100 and len(p.flip_indices) == MAX_LISTED_FLIPS and p.top1_agreement == 0.0


def test_shape_mismatch_is_a_bug():
    with pytest.raises(ValueError):
        compare(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32))


def test_pooled_and_report_round_trip():
    a = Parity(100, 0.99, 1, 0.5, 0.01, 0.2, 3, (3,))
    b = Parity(300, 0.97, 9, 0.2, 0.02, 0.4, 8, (1, 2))
    p = pooled({"a": a, "b": b})
    assert p.n == 400 and p.flips == 10 and p.top1_agreement == pytest.approx(0.975)
    assert p.max_abs_diff == 0.5 and p.worst_index == 3 and p.max_prob_change == 0.4
    assert p.mean_abs_diff == pytest.approx((100 * 0.01 + 300 * 0.02) / 400)
    assert pooled({}) is None
    rep = ParityReport(clean=a, per_attack={"x@0.1": b})
    d = rep.to_dict()
    assert d["adversarial"]["n"] == 300
    assert ParityReport.from_dict(d).to_dict() == d
    assert ParityReport(clean=a).to_dict()["adversarial"] is None
