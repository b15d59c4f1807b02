"""The attack suite against a small_cnn really trained on digits, in torch and through onnxruntime.

One module-scoped model (about 0.5 s of training), 200 test images, eps 0.1: checks the
expected strength order (aa <= pgd20 <= fgsm <= clean), the budget of every adversarial image,
and that the query-only Square breaks the exported ONNX model through a plain numpy function.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from ciard_deploy.attacks import Attack, EvalResult, MissingCapability, create_attack, run_cascade
from ciard_deploy.attacks.square import numpy_predict_from_session

pytestmark = pytest.mark.integration

EPS = 0.1
N_TEST = 200
N_AA = 100


def _digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from ciard_deploy.data import create_dataset

        return create_dataset("digits", split).tensors()
    except (ImportError, AttributeError, TypeError):  # data package API not there yet
        from ciard_deploy.data.digits import load_digits_split

        return load_digits_split(split).tensors()


class Recorder(Attack):
    """Wraps an attack and keeps every batch it returns, to check budgets after ``run_cascade``."""

    def __init__(self, inner: Attack) -> None:
        self.inner, self.name, self.budget, self.requires = inner, inner.name, inner.budget, inner.requires
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def run(self, model, x, y):
        x_adv = self.inner.run(model, x, y)
        self.pairs.append((x.clone(), x_adv.clone()))
        return x_adv


@pytest.fixture(scope="module")
def digits_model(train_on_digits) -> torch.nn.Module:
    """small_cnn trained 4 epochs with Adam (lr 3e-3) on the digits train split (clean test accuracy ~99 %)."""
    return train_on_digits("small_cnn", lr=3e-3)


@pytest.fixture(scope="module")
def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _digits("test")
    return x[:N_TEST], y[:N_TEST]


@pytest.fixture(scope="module")
def white_box(digits_model, test_set) -> tuple[EvalResult, list[Recorder]]:
    x, y = test_set
    recorders = [Recorder(create_attack(s, EPS, **({"seed": 0} if s.startswith("pgd") else {})))
                 for s in ("fgsm", "pgd20", "pgdt20", "cw30")]
    return run_cascade(digits_model, x, y, recorders, batch_size=128), recorders


@pytest.fixture(scope="module")
def autoattack(digits_model, test_set) -> tuple[EvalResult, Recorder]:
    x, y = test_set
    recorder = Recorder(create_attack("aa", EPS))
    return run_cascade(digits_model, x[:N_AA], y[:N_AA], [recorder]), recorder


@pytest.fixture(scope="module")
def onnx_session(digits_model, test_set, tmp_path_factory):
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path_factory.mktemp("onnx") / "small_cnn_digits.onnx"
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(digits_model, (test_set[0][:2],), str(path), dynamo=True, opset_version=18,
                      external_data=False, input_names=["images"], output_names=["logits"],
                      dynamic_shapes=({0: batch},))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_model_trained_for_real(white_box):
    result, _ = white_box
    assert result.n == N_TEST and result.clean_acc > 0.9


def test_attack_strength_order(white_box, autoattack):
    result, _ = white_box
    acc = result.accuracies()
    clean, fgsm, pgd = acc["clean"], acc["fgsm@0.1"], acc["pgd20@0.1"]
    assert pgd <= fgsm <= clean
    assert pgd < clean - 0.3  # an undefended model: PGD breaks much of it at eps 0.1
    assert acc["cw30@0.1"] < clean - 0.2
    assert acc["pgdt20@0.1"] < clean - 0.05  # 20 steps of 0.003 reach only 0.06 < eps: weaker, still hurts
    assert result.worst_case_acc <= min(a.robust_acc for a in result.attacks)

    aa_result, _ = autoattack
    aa = aa_result["aa@0.1"]
    pgd_on_subset = result["pgd20"].per_sample[:N_AA].mean()
    assert aa.robust_acc <= pgd_on_subset <= result.clean_correct[:N_AA].mean()
    assert aa_result.clean_acc == pytest.approx(result.clean_correct[:N_AA].mean())
    # JSON carries every number under its label
    d = aa_result.to_dict()
    assert d["robust_acc"] == {"aa@0.1": aa.robust_acc} and d["worst_case_label"] == "worst(aa)@0.1"


def test_every_adversarial_image_is_within_budget(white_box, autoattack):
    _, recorders = white_box
    for rec in [*recorders, autoattack[1]]:
        assert rec.pairs, f"{rec.label} never ran"
        for x, x_adv in rec.pairs:
            assert float((x_adv - x).abs().max()) <= EPS + 1e-6, rec.label
            assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0, rec.label
        changed = sum(int((x_adv != x).flatten(1).any(1).sum()) for x, x_adv in rec.pairs)
        assert changed > 0, f"{rec.label} changed no image"


def test_square_breaks_the_onnx_runtime_through_numpy(digits_model, test_set, onnx_session):
    x, y = test_set
    predict = numpy_predict_from_session(onnx_session)
    xn, yn = x.numpy(), y.numpy()
    with torch.no_grad():
        torch_top1 = digits_model(x).argmax(1).numpy()
    assert (predict(xn).argmax(1) == torch_top1).mean() == 1.0  # the export is faithful

    square = create_attack("square300", EPS)
    with pytest.raises(MissingCapability):
        create_attack("pgd20", EPS).ensure_capabilities({"scores"})  # a runtime gives scores only
    square.ensure_capabilities({"scores"})
    x_adv = square.run_numpy(predict, xn, yn)
    assert x_adv.dtype == np.float32 and x_adv.shape == xn.shape
    assert np.abs(x_adv - xn).max() <= EPS + 1e-6 and x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    clean = (predict(xn).argmax(1) == yn).mean()
    robust = (predict(x_adv).argmax(1) == yn).mean()
    assert clean > 0.9 and robust < clean - 0.25

    # the same Square through the torch model lands at (nearly) the same number
    torch_result = run_cascade(digits_model, x, y, [square])
    assert torch_result.attacks[0].robust_acc == pytest.approx(robust, abs=0.05)
