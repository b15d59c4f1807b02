"""Square's strength on a real robust model: stronger than ART's on INT8, at reference strength on FP32.

The session's robust small_cnn (``digits_robust_run`` in tests/conftest.py: PGD-AT at eps 0.15 on
digits 1x8x8) and its session exports (``digits_robust_exports``: ONNX FP32 and INT8 QDQ, mixed
calibration) are attacked through onnxruntime on one thread, on the first 120 digits test images,
at 300 queries, seed 0. Measured on the 2-core dev machine (four seeds, robust accuracy over 120
images): INT8 ours 73-77 % vs ART 83-87 %; FP32 ours 72-74 % vs pyautoattack 77-80 %. The module
takes ~26 s on that machine under load, ~15 s of it the session's training and export (shared).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ciard_deploy.attacks.square import SquareAttack, numpy_predict_from_session
from ciard_deploy.data.digits import load_digits_split
from ciard_deploy.model_loader import load_model

pytestmark = pytest.mark.integration
EPS = 0.15  # the eps the session model was trained at
N = 120
QUERIES = 300


@pytest.fixture(scope="module")
def artifacts(digits_robust_exports: Path) -> dict[str, Path]:
    """The session's exports of that model (tests/conftest.py: ``export.run``, mixed calibration)."""
    return {"fp32": digits_robust_exports / "model.onnx", "int8": digits_robust_exports / "model.int8.onnx"}


@pytest.fixture(scope="module")
def test_images() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits_split("test").tensors()
    return x[:N].numpy(), y[:N].numpy()


def session(path: Path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    return numpy_predict_from_session(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))


def robust_acc(predict, x_adv: np.ndarray, y: np.ndarray) -> float:
    """Over all N images: the images not attacked (clean errors) count as not robust."""
    return float((predict(x_adv).argmax(1) == y).sum() / N)


def clean_correct(predict, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ok = predict(x).argmax(1) == y
    assert ok.mean() > 0.9
    return x[ok], y[ok]


def ours(predict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    attack = SquareAttack(EPS, queries=QUERIES, seed=0)
    x_adv = attack.run_numpy(predict, x, y)
    assert np.abs(x_adv - x).max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert 0 < attack.last_queries <= QUERIES * len(x)
    return x_adv


def test_beats_arts_square_on_the_int8_artifact(artifacts, test_images):
    """INT8 logits are quantized: ART's strict acceptance stalls on margin plateaus, ours keeps moving."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from art.attacks.evasion import SquareAttack as ArtSquare
            from art.estimators.classification import BlackBoxClassifierNeuralNetwork
        except ImportError as exc:
            pytest.skip(f"adversarial-robustness-toolbox is not installed ({exc}): nothing to compare with")
    predict = session(artifacts["int8"])
    x, y = clean_correct(predict, *test_images)
    acc_ours = robust_acc(predict, ours(predict, x, y), y)

    # ART configured as ciard_deploy.attacks.square used it before this implementation
    est = BlackBoxClassifierNeuralNetwork(predict, input_shape=tuple(x.shape[1:]), nb_classes=10, channels_first=True,
                                          clip_values=(0.0, 1.0))
    art = ArtSquare(est, norm=np.inf, max_iter=QUERIES - 1, eps=EPS, p_init=0.8, nb_restarts=1, batch_size=256,
                    verbose=False)
    state = np.random.get_state()
    np.random.seed(0)
    try:
        x_art = np.clip(np.clip(art.generate(x, y=y), x - EPS, x + EPS), 0, 1).astype(np.float32)
    finally:
        np.random.set_state(state)
    acc_art = robust_acc(predict, x_art, y)
    # measured: 76.7 % vs 83.3 % (seed 0); over seeds 0-3 ours is 7-12 points lower
    assert acc_ours < acc_art - 0.02, (acc_ours, acc_art)


def test_at_least_as_strong_as_the_reference_square_on_fp32(artifacts, digits_robust_run, test_images):
    """pyautoattack's Square (the reference AutoAttack uses) on the torch model, same images, eps, budget,
    p_init, seed and margin loss (its n_queries counts iterations after the stripes, so it gets one forward
    pass more than ours: negligible at 300). The bound is one-sided: ours may be stronger (its windows reach the
    last row and column of an 8x8 image, which the reference's never do, and it never spends a query on a
    proposal that changes nothing), but it must not be weaker by more than 1 point, plus 2 points of slack
    for the random search itself (two random searches with different RNGs on 120 images differ by ~2
    points between seeds here)."""
    from pyautoattack.square import SquareAttack as RefSquare

    predict = session(artifacts["fp32"])
    x, y = clean_correct(predict, *test_images)
    acc_ours = robust_acc(predict, ours(predict, x, y), y)

    model, _ = load_model(digits_robust_run)
    ref = RefSquare(model.eval(), norm="Linf", n_queries=QUERIES, eps=EPS, p_init=0.8, n_restarts=1, seed=0,
                    loss="margin", resc_schedule=True, device=torch.device("cpu"))
    with torch.no_grad():
        x_ref = ref.perturb(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    assert np.abs(x_ref - x).max() <= EPS + 1e-6
    acc_ref = robust_acc(predict, x_ref, y)  # scored on the FP32 runtime, as ours (it agrees with torch)
    # measured: 73.3 % vs 80.0 % (seed 0)
    assert acc_ours <= acc_ref + 0.01 + 0.02, (acc_ours, acc_ref)
