"""CIARD and MTARD step details against hand computations, with teachers whose outputs we choose.

A ``LookupTeacher`` returns a chosen logit row for each clean image of the batch: the
adversarial images stay within 8/255 of their clean image while random images are ~1 apart,
so the nearest clean image identifies the sample and the teacher's output is known exactly.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from ciard_deploy.distill.methods import create_method
from ciard_deploy.errors import ArtifactError
from ciard_deploy.models import create_model

pytestmark = pytest.mark.unit


EPS = 8 / 255
N, C = 12, 10


class LookupTeacher(nn.Module):
    """``table[i]`` for inputs nearest (L-inf) to ``x0[i]``, plus a zero-initialised linear term
    (trainable weights that leave the first outputs exactly equal to the table)."""

    def __init__(self, x0: torch.Tensor, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("x0", x0.flatten(1).clone())
        self.register_buffer("table", table.clone().float())
        self.lin = nn.Linear(self.x0.shape[1], table.shape[1])
        nn.init.zeros_(self.lin.weight)
        nn.init.zeros_(self.lin.bias)
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        idx = (x.flatten(1)[:, None, :] - self.x0[None]).abs().amax(-1).argmin(1)
        return self.table[idx] + self.lin(x.flatten(1))


class Recorder(nn.Module):
    """Records (training, grad enabled) at each call of the wrapped model."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        return self.net(x)


def tiny(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("tiny_cnn", C, in_chans=1)


def data(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % C


def table_with_predictions(pred: torch.Tensor, margin: float = 3.0, seed: int = 1) -> torch.Tensor:
    """Random logits whose argmax is ``pred`` (by ``margin`` over the rest)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(len(pred), C, generator=g)
    t[torch.arange(len(pred)), pred] = t.max(1).values + margin
    return t


def log_softmax64(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    return z - torch.logsumexp(z, 1, keepdim=True)


def kl_elementwise(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """mean over samples and classes of p (log p - log q), by hand in float64."""
    lp, lq = log_softmax64(p_logits), log_softmax64(q_logits)
    return (lp.exp() * (lp - lq)).mean()


def ciard(student, tc, tr, **cfg):
    kw = {k: cfg.pop(k) for k in ("epochs", "steps_per_epoch") if k in cfg}
    return create_method("ciard", cfg, student, {"clean": tc, "robust": tr}, num_classes=C, eps=EPS,
                         attack_steps=3, **kw)


# ---------------------------------------------------------------- push loss
FOOLED = [1, 4, 5, 11]


def push_setup(fooled: list[int], **cfg):
    x, y = data()
    pred = y.clone()
    for i in fooled:
        pred[i] = (y[i] + 3) % C
    tc = LookupTeacher(x, table_with_predictions(pred, seed=1))
    tr = LookupTeacher(x, table_with_predictions(y, seed=2))
    student = tiny(0)
    return ciard(student, tc, tr, **cfg), student, tc, tr, x, y


def test_push_uses_exactly_the_samples_where_the_clean_teacher_is_fooled():
    method, student, tc, tr, x, y = push_setup(FOOLED)
    res = method.train_step(x, y, 0)
    m = res.metrics
    student.train()
    with torch.no_grad():
        s_nat, s_adv = student(x), student(res.x_adv)
    l_rob = kl_elementwise(tr.table, s_adv)  # tau = 1 at the first step
    l_nat = kl_elementwise(tc.table, s_nat)
    sel = torch.tensor(FOOLED)
    l_push = kl_elementwise(tc.table[sel], s_adv[sel] / 5.0)  # averaged over the 4 selected samples only
    mag = lambda v: math.floor(math.log10(v))  # noqa: E731
    w = 10.0 ** (min(mag(l_rob.item()), mag(l_nat.item())) - mag(l_push.item()))
    assert m["push_n"] == 4 and m["clean_fooled"] == 4
    assert m["loss_rob"] == pytest.approx(l_rob.item(), rel=1e-5)
    assert m["loss_nat"] == pytest.approx(l_nat.item(), rel=1e-5)
    assert m["loss_push"] == pytest.approx(l_push.item(), rel=1e-5)
    assert m["push_weight"] == w
    assert res.loss.item() == pytest.approx((l_rob + l_nat - w * l_push).item(), rel=1e-5)
    # any other selection gives another value: the term really is restricted to FOOLED
    other = kl_elementwise(tc.table[torch.tensor([0, 1, 4, 5])], s_adv[torch.tensor([0, 1, 4, 5])] / 5.0)
    assert abs(other.item() - m["loss_push"]) > 1e-4


def test_push_skipped_when_the_clean_teacher_is_never_fooled():
    method, student, tc, tr, x, y = push_setup([])
    res = method.train_step(x, y, 0)
    m = res.metrics
    assert m["push_n"] == 0 and m["loss_push"] == 0 and m["push_weight"] == 0 and m["clean_fooled"] == 0
    assert (m["w_rob"], m["w_nat"]) == (1.0, 1.0)
    assert res.loss.item() == pytest.approx(m["loss_rob"] + m["loss_nat"], rel=1e-6)


def test_push_off_and_batchmean_reduction():
    method, *_, x, y = push_setup(FOOLED, push_loss=False)
    res = method.train_step(x, y, 0)
    assert res.metrics["push_n"] == 0
    assert res.loss.item() == pytest.approx(res.metrics["loss_rob"] + res.metrics["loss_nat"], rel=1e-6)
    # batchmean: the push term sums over classes and averages over the selected samples
    method, student, tc, tr, x, y = push_setup(FOOLED, kl_reduction="batchmean")
    res = method.train_step(x, y, 0)
    sel = torch.tensor(FOOLED)
    with torch.no_grad():
        s_adv = student.train()(res.x_adv)
    assert res.metrics["loss_push"] == pytest.approx(C * kl_elementwise(tc.table[sel], s_adv[sel] / 5).item(), rel=1e-5)
    assert res.metrics["loss_rob"] == pytest.approx(C * kl_elementwise(tr.table, s_adv).item(), rel=1e-5)


# ---------------------------------------------------------------- temperatures
def temp_setup(robust_peaked: bool, **cfg):
    x, y = data()
    peaked = table_with_predictions(y, margin=8.0, seed=3)
    flat = 0.1 * torch.randn(N, C, generator=torch.Generator().manual_seed(4))
    tr = LookupTeacher(x, peaked if robust_peaked else flat)
    tc = LookupTeacher(x, flat if robust_peaked else peaked)
    student = tiny(0)
    cfg.setdefault("epochs", 10)  # milestones at epochs 6, 8, 9: no shrink in epoch 0
    return ciard(student, tc, tr, push_loss=False, **cfg), student, tc, tr, x, y


def entropy64(z: torch.Tensor, T: float) -> float:
    lp = log_softmax64(z / T)
    return -(lp.exp() * lp).sum(1).mean().item()


def test_temperatures_take_one_step_toward_equal_entropies_within_bounds():
    method, student, tc, tr, x, y = temp_setup(robust_peaked=True)
    res = method.train_step(x, y, 0)
    assert res.metrics["entropy_robust"] == pytest.approx(entropy64(tr.table, 1.0), rel=1e-5)
    assert res.metrics["entropy_clean"] == pytest.approx(entropy64(tc.table, 1.0), rel=1e-5)
    assert res.metrics["entropy_robust"] < res.metrics["entropy_clean"]
    assert (method.tau_robust, method.tau_clean) == (1.0, 1.0)  # committed only after the student step
    method.after_student_step()
    # robust teacher less entropic: its temperature goes up one step; the clean one is held at the bound 1
    assert method.tau_robust == pytest.approx(1.001, abs=1e-12) and method.tau_clean == 1.0
    # the next step distils with the new temperature
    res2 = method.train_step(x, y, 0)
    with torch.no_grad():
        s_adv = student.train()(res2.x_adv)
    assert res2.metrics["tau_robust"] == pytest.approx(1.001, abs=1e-12)
    assert res2.metrics["loss_rob"] == pytest.approx(kl_elementwise(tr.table / 1.001, s_adv).item(), rel=1e-5)
    method.after_student_step()
    assert method.tau_robust == pytest.approx(1.002, abs=1e-12)


def test_temperatures_clamped_at_the_upper_bound_and_mirrored():
    method, *_, x, y = temp_setup(robust_peaked=True, temp_init=10.0)
    method.train_step(x, y, 0)
    method.after_student_step()
    assert method.tau_robust == 10.0 and method.tau_clean == pytest.approx(9.999, abs=1e-12)
    method, *_, x, y = temp_setup(robust_peaked=False, temp_init=5.0)
    method.train_step(x, y, 0)
    method.after_student_step()
    assert method.tau_robust == pytest.approx(4.999, abs=1e-12) and method.tau_clean == pytest.approx(5.001, abs=1e-12)
    method, *_, x, y = temp_setup(robust_peaked=True, adaptive_temperatures=False)
    method.train_step(x, y, 0)
    method.after_student_step()
    assert (method.tau_robust, method.tau_clean) == (1.0, 1.0)


# ---------------------------------------------------------------- adaptive weights (MTARD rule)
def test_mtard_adaptive_weights_update_rule():
    x1, y1 = data(N, seed=0)
    x2, y2 = data(N, seed=5)
    xs = torch.cat([x1, x2])
    tc = LookupTeacher(xs, table_with_predictions(torch.cat([y1, y2]), seed=6))
    tr = LookupTeacher(xs, table_with_predictions(torch.cat([y1, y2]), seed=7))
    method = create_method("mtard", None, tiny(0), {"clean": tc, "robust": tr}, num_classes=C, eps=EPS,
                           attack_steps=3, epochs=10)  # first milestone at epoch 6: full rates in epoch 0
    r1 = method.train_step(x1, y1, 0)
    assert (r1.metrics["w_rob"], r1.metrics["w_nat"]) == (0.5, 0.5)  # first batch: relative progress 1 and 1
    assert r1.loss.item() == pytest.approx(0.5 * r1.metrics["loss_rob"] + 0.5 * r1.metrics["loss_nat"], rel=1e-6)
    method.after_student_step()
    r2 = method.train_step(x2, y2, 0)
    lr_hat = r2.metrics["loss_rob"] / r1.metrics["loss_rob"]
    ln_hat = r2.metrics["loss_nat"] / r1.metrics["loss_nat"]
    w_r = 0.5 - 0.025 * (0.5 - lr_hat / (lr_hat + ln_hat))
    w_n = 0.5 - 0.025 * (0.5 - ln_hat / (lr_hat + ln_hat))
    w_r, w_n = w_r / (w_r + w_n), w_n / (w_r + w_n)
    assert r2.metrics["w_rob"] == pytest.approx(w_r, rel=1e-12) and r2.metrics["w_nat"] == pytest.approx(w_n, rel=1e-12)
    assert r2.metrics["w_rob"] != 0.5
    assert r2.loss.item() == pytest.approx(w_r * r2.metrics["loss_rob"] + w_n * r2.metrics["loss_nat"], rel=1e-6)
    method.after_student_step()
    assert (method.w_rob, method.w_nat) == (pytest.approx(w_r), pytest.approx(w_n))
    assert (method.init_loss_rob, method.init_loss_nat) == (r1.metrics["loss_rob"], r1.metrics["loss_nat"])
    # MTARD: no push term, frozen teachers in eval mode without gradients, no trainable teacher
    assert "loss_push" not in r2.metrics and method.trainable_teachers() == {}
    assert set(tr.calls) == {(False, False)} and set(tc.calls) == {(False, False)}


def test_ciard_adaptive_weights_option():
    method, *_, x, y = push_setup([], adaptive_weights=True)
    res = method.train_step(x, y, 0)
    assert (res.metrics["w_rob"], res.metrics["w_nat"]) == (0.5, 0.5)


# ---------------------------------------------------------------- step-size shrink
@pytest.mark.parametrize("mode", ["per_batch", "once"])
def test_step_size_shrink_at_milestones(mode):
    method, *_, x, y = temp_setup(robust_peaked=True, epochs=10, shrink_milestones=(0.5,), shrink_mode=mode)
    assert method.milestones == [4]
    for epoch in (0, 3):
        method.on_epoch_start(epoch)
        method.train_step(x, y, epoch)
        method.after_student_step()
        assert (method.temp_lr, method.weight_lr) == (0.001, 0.025)
    method.on_epoch_start(4)
    for k in range(1, 4):
        before = method.tau_robust
        method.train_step(x, y, 4)
        method.after_student_step()
        if mode == "per_batch":  # the reference: every batch of the milestone epoch, after that batch's update
            assert method.temp_lr == pytest.approx(0.001 * 0.1 ** k)
            assert method.tau_robust - before == pytest.approx(0.001 * 0.1 ** (k - 1))
        else:
            assert method.temp_lr == pytest.approx(0.0001) and method.weight_lr == pytest.approx(0.0025)
            assert method.tau_robust - before == pytest.approx(0.0001)
    method.on_epoch_start(5)
    assert method.temp_lr == pytest.approx(0.001 * 0.1 ** 3 if mode == "per_batch" else 0.0001)


# ---------------------------------------------------------------- modes during the step
def test_modes_and_gradients_during_the_ciard_step():
    x, y = data()
    tc = LookupTeacher(x, table_with_predictions(y, seed=1))
    tr_net = Recorder(tiny(2))
    student = Recorder(tiny(0))
    method = ciard(student, tc, tr_net)
    res = method.train_step(x, y, 0)
    # student: clean pass (train), 3 attack steps (eval), adversarial pass (train)
    assert student.calls == [(True, True)] + [(False, True)] * 3 + [(True, True)]
    # robust teacher: clean batch (train, no grad: BN statistics only), then x_adv in train mode with grad
    assert tr_net.calls == [(True, False), (True, True)]
    # clean teacher: eval, no grad, on x then x_adv; frozen
    assert tc.calls == [(False, False), (False, False)]
    assert not any(p.requires_grad for p in tc.parameters())
    assert all(p.requires_grad for p in tr_net.parameters())
    assert set(method.trainable_teachers()) == {"robust"}
    res.loss.backward()
    assert all(p.grad is None for p in tr_net.parameters())  # the student loss does not reach the teachers

    tr_net.calls.clear()
    method = ciard(student, tc, tr_net, teacher_clean_bn_pass=False)
    method.train_step(x, y, 0)
    assert tr_net.calls == [(True, True)]

    tr_net.calls.clear()
    method = ciard(student, tc, tr_net, teacher_retraining=False)
    method.train_step(x, y, 0)
    assert tr_net.calls == [(False, False)] and method.trainable_teachers() == {}
    assert not any(p.requires_grad for p in tr_net.parameters())


# ---------------------------------------------------------------- robust-teacher retraining
def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def params_equal(net: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, snap[k]) for k, p in net.named_parameters())


def test_robust_teacher_changes_only_from_its_start_epoch():
    x, y = data()
    student, tc, tr = tiny(0), tiny(1), Recorder(tiny(2))
    method = ciard(student, tc, tr, epochs=4, teacher_start_fraction=0.5, teacher_lr=0.5)
    assert method.teacher_start_epoch == 2
    tc0, tr0 = snapshot(tc), snapshot(tr)
    lrs = []
    for epoch in range(4):
        method.on_epoch_start(epoch)
        before = snapshot(tr)
        tr.calls.clear()
        method.train_step(x, y, epoch)
        # train mode throughout (BatchNorm follows the batches); a graph on x_adv only once it steps
        assert tr.calls == [(True, False), (True, epoch >= 2)]
        out = method.after_student_step()
        lrs.append(out["teacher_lr"])
        changed = not params_equal(tr, before)
        assert changed == (epoch == 2), epoch  # no step before the start; lr exactly 0 at the last epoch
        assert ("loss_teacher" in out) == (epoch >= 2)
    # 0-based epoch 2 is epoch 3 of 4: t = (3 - 2) / (4 - 2)
    assert lrs[:2] == [0.0, 0.0] and lrs[3] == 0.0
    assert lrs[2] == pytest.approx(0.5 * 0.5 * math.exp(-0.01 * 0.25))
    assert not params_equal(tr, tr0)
    assert all(torch.equal(v, tc0[k]) for k, v in tc.state_dict().items())  # clean teacher: never, not even BN


def test_robust_teacher_step_is_one_sgd_step_on_ce_of_its_adversarial_output():
    x, y = data()
    student, tc, tr = tiny(0), tiny(1), tiny(2)
    method = ciard(student, tc, tr, epochs=3, teacher_start_fraction=0.0, teacher_lr=0.05)
    res = method.train_step(x, y, 0)
    ref = copy.deepcopy(tr).train()
    params = dict(ref.named_parameters())
    loss = nn.functional.cross_entropy(ref(res.x_adv), y)  # train mode: same output as r_adv
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    out = method.after_student_step()
    lr = 0.05 * (0.5 + 0.5 * math.cos(math.pi / 3)) * math.exp(-0.01 / 9)  # epoch 1 of 3, start 0
    assert out["teacher_lr"] == pytest.approx(lr)
    assert out["loss_teacher"] == pytest.approx(loss.item(), rel=1e-6)
    group = method.teacher_optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.1, 2e-4)
    for k, p in tr.named_parameters():  # first SGD step: p - lr * (g + wd * p)
        expect = params[k].detach() - lr * (grads[k] + 2e-4 * params[k].detach())
        torch.testing.assert_close(p.detach(), expect, rtol=1e-5, atol=1e-7)


def test_teacher_never_changes_without_retraining():
    x, y = data()
    student, tc, tr = tiny(0), tiny(1), tiny(2)
    method = ciard(student, tc, tr, epochs=3, teacher_start_fraction=0.0, teacher_lr=0.5, teacher_retraining=False)
    tr0, tc0 = snapshot(tr), snapshot(tc)
    for epoch in range(3):
        method.train_step(x, y, epoch)
        out = method.after_student_step()
        assert "teacher_lr" not in out
    assert all(torch.equal(v, tr0[k]) for k, v in tr.state_dict().items())
    assert all(torch.equal(v, tc0[k]) for k, v in tc.state_dict().items())


# ---------------------------------------------------------------- resume
def run_steps(method, student, opt, batches, epoch):
    results = []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        res = method.train_step(x, y, epoch)
        res.loss.backward()
        opt.step()
        results.append((res, method.after_student_step()))
    return results


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", ["ciard", "mtard"])
def test_state_dict_round_trip_gives_identical_next_steps(name):
    cfg = {"adaptive_weights": True, "temp_lr": 0.01}
    if name == "ciard":
        cfg |= {"teacher_start_fraction": 0.0, "teacher_lr": 0.05, "shrink_milestones": (0.4,)}
    b1, b2, b3 = data(N, 0), data(N, 1), data(N, 2)

    def make(seed):
        student, tc, tr = tiny(seed), tiny(1), tiny(seed + 2)  # the clean teacher is fixed, not checkpointed
        m = create_method(name, cfg, student, {"clean": tc, "robust": tr}, num_classes=C, eps=EPS, attack_steps=3,
                          epochs=3)
        return m, student, tr, torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)

    m, student, tr, opt = make(0)
    m.on_epoch_start(0)
    run_steps(m, student, opt, [b1, b2], 0)
    saved = roundtrip({"method": m.state_dict(), "student": student.state_dict(), "tr": tr.state_dict(),
                       "opt": opt.state_dict()})
    torch.manual_seed(123)
    (a_res, a_out), = run_steps(m, student, opt, [b3], 0)

    m2, student2, tr2, opt2 = make(10)  # different initial weights: everything comes from the checkpoint
    student2.load_state_dict(saved["student"])
    tr2.load_state_dict(saved["tr"])
    opt2.load_state_dict(saved["opt"])
    m2.load_state_dict(saved["method"])
    assert m2.state_dict().keys() == m.state_dict().keys()
    torch.manual_seed(123)
    (b_res, b_out), = run_steps(m2, student2, opt2, [b3], 0)
    assert torch.equal(a_res.x_adv, b_res.x_adv)
    assert a_res.loss.item() == b_res.loss.item()
    assert a_res.metrics == b_res.metrics and a_out == b_out
    assert (m.tau_robust, m.tau_clean, m.w_rob, m.w_nat) == (m2.tau_robust, m2.tau_clean, m2.w_rob, m2.w_nat)
    for (k, p), q in zip(tr.state_dict().items(), tr2.state_dict().values()):
        assert torch.equal(p, q), k
    if name == "ciard":
        assert a_out["loss_teacher"] > 0 and a_res.metrics["w_rob"] != 0.5


def test_load_state_dict_rejects_another_methods_state():
    x, y = data()
    m = ciard(tiny(0), tiny(1), tiny(2))
    sd = m.state_dict()
    sd["method"] = "mtard"
    with pytest.raises(ArtifactError, match="mtard"):
        m.load_state_dict(sd)
    sd = m.state_dict()
    del sd["teacher_optimizer"]
    with pytest.raises(ArtifactError, match="optimizer"):
        m.load_state_dict(sd)


def test_train_step_commits_nothing_until_the_student_step():
    method, student, tc, tr, x, y = temp_setup(robust_peaked=True, adaptive_weights=True)
    a = method.train_step(x, y, 0)
    state = method.state_dict()
    b = method.train_step(x, y, 0)  # e.g. a retried batch: the adaptive state is not advanced twice
    assert method.state_dict() == state
    for k in ("tau_robust", "tau_clean", "w_rob", "w_nat"):
        assert a.metrics[k] == b.metrics[k]
    method.after_student_step()
    assert method.tau_robust == pytest.approx(1.001) and method.steps == 1
    assert method.after_student_step() == {}  # nothing pending
    assert method.steps == 1
