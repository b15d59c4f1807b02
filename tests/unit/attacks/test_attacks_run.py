"""Every attack on real tiny models: budget invariants, model state left alone, seeds, strength."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ciard_deploy.attacks import (
    FGSM,
    PGD,
    SquareAttack,
    create_attack,
    cw_margin_loss,
    frozen_eval,
    pgd_linf,
    run_cascade,
)
from ciard_deploy.errors import UsageError

pytestmark = pytest.mark.unit

EPS = 0.1
SPECS = ["fgsm", "pgd5", "pgdt5", "cw5", "square20", "aa-fast"]


def _within_budget(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32 and x_adv.device == x.device
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert not x_adv.requires_grad


@pytest.mark.parametrize("spec", [s for s in SPECS if s != "aa-fast"])  # AutoAttack: see the next test
def test_adversarial_images_stay_in_eps_ball_and_pixel_range(spec, tiny_model, batch):
    x, _ = batch
    with torch.no_grad():
        y = tiny_model.eval()(x).argmax(1)  # all "correct", so every attack really works
    x_before = x.clone()
    x_adv = create_attack(spec, EPS).run(tiny_model, x, y)
    _within_budget(x_adv, x, EPS)
    assert torch.equal(x, x_before)  # the clean batch is not modified in place
    assert bool((x_adv != x).any())


def test_autoattack_on_a_trained_model_stays_in_budget(trained_tiny, digits_test):
    """AutoAttack returns only the images it broke (nothing breaks the flat random model), so: a trained one."""
    x, y = digits_test[0][:16], digits_test[1][:16]
    x_adv = create_attack("aa-fast", EPS).run(trained_tiny, x, y)
    _within_budget(x_adv, x, EPS)
    with torch.no_grad():
        broken = trained_tiny(x_adv).argmax(1) != y
    changed = (x_adv != x).flatten(1).any(1)
    assert int(broken.sum()) >= 4 and bool(changed[broken].all())


@pytest.mark.parametrize("spec", SPECS)
def test_model_mode_and_requires_grad_are_restored(spec, tiny_model, batch):
    x, y = batch
    model = tiny_model.train()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.eval()  # a frozen BatchNorm must stay frozen
    frozen = model.net.fc.weight
    frozen.requires_grad_(False)
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}  # BN running stats included

    create_attack(spec, EPS).run(model, x, y)

    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())  # no parameter grads accumulated
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed: the attack ran the model in train mode"


def test_frozen_eval_restores_on_error(tiny_model):
    tiny_model.train()
    with pytest.raises(RuntimeError):
        with frozen_eval(tiny_model):
            assert not tiny_model.training
            assert not any(p.requires_grad for p in tiny_model.parameters())
            raise RuntimeError("boom")
    assert tiny_model.training and all(p.requires_grad for p in tiny_model.parameters())


def test_trained_model_grads_untouched(trained_tiny, digits_test):
    x, y = digits_test
    for p in trained_tiny.parameters():
        p.grad = torch.full_like(p, 0.5)
    create_attack("pgd3", EPS).run(trained_tiny, x[:16], y[:16])
    assert all(torch.all(p.grad == 0.5) for p in trained_tiny.parameters())
    trained_tiny.zero_grad(set_to_none=True)


def test_zero_eps_and_empty_batch_return_clean_images(tiny_model, batch):
    x, y = batch
    for spec in ("pgd3", "square10"):
        assert torch.equal(create_attack(spec, 0.0).run(tiny_model, x, y), x)
        assert create_attack(spec, EPS).run(tiny_model, x[:0], y[:0]).shape == (0, 1, 8, 8)


def test_bad_inputs_are_rejected(tiny_model, batch):
    x, y = batch
    attack = create_attack("pgd2", EPS)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attack.run(tiny_model, x * 2, y)
    with pytest.raises(ValueError, match="int64"):
        attack.run(tiny_model, x, y.int())
    with pytest.raises(ValueError, match="NCHW"):
        attack.run(tiny_model, x[0], y)


def test_seeded_attacks_repeat_and_leave_global_rng_alone(trained_tiny, digits_test):
    x, y = digits_test[0][:12], digits_test[1][:12]
    pgd = create_attack("pgd3", EPS, seed=3)
    assert torch.equal(pgd.run(trained_tiny, x, y), pgd.run(trained_tiny, x, y))
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    square = create_attack("square30", EPS, seed=5)
    assert torch.equal(square.run(trained_tiny, x, y), square.run(trained_tiny, x, y))
    create_attack("aa-fast", EPS).run(trained_tiny, x, y)  # the reference seeds torch's global RNG
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_cw_margin_loss_values():
    logits = torch.tensor([[5.0, 1.0, 0.0], [5.0, 1.0, 0.0], [100.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 1])
    # -(max(z_y - max_other + 50, 0)): -(5-1+50), -(1-5+50), and 0 once wrong by more than the margin
    assert cw_margin_loss(logits[:1], y[:1]).item() == -54.0
    assert cw_margin_loss(logits[1:2], y[1:2]).item() == -46.0
    assert cw_margin_loss(logits[2:], y[2:]).item() == 0.0
    assert cw_margin_loss(logits, y, confidence=0.0).item() == -4.0


def test_pgd_linf_functional_keeps_training_mode(tiny_model, batch):
    x, y = batch
    tiny_model.train()
    x_adv = pgd_linf(tiny_model, x, y, eps=EPS, step_size=0.02, steps=2)
    assert tiny_model.training
    _within_budget(x_adv, x, EPS)


def test_square_runs_on_a_numpy_logits_function(trained_tiny, digits_test):
    x, y = digits_test[0][:64], digits_test[1][:64]
    weight = trained_tiny  # the numpy function below hides torch from the attack

    def predict(images: np.ndarray) -> np.ndarray:
        assert isinstance(images, np.ndarray) and images.dtype == np.float32
        with torch.no_grad():
            return weight(torch.from_numpy(images)).numpy()

    xn, yn = x.numpy(), y.numpy()
    square = create_attack("square200", 0.15)
    x_adv = square.run_numpy(predict, xn, yn)
    assert isinstance(x_adv, np.ndarray) and x_adv.dtype == np.float32 and x_adv.shape == xn.shape
    assert np.abs(x_adv - xn).max() <= 0.15 + 1e-6 and x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    clean = (predict(xn).argmax(1) == yn).mean()
    robust = (predict(x_adv).argmax(1) == yn).mean()
    assert clean > 0.9 and robust < clean - 0.2


def test_square_rejects_images_too_small_for_its_squares():
    # squares are capped at side - 1 (as in the reference), so only a side of 1 leaves no room
    with pytest.raises(UsageError, match="too small"):
        SquareAttack(0.1, queries=10).run_numpy(lambda a: np.zeros((len(a), 3), np.float32),
                                                np.zeros((2, 1, 1, 3), np.float32), np.zeros(2))


def test_pgd_beats_fgsm_and_worst_case_is_a_lower_bound(trained_tiny, digits_test):
    x, y = digits_test[0][:120], digits_test[1][:120]
    attacks = [FGSM(EPS), PGD(EPS, steps=10, step_size=EPS / 4, seed=0), create_attack("cw10", EPS, step_size=EPS / 4)]
    calls: list[tuple[int, int, str]] = []
    res = run_cascade(trained_tiny, x, y, attacks, batch_size=50, progress=lambda d, t, s: calls.append((d, t, s)))
    acc = res.accuracies()
    assert res.n == 120 and acc["clean"] > 0.9
    assert acc["pgd10@0.1"] < acc["fgsm@0.1"] - 0.05  # iterating helps a lot at this radius
    assert acc["cw10@0.1"] < acc["fgsm@0.1"]
    assert res.worst_case_acc <= min(a.robust_acc for a in res.attacks)
    assert res.worst_case_label == "worst(fgsm+pgd10+cw10)@0.1"
    # per-sample flags agree with the numbers and imply clean correctness
    for a in res.attacks:
        assert a.per_sample.mean() == pytest.approx(a.robust_acc)
        assert not np.any(a.per_sample & ~res.clean_correct)
    np.testing.assert_array_equal(res.worst_case, res.clean_correct & np.logical_and.reduce(
        [a.per_sample for a in res.attacks]))
    assert res.worst_case.mean() == pytest.approx(res.worst_case_acc)
    n_correct = int(res.clean_correct.sum())
    assert calls[0][2] == "clean" and (120, 120, "clean") in calls
    for label in ("fgsm@0.1", "pgd10@0.1", "cw10@0.1"):
        assert (n_correct, n_correct, label) in calls
    assert not trained_tiny.training


def test_run_cascade_accepts_numpy_and_rejects_duplicates(trained_tiny, digits_test):
    x, y = digits_test[0][:20], digits_test[1][:20]
    res = run_cascade(trained_tiny, x.numpy(), y.numpy(), [FGSM(EPS)])
    assert res.n == 20 and 0.0 <= res.attacks[0].robust_acc <= res.clean_acc
    with pytest.raises(UsageError, match="listed twice: fgsm@0.1"):
        run_cascade(trained_tiny, x, y, [FGSM(EPS), FGSM(EPS)])
    with pytest.raises(UsageError, match="no samples"):
        run_cascade(trained_tiny, x[:0], y[:0], [FGSM(EPS)])
