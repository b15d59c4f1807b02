"""Shared loss terms, the training PGD and the CIARD schedule shape, checked against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ciard_deploy.distill.losses import (kl_soft, magnitude, pgd_train_attack, push_weight, softmax_entropy)
from ciard_deploy.distill.schedules import (cosine_exp_factor, delayed_cosine_exp, fraction_to_epoch,
                                            milestone_epochs)
from ciard_deploy.models import create_model

pytestmark = pytest.mark.unit



def hand_kl_terms(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """p_k (log p_k - log q_k) from the definitions, in float64."""
    p_logits, q_logits = p_logits.double(), q_logits.double()
    log_p = p_logits - torch.logsumexp(p_logits, dim=1, keepdim=True)
    log_q = q_logits - torch.logsumexp(q_logits, dim=1, keepdim=True)
    return log_p.exp() * (log_p - log_q)


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 10, generator=g) * 3, torch.randn(6, 10, generator=g) * 3


def test_kl_soft_reductions_match_the_definition(logits):
    t, s = logits
    terms = hand_kl_terms(t, s)
    assert kl_soft(t, s, reduction="elementwise").item() == pytest.approx(terms.mean().item(), rel=1e-5)
    assert kl_soft(t, s, reduction="batchmean").item() == pytest.approx(terms.sum().item() / 6, rel=1e-5)
    assert kl_soft(t, s, reduction="sum").item() == pytest.approx(terms.sum().item(), rel=1e-5)
    torch.testing.assert_close(kl_soft(t, s, reduction="none").double(), terms.sum(1), rtol=1e-5, atol=1e-6)


def test_elementwise_kl_is_batchmean_over_num_classes(logits):
    t, s = logits
    for C in (10, 3):
        ew = kl_soft(t[:, :C], s[:, :C], teacher_T=2.0, reduction="elementwise")
        bm = kl_soft(t[:, :C], s[:, :C], teacher_T=2.0, reduction="batchmean")
        assert ew.item() == pytest.approx(bm.item() / C, rel=1e-6)


def test_kl_soft_temperatures_scale_each_side(logits):
    t, s = logits
    got = kl_soft(t, s, teacher_T=4.0, student_T=5.0, reduction="elementwise")
    assert got.item() == pytest.approx(hand_kl_terms(t / 4.0, s / 5.0).mean().item(), rel=1e-5)
    assert kl_soft(t, t, reduction="batchmean").item() == pytest.approx(0.0, abs=1e-7)


def test_kl_soft_is_float32_under_half_inputs(logits):
    t, s = logits
    out = kl_soft(t.half(), s.half())
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_softmax_entropy_by_hand():
    z = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    p1 = math.exp(2) / (math.exp(2) + 3)
    p0 = 1 / (math.exp(2) + 3)
    h = (math.log(4) + (-p1 * math.log(p1) - 3 * p0 * math.log(p0))) / 2
    assert softmax_entropy(z).item() == pytest.approx(h, rel=1e-6)
    # a higher temperature flattens: entropy goes up toward log C
    assert softmax_entropy(z, T=10.0).item() > softmax_entropy(z).item()


def test_push_weight_formula():
    # mags: L_rob 0.23 -> -1, L_nat 0.045 -> -2, L_push 0.0031 -> -3: 10^(-2 - -3) = 10
    assert push_weight(0.23, 0.045, 0.0031) == 10.0
    assert push_weight(2.3, 0.45, 12.0) == pytest.approx(0.01)  # 10^(-1 - 1)
    assert push_weight(0.5, 0.5, 0.5) == 1.0
    assert magnitude(0.099) == -2 and magnitude(1.0) == 0 and magnitude(-250.0) == 2
    assert magnitude(0.0) == -7  # the reference replaces 0 by 1e-7


def test_pgd_ce_stays_in_budget_restores_mode_and_raises_the_loss():
    torch.manual_seed(0)
    net = create_model("tiny_cnn", 10, in_chans=1)
    x = torch.rand(8, 1, 8, 8)
    y = torch.arange(8) % 10
    net.train()
    calls = []
    net.register_forward_pre_hook(lambda m, a: calls.append(m.training))
    eps = 8 / 255
    x_adv = pgd_train_attack(net, x, y, eps=eps, steps=5, step_size=2 / 255)
    assert calls == [False] * 5 and net.training  # eval for the attack, mode restored
    assert not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(p.grad is None for p in net.parameters())
    net.eval()
    with torch.no_grad():
        ce = nn.functional.cross_entropy
        assert ce(net(x_adv), y) > ce(net(x), y)


def test_pgd_one_step_from_no_start_is_a_signed_gradient_step():
    torch.manual_seed(0)
    net = create_model("tiny_cnn", 10, in_chans=1).eval()
    x = torch.rand(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(net(xr), y, reduction="sum"), xr)
    expect = (x + 0.01 * g.sign()).clamp(x - 0.02, x + 0.02).clamp(0, 1)
    got = pgd_train_attack(net, x, y, eps=0.02, steps=1, step_size=0.01, start="none")
    torch.testing.assert_close(got, expect)
    # two steps of 0.015 hit the 0.02 ball
    got2 = pgd_train_attack(net, x, y, eps=0.02, steps=2, step_size=0.015, start="none")
    assert (got2 - x).abs().max().item() == pytest.approx(0.02, abs=1e-6)


def test_pgd_kl_target_and_starts():
    torch.manual_seed(0)
    net = create_model("tiny_cnn", 10, in_chans=1)
    x = torch.rand(4, 1, 8, 8)
    target = torch.randn(4, 10)
    g = torch.Generator().manual_seed(3)
    a = pgd_train_attack(net, x, eps=0.03, steps=2, loss="kl", target_logits=target, generator=g)
    g = torch.Generator().manual_seed(3)
    b = pgd_train_attack(net, x, eps=0.03, steps=2, loss="kl", target_logits=target, generator=g)
    assert torch.equal(a, b)
    # steps=0: the start itself, projected; "normal" noise is tiny, "uniform" fills the ball
    n0 = pgd_train_attack(net, x, eps=0.03, steps=0, loss="kl", target_logits=target, start="normal")
    u0 = pgd_train_attack(net, x, eps=0.03, steps=0, loss="kl", target_logits=target, start="uniform")
    assert (n0 - x).abs().max() < 0.006 and (u0 - x).abs().max() > 0.02
    with pytest.raises(ValueError):
        pgd_train_attack(net, x, eps=0.03, loss="ce")
    with pytest.raises(ValueError):
        pgd_train_attack(net, x, eps=0.03, loss="kl")


def test_cosine_exp_shape_and_reference_schedules():
    assert cosine_exp_factor(0.0) == 1.0 and cosine_exp_factor(1.0) == 0.0 and cosine_exp_factor(2.0) == 0.0
    assert cosine_exp_factor(0.5) == pytest.approx(0.5 * math.exp(-0.0025))
    # reference student lr: 0.1 until 150, then 0.1 * (0.5 + 0.5 cos(pi t)) exp(-0.01 t^2), t over 150..300
    lr = [0.1 * delayed_cosine_exp(e, 150, 300) for e in (1, 150, 225, 300)]
    assert lr[:2] == [0.1, 0.1] and lr[2] == pytest.approx(0.05 * math.exp(-0.0025)) and lr[3] == 0.0
    t = 100 / 250  # teacher at epoch 150: t = (150 - 50) / 250
    expect = 1e-4 * (0.5 + 0.5 * math.cos(math.pi * t)) * math.exp(-0.01 * t * t)
    assert 1e-4 * delayed_cosine_exp(150, 50, 300) == pytest.approx(expect)
    assert delayed_cosine_exp(5, 5, 5) == 1.0 and delayed_cosine_exp(6, 5, 5) == 0.0


def test_milestones_as_fractions():
    paper = (215 / 300, 260 / 300, 285 / 300)
    assert [fraction_to_epoch(f, 300) for f in paper] == [215, 260, 285]
    assert milestone_epochs(paper, 300) == [214, 259, 284]  # 0-based indices
    assert milestone_epochs(paper, 10) == [6, 8, 9]
    assert milestone_epochs((0.0,), 10) == [0]
