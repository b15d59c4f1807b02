"""The speed switches (train.data_on_device, train.fused_optimizer, train.compile) on CPU: they stay out of
the hash at their defaults, and each one trains what the plain loop trains."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ciard_deploy.config import recipe_from_dict
from ciard_deploy.config.sections import TrainConfig
from ciard_deploy.data import ArrayDataset, iterate_batches
from ciard_deploy.data.base import DatasetInfo
from ciard_deploy.distill.losses import pgd_train_attack
from ciard_deploy.distill.speed import compile_in_place, place_train_data, resolve_data_on_device, student_sgd
from ciard_deploy.distill.trainer import run
from ciard_deploy.models import create_model

pytestmark = pytest.mark.unit

TRAIN = {"kind": "train", "model": {"arch": "tiny_cnn"}, "method": {"name": "natural"},
         "data": {"train_subset": 96, "batch_size": 32, "holdout": 16},
         "train": {"epochs": 1, "device": "cpu", "eval_attack": None, "select_by": "clean", "eval_n": 16,
                   "final_eval_n": 16, "final_attacks": []}}


def with_train(**kw):
    return recipe_from_dict({**TRAIN, "train": {**TRAIN["train"], **kw}})


def test_speed_switches_at_their_defaults_keep_the_hash_and_others_change_it():
    base = with_train()
    assert with_train(data_on_device="auto", fused_optimizer=False, compile=False).hash == base.hash
    assert "data_on_device" not in base.to_yaml() and "compile" not in base.to_yaml()
    changed = {with_train(data_on_device=True).hash, with_train(fused_optimizer=True).hash,
               with_train(compile=True).hash}
    assert len(changed) == 3 and base.hash not in changed
    assert TrainConfig(data_on_device=False).data_on_device == "false"  # YAML's booleans are accepted
    assert "data_on_device: 'true'" in with_train(data_on_device=True).to_yaml()


def test_data_on_device_auto_is_cuda_only_and_fits_a_quarter_of_free_memory():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not resolve_data_on_device("auto", cpu, 10)
    assert resolve_data_on_device("true", cpu, 10) and not resolve_data_on_device("false", cuda, 10, 1 << 40)
    cifar = 50_000 * 3 * 32 * 32  # uint8 bytes
    assert resolve_data_on_device("auto", cuda, cifar, free_bytes=80 << 30)
    assert not resolve_data_on_device("auto", cuda, cifar, free_bytes=400 << 20)


def test_placed_training_set_gives_the_same_augmented_batches():
    gen = torch.Generator().manual_seed(0)
    info = DatasetInfo("toy", tuple("abc"), (3, 8, 8), (0.5,) * 3, (0.5,) * 3, augment="crop_flip", crop_padding=2)
    ds = ArrayDataset(torch.randint(0, 256, (40, 3, 8, 8), generator=gen, dtype=torch.uint8),
                      torch.randint(0, 3, (40,), generator=gen), info)
    placed = place_train_data(ds, "true", torch.device("cpu"))
    assert placed is not ds and place_train_data(ds, "auto", torch.device("cpu")) is ds
    order = torch.randperm(40, generator=gen)
    a = list(iterate_batches(ds, 16, generator=torch.Generator().manual_seed(3), augment=True, indices=order))
    b = list(iterate_batches(placed, 16, generator=torch.Generator().manual_seed(3), augment=True, indices=order))
    assert len(a) == 3 and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][0], ds.tensors(order[:16])[0])  # augmentation did run


def test_fused_sgd_steps_like_the_default_one():
    torch.manual_seed(0)
    m1 = create_model("tiny_cnn", 10, 1, None, None)
    m2 = copy.deepcopy(m1)
    optim = recipe_from_dict(TRAIN).optim
    o1, o2 = student_sgd(m1.parameters(), optim, False), student_sgd(m2.parameters(), optim, True)
    assert o2.defaults["fused"] and not o1.defaults.get("fused")
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(3):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)


def test_a_run_with_data_on_device_and_fused_sgd_trains_what_the_plain_run_trains(tmp_path):
    plain = run(with_train(), tmp_path / "plain", handle_signals=False)
    fast = run(with_train(data_on_device=True, fused_optimizer=True), tmp_path / "fast", handle_signals=False)
    assert plain["status"] == fast["status"] == "complete"
    lp, lf = (json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[-1]) for d in ("plain", "fast"))
    assert lf["loss"] == pytest.approx(lp["loss"], rel=1e-4)
    assert lf["images"] == lp["images"] == 80


def test_compile_in_place_keeps_parameters_and_state_dict_keys():
    m = create_model("tiny_cnn", 10, 1, None, None)
    keys, params = list(m.state_dict()), list(m.parameters())
    compile_in_place([m])  # lazy: nothing compiles before the first call
    assert list(m.state_dict()) == keys and list(m.parameters()) == params


def test_training_pgd_loop_never_reads_a_value_back_to_the_host(monkeypatch):
    """pgd_train_attack (every method's PGD-10) has no .item()/bool()/float() in its steps: on CUDA no
    step waits for the GPU."""
    model = create_model("tiny_cnn", 10, 1, None, None)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))

    def sync(*_a, **_k):
        raise AssertionError("a host sync inside the PGD loop")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    x_adv = pgd_train_attack(model, x, y, eps=0.1, steps=3, step_size=0.03)
    monkeypatch.undo()
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """torch.compile (inductor, C++ on CPU) of a tiny run: ~30 s of compiling on a 2-core machine."""
    plain = run(with_train(), tmp_path / "plain", handle_signals=False)
    comp = run(with_train(compile=True), tmp_path / "comp", handle_signals=False)
    assert plain["status"] == comp["status"] == "complete"
    lp, lc = (json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[-1]) for d in ("plain", "comp"))
    assert lc["loss"] == pytest.approx(lp["loss"], rel=1e-3)


def _mtpgd_with_masks(model, x, y, eps, steps, targets):
    """MultiTargetPGD as written before its boolean-mask updates became sync-free (the reference)."""
    import math

    from ciard_deploy.attacks.torch_ops import project_linf

    with torch.no_grad():
        logits = model(x)
    best, broken = x.clone(), logits.argmax(1) != y
    ranked = logits.clone()
    ranked[torch.arange(len(y)), y] = -torch.inf
    order = ranked.argsort(dim=1, descending=True)
    sizes = [eps / 20 + (eps / 2 - eps / 20) * 0.5 * (1 + math.cos(math.pi * i / max(steps - 1, 1)))
             for i in range(steps)]
    for t in range(min(targets, logits.shape[1] - 1)):
        active = torch.nonzero(~broken).flatten()
        if len(active) == 0:
            break
        xa, xc, ya, target = x[active].clone(), x[active], y[active], order[active, t]
        alive = torch.ones(len(active), dtype=torch.bool)
        for step in sizes:
            xa.requires_grad_(True)
            with torch.enable_grad():
                z = model(xa)
                margin = z.gather(1, target[:, None]).squeeze(1) - z.gather(1, ya[:, None]).squeeze(1)
                (grad,) = torch.autograd.grad(margin.sum(), xa)
            with torch.no_grad():
                now = (z.argmax(1) != ya) & alive
                if bool(now.any()):
                    best[active[now]] = xa.detach()[now]
                    broken[active[now]] = True
                    alive &= ~now
                if not bool(alive.any()):
                    break
                xa = project_linf(xa.detach() + step * grad.sign(), xc, eps)
        else:
            with torch.no_grad():
                now = (model(xa).argmax(1) != ya) & alive
                best[active[now]] = xa[now]
                broken[active[now]] = True
    return best


def test_multitarget_pgd_without_mask_syncs_finds_the_same_images():
    from ciard_deploy.attacks.pgd import MultiTargetPGD

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.rand(24, 1, 8, 8)
    y = model(x).argmax(1)  # all correct at the start: the attack has work to do
    got = MultiTargetPGD(0.05, steps=6, targets=3)._perturb(model, x, y)
    want = _mtpgd_with_masks(model, x, y, 0.05, 6, 3)
    broken = (got != x).flatten(1).any(1)
    assert torch.equal(got, want) and 0 < int(broken.sum()) < 24
