"""NaN/inf logits are a defect of the artifact: parity counts them as flips and never reports a NaN,
the determinism check (V107) never says "differ by up to nan", V114 names them and fails verify under
every policy, and export's own parity check fails such an artifact. numpy only."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ciard_deploy.export.parity_gate import compare_logits
from ciard_deploy.runtime.parity_metrics import Parity, compare, pooled
from ciard_deploy.verify import checks
from ciard_deploy.verify.gates import Policy, judge_warnings

pytestmark = pytest.mark.unit


def _logits(n: int = 8, k: int = 4) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, k)).astype(np.float32)


def test_parity_counts_nonfinite_rows_as_flips_and_reports_no_nan():
    ref = _logits()
    cand = ref.copy()
    cand[2, 1], cand[5, 0] = np.nan, np.inf
    p = compare(ref, cand)
    assert p.nonfinite == 2 and p.flips == 2 and p.top1_agreement == pytest.approx(6 / 8)
    assert p.max_abs_diff == 0.0 and np.isfinite([p.mean_abs_diff, p.max_prob_change]).all()
    assert "NaN/inf logits for 2 of 8 images" in p.summary()
    json.dumps(p.to_dict(), allow_nan=False)  # valid JSON
    assert Parity.from_dict(p.to_dict()) == p
    allnan = compare(ref, np.full_like(ref, np.nan))
    assert allnan.top1_agreement == 0.0 and allnan.worst_index == -1 and pooled({"a": p, "b": allnan}).nonfinite == 10
    assert compare(ref, ref).nonfinite == 0


def test_export_parity_fails_nonfinite_logits_whatever_the_threshold():
    ref = _logits(200)
    cand = ref.copy()
    cand[0, 0] = np.nan  # one image of 200: agreement 99.5 %, above an INT8 threshold
    assert not compare_logits(ref, cand, 0.97).passed and not compare_logits(ref, cand).passed
    assert compare_logits(ref, ref, 0.97).passed


def test_determinism_never_says_nan():
    a = _logits()
    a[0] = np.nan
    assert checks.check_determinism(a, a.copy()) is None  # NaN in the same places: deterministic (V114 reports it)
    b = a.copy()
    b[3, 0] += 0.5
    b[4] = np.inf
    f = checks.check_determinism(a, b)
    assert f is not None and f.code == "V107" and "nan" not in f.message.lower().replace("nan/inf", "")
    assert "differ by up to 0.5" in f.message and "NaN/inf in 2 rows" in f.message


def test_v114_fails_under_every_policy():
    clean, adv = _logits(), _logits()
    assert checks.check_finite({"clean": clean, "pgd20@0.1": adv}) is None
    adv[1, 2] = -np.inf
    f = checks.check_finite({"clean": clean, "pgd20@0.1": adv})
    assert f.code == "V114" and f.level == "warning" and "1 of 16 images (pgd20@0.1 1/8)" in f.message
    for policy in (Policy(), Policy(allow_mismatch=True), Policy(strict=True)):
        verdicts = judge_warnings(policy, [f])
        assert [(v.rule, v.code) for v in verdicts] == [("defect", "V114")]
    assert "no flag accepts it" in verdicts[0].line()
