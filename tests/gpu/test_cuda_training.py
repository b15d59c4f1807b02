"""The training path on CUDA: the PGD loop makes no host sync, crops and flips of a batch held on the GPU
are the host's, fused SGD steps like torch's default, and one step in bf16/fp16 + channels_last is finite.

They need a visible NVIDIA GPU; the suite's conftest hides CUDA, so run them in their own process:

    CUDA_VISIBLE_DEVICES=0 python -m pytest -m gpu tests/gpu     (tools/gpu_check.py runs them)
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ciard_deploy.data import ArrayDataset, iterate_batches
from ciard_deploy.data.base import DatasetInfo
from ciard_deploy.distill.losses import pgd_train_attack
from ciard_deploy.distill.speed import place_train_data

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs CUDA (run CUDA_VISIBLE_DEVICES=0 pytest -m gpu tests/gpu)")]
CUDA = torch.device("cuda")


def _model(arch: str = "small_cnn", seed: int = 0) -> torch.nn.Module:
    from ciard_deploy.models import create_model

    torch.manual_seed(seed)
    return create_model(arch, 10, 3, (0.5,) * 3, (0.25,) * 3).to(CUDA)


def test_training_pgd_makes_no_host_sync():
    model = _model()
    x, y = torch.rand(32, 3, 32, 32, device=CUDA), torch.randint(0, 10, (32,), device=CUDA)
    pgd_train_attack(model, x, y, eps=8 / 255, steps=2)  # warm up (cuDNN picks, allocator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x_adv = pgd_train_attack(model, x, y, eps=8 / 255, steps=10)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float((x_adv - x).abs().max()) <= 8 / 255 + 1e-6


def test_training_set_on_the_gpu_gives_the_host_batches():
    gen = torch.Generator().manual_seed(0)
    info = DatasetInfo("toy", tuple("abc"), (3, 32, 32), (0.5,) * 3, (0.5,) * 3, augment="crop_flip")
    ds = ArrayDataset(torch.randint(0, 256, (100, 3, 32, 32), generator=gen, dtype=torch.uint8),
                      torch.randint(0, 3, (100,), generator=gen), info)
    placed = place_train_data(ds, "auto", CUDA)
    assert placed.images.is_cuda
    host = iterate_batches(ds, 32, generator=torch.Generator().manual_seed(1), augment=True)
    dev = iterate_batches(placed, 32, generator=torch.Generator().manual_seed(1), augment=True)
    for (xh, yh), (xd, yd) in zip(host, dev):
        assert xd.is_cuda and torch.equal(xh.to(CUDA), xd) and torch.equal(yh.to(CUDA), yd)


def test_fused_sgd_on_cuda_steps_like_foreach():
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1 = torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4, fused=True)
    x, y = torch.rand(32, 3, 32, 32, device=CUDA), torch.randint(0, 10, (32,), device=CUDA)
    for _ in range(3):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_one_ciard_step_in_each_precision_with_channels_last_is_finite(amp):
    from ciard_deploy.distill.loop import train_step
    from ciard_deploy.distill.methods import create_method

    student, clean, robust = (_model(a, i).to(memory_format=torch.channels_last)
                              for i, a in enumerate(("small_cnn", "small_cnn", "small_cnn_wide")))
    method = create_method("ciard", {"teacher_start_fraction": 0.0}, student, {"clean": clean, "robust": robust},
                           num_classes=10, eps=8 / 255, attack_steps=3, step_size=2 / 255, epochs=2, steps_per_epoch=2)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    x, y = torch.rand(32, 3, 32, 32, device=CUDA), torch.randint(0, 10, (32,), device=CUDA)
    for _ in range(2):
        res, extra, loss = train_step(method, opt, scaler, x, y, 1, CUDA, amp, True)
        assert math.isfinite(loss) and "loss_teacher" in extra
    assert all(torch.isfinite(p).all() for p in student.parameters())
