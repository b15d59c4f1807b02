"""Every method on the step interface, the registry, and the baselines' losses recomputed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ciard_deploy.distill.methods import (METHODS, Method, MethodConfig, StepResult, create_method, list_methods,
                                          make_config)
from ciard_deploy.errors import RecipeError, UsageError
from ciard_deploy.models import create_model

pytestmark = pytest.mark.unit


EPS = 8 / 255
ALL = ["ard", "ciard", "mtard", "natural", "pgd_at", "rslad", "trades"]


def tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("tiny_cnn", 10, in_chans=1)


def batch(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 10


def build(name: str, cfg=None, **kw) -> tuple[Method, torch.nn.Module, dict[str, torch.nn.Module]]:
    student = tiny(0)
    teachers = {"clean": tiny(1), "robust": tiny(2)}
    kw = {"num_classes": 10, "eps": EPS, "attack_steps": 3, **kw}
    return create_method(name, cfg, student, teachers, **kw), student, teachers


def hand_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per-element p (log p - log q) from the definition."""
    log_p = p_logits - torch.logsumexp(p_logits, 1, keepdim=True)
    log_q = q_logits - torch.logsumexp(q_logits, 1, keepdim=True)
    return log_p.exp() * (log_p - log_q)


# ---------------------------------------------------------------- registry and configs
def test_all_methods_registered_with_documented_configs():
    assert set(ALL) <= set(list_methods())  # other modules may register more
    for name in ALL:
        cls = METHODS.get(name)
        assert cls.name == name and issubclass(cls.Config, MethodConfig)
        assert set(cls.teachers) <= {"clean", "robust"}
        for field, info in cls.Config.model_fields.items():
            assert info.description, f"{name}.{field} has no description"
        cfg = cls.Config()
        with pytest.raises(Exception):  # frozen
            setattr(cfg, next(iter(cls.Config.model_fields), "x"), 1)
    assert METHODS.get("ciard").teachers == ("clean", "robust") and METHODS.get("ard").teachers == ("robust",)
    assert METHODS.get("pgd_at").teachers == () and METHODS.get("natural").teachers == ()


def test_defaults_from_the_papers():
    assert make_config("trades").beta == 6.0
    ard = make_config("ard")
    assert (ard.alpha, ard.temperature) == (1.0, 30.0)
    rs = make_config("rslad")
    assert (rs.adv_weight, rs.nat_weight) == (5 / 6, 1 / 6)
    m, c = make_config("mtard"), make_config("ciard")
    assert m.adaptive_weights and not c.adaptive_weights and (c.rob_weight, c.nat_weight) == (1.0, 1.0)
    assert (c.temp_lr, c.temp_min, c.temp_max, c.weight_lr) == (0.001, 1.0, 10.0, 0.025)
    assert (c.teacher_lr, c.teacher_momentum, c.teacher_weight_decay) == (1e-4, 0.1, 2e-4)
    assert c.push_temperature == 5.0 and c.push_loss and c.teacher_retraining and c.teacher_clean_bn_pass
    assert c.shrink_mode == "per_batch" and m.shrink_mode == "once"
    assert [round(f * 300) for f in c.shrink_milestones] == [215, 260, 285]
    assert round(c.teacher_start_fraction * 300) == 50


def test_config_errors_name_the_field():
    with pytest.raises(RecipeError, match="push_los"):
        make_config("ciard", {"push_los": True})
    with pytest.raises(RecipeError, match="beta"):
        make_config("trades", {"beta": -1})
    with pytest.raises(RecipeError, match="temp_min <= temp_init"):
        make_config("ciard", {"temp_init": 20.0})
    with pytest.raises(UsageError, match="Did you mean 'ciard'"):
        make_config("ciardd")
    assert make_config("ciard", {"shrink_milestones": [0.5]}).shrink_milestones == (0.5,)
    with pytest.raises(UsageError, match="takes a CiardConfig"):
        make_config("ciard", make_config("mtard"))


def test_missing_teacher_is_a_usage_error():
    with pytest.raises(UsageError, match="needs a clean teacher and a robust teacher; missing: clean"):
        create_method("ciard", None, tiny(0), {"robust": tiny(1)}, num_classes=10, eps=EPS)
    with pytest.raises(UsageError, match="missing: robust"):
        create_method("ard", None, tiny(0), {}, num_classes=10, eps=EPS)
    create_method("pgd_at", None, tiny(0), None, num_classes=10, eps=EPS)


# ---------------------------------------------------------------- every method, one step
@pytest.mark.parametrize("name", ALL)
def test_one_step_backprops_to_the_student_only(name):
    method, student, teachers = build(name)
    x, y = batch()
    res = method.train_step(x, y, epoch=0)
    assert isinstance(res, StepResult) and res.loss.ndim == 0 and torch.isfinite(res.loss)
    assert res.loss.requires_grad and not res.x_adv.requires_grad
    assert all(isinstance(v, float) and math.isfinite(v) for v in res.metrics.values()), res.metrics
    assert (res.x_adv - x).abs().max() <= EPS + 1e-6 and res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    if name != "natural":
        assert not torch.equal(res.x_adv, x)
    res.loss.backward()
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    for t in teachers.values():
        assert all(p.grad is None for p in t.parameters())
    extra = method.after_student_step()
    assert all(isinstance(v, float) for v in extra.values())
    # teachers a method does not train are frozen
    trainable = method.trainable_teachers()
    for role in method.teachers:
        if role not in trainable:
            assert not teachers[role].training and not any(p.requires_grad for p in teachers[role].parameters())
    assert isinstance(method.state_dict(), dict)


def test_pgd_at_loss_is_ce_on_its_x_adv():
    method, student, _ = build("pgd_at")
    x, y = batch()
    res = method.train_step(x, y, 0)
    assert student.training
    student.train()
    with torch.no_grad():
        expect = F.cross_entropy(student(res.x_adv), y)
        assert res.loss.item() == pytest.approx(expect.item(), rel=1e-6)
        student.eval()  # the attack did its job: higher CE than the clean batch
        assert F.cross_entropy(student(res.x_adv), y) > F.cross_entropy(student(x), y)


def test_trades_loss_by_hand():
    method, student, _ = build("trades", {"beta": 6.0})
    x, y = batch()
    res = method.train_step(x, y, 0)
    student.train()
    with torch.no_grad():
        ln, la = student(x).double(), student(res.x_adv).double()
        ce = -(ln - torch.logsumexp(ln, 1, keepdim=True))[torch.arange(len(y)), y].mean()
        kl = hand_kl(ln, la).sum() / len(y)  # batchmean
    assert res.metrics["loss_nat"] == pytest.approx(ce.item(), rel=1e-5)
    assert res.metrics["loss_rob"] == pytest.approx(kl.item(), rel=1e-4, abs=1e-7)
    assert res.loss.item() == pytest.approx((ce + 6.0 * kl).item(), rel=1e-5)
    # the KL target is not detached (official TRADES): gradients flow through S(x) in both terms
    res.loss.backward()


def test_rslad_loss_by_hand():
    method, student, teachers = build("rslad")
    x, y = batch()
    res = method.train_step(x, y, 0)
    student.train()
    with torch.no_grad():
        t = teachers["robust"].eval()(x).double()
        adv = hand_kl(t, student(res.x_adv).double()).mean()
        nat = hand_kl(t, student(x).double()).mean()
    assert res.loss.item() == pytest.approx((5 / 6 * adv + 1 / 6 * nat).item(), rel=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_ard_loss_by_hand(alpha):
    method, student, teachers = build("ard", {"alpha": alpha, "temperature": 30.0})
    x, y = batch()
    res = method.train_step(x, y, 0)
    student.train()
    with torch.no_grad():
        t = teachers["robust"].eval()(x).double()
        kd = 900 * hand_kl(t / 30, student(res.x_adv).double() / 30).mean()
        ce = F.cross_entropy(student(x).double(), y)
    # at T = 30 the softened distributions nearly coincide: float32 cancellation limits agreement to ~1e-3
    assert res.metrics["loss_kd"] == pytest.approx(kd.item(), rel=5e-3)
    assert res.loss.item() == pytest.approx((alpha * kd + (1 - alpha) * ce).item(), rel=5e-3)
    expect = alpha * res.metrics["loss_kd"] + (1 - alpha) * res.metrics.get("loss_ce", 0.0)
    assert res.loss.item() == pytest.approx(expect, rel=1e-6)
    assert ("loss_ce" in res.metrics) == (alpha < 1)


def test_natural_is_plain_ce():
    method, student, _ = build("natural")
    x, y = batch()
    res = method.train_step(x, y, 0)
    with torch.no_grad():
        assert res.loss.item() == pytest.approx(F.cross_entropy(student.train()(x), y).item(), rel=1e-6)
    assert torch.equal(res.x_adv, x)


def test_pgd_at_on_digits_lowers_the_loss():
    from ciard_deploy.data import create_dataset, iterate_batches

    ds = create_dataset("digits", "train")
    torch.manual_seed(0)
    student = create_model("tiny_cnn", 10, in_chans=1)
    method = create_method("pgd_at", None, student, {}, num_classes=10, eps=EPS, attack_steps=3, step_size=EPS / 2)
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    losses = []
    batches = iterate_batches(ds, 32, shuffle=True, generator=g)
    for _ in range(30):
        x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        res = method.train_step(x, y, 0)
        res.loss.backward()
        opt.step()
        method.after_student_step()
        losses.append(res.loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses
