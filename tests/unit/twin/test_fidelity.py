"""TwinFidelity's numbers, its JSON round trip and verdict, random_in_ball, and the torch-free import."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ciard_deploy.twin import (TRUST_THRESHOLD, SetFidelity, TwinFidelity, compare_set, measure_fidelity,
                               random_in_ball)

pytestmark = pytest.mark.unit


def test_compare_set_counts_agreement_diff_and_bit_exact_rows():
    a = np.array([[1.0, 2.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 1.5, 0.0]], np.float32)
    b = a.copy()
    b[1] = [1.0, 3.0, 0.0]  # top-1 flips, diff 2
    b[3, 0] += 1e-7  # same class, not bit-exact
    s = compare_set(a, b)
    assert s == SetFidelity(n=4, agreement=0.75, max_abs_diff=2.0, bit_exact=0.5)
    with pytest.raises(ValueError, match="same"):
        compare_set(a, b[:2])


def test_fidelity_verdict_round_trip_and_line():
    fid = TwinFidelity({"clean": SetFidelity(400, 1.0, 1e-7, 0.9), "adversarial": SetFidelity(400, 0.995, 3e-3, 0.5)})
    assert fid.agreement == 0.995 and fid.trusted and fid.max_abs_diff == 3e-3 and fid.threshold == TRUST_THRESHOLD
    d = json.loads(json.dumps(fid.to_dict()))
    assert d["trusted"] is True and d["per_set"]["clean"]["n"] == 400
    again = TwinFidelity.from_dict(d)
    assert again == fid and list(again.per_set) == ["clean", "adversarial"]
    line = fid.line()
    assert "\n" not in line and "clean 100.0% (n=400)" in line and "adversarial 99.5%" in line and "trusted" in line
    low = TwinFidelity({"clean": SetFidelity(400, 0.99, 0.1, 0.0)})
    assert not low.trusted and "NOT trusted" in low.line()
    assert not TwinFidelity().trusted and TwinFidelity().agreement == 0.0


def test_random_in_ball_stays_in_the_ball_and_the_box():
    x = np.random.default_rng(0).random((50, 1, 8, 8)).astype(np.float32)
    x[0] = 0.0
    x[1] = 1.0
    r = random_in_ball(x, 0.15, seed=3)
    assert r.dtype == np.float32 and r.shape == x.shape
    assert np.abs(r - x).max() <= 0.15 + 1e-6 and r.min() >= 0.0 and r.max() <= 1.0
    assert np.array_equal(r, random_in_ball(x, 0.15, seed=3)) and not np.array_equal(r, random_in_ball(x, 0.15, 4))
    assert np.abs(r - x).mean() > 0.05  # uniform in the ball, not a corner


def test_measure_fidelity_in_batches_against_a_predict_function():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5)).train()
    x = np.random.default_rng(1).random((23, 1, 4, 4)).astype(np.float32)
    calls: list[int] = []

    def predict(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        with torch.no_grad():
            out = net(torch.from_numpy(images)).numpy()
        out[0] += 10.0 * (len(calls) == 1)  # one row of the first batch differs (and flips)
        return out

    fid = measure_fidelity(net, predict, {"clean": x, "noisy": random_in_ball(x, 0.1, 0)}, batch_size=10)
    assert calls == [10, 10, 3, 10, 10, 3] and net.training  # its mode is restored
    assert fid.per_set["clean"].n == 23 and fid.per_set["noisy"].agreement == 1.0
    assert fid.per_set["noisy"].bit_exact == 1.0 and fid.per_set["noisy"].max_abs_diff == 0.0
    assert fid.per_set["clean"].max_abs_diff == pytest.approx(10.0)
    with pytest.raises(ValueError, match="at least one"):
        measure_fidelity(net, predict, {})


def test_importing_the_package_does_not_import_torch(run_torch_hidden, tmp_path):
    body = '''
        import ciard_deploy.twin as twin
        import numpy as np
        fid = twin.TwinFidelity.from_dict({"per_set": {"clean": {"n": 2, "agreement": 1.0, "max_abs_diff": 0.0,
                                                                 "bit_exact": 1.0}}})
        ball = twin.random_in_ball(np.zeros((2, 1, 2, 2), np.float32), 0.1, 0)
        before = list(ATTEMPTS)
        try:
            twin.build_twin
            lazy = "imported"
        except ImportError:
            lazy = "needs torch"
        print("RESULT " + json.dumps({"attempts": before, "trusted": fid.trusted, "lazy": lazy}))
    '''
    res, err = run_torch_hidden(body, tmp_path, [])
    assert res == {"attempts": [], "trusted": True, "lazy": "needs torch"}, err
