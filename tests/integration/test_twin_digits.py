"""The twins of real exported artifacts agree with onnxruntime: the session's PGD-trained small_cnn on digits
(FP32, FP16, INT8 QDQ), and a random resnet18_tiny on 3x32x32 images (FP32, INT8).

Each twin is compared with the artifact in onnxruntime (CPU, one thread) on the whole digits test split
(360 images), on PGD-20 images crafted against the twin itself, and on random images in the eps ball.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ciard_deploy import export
from ciard_deploy.runtime import open_backend
from ciard_deploy.twin import TRUST_THRESHOLD, TwinFidelity, build_twin, measure_fidelity, random_in_ball

pytestmark = pytest.mark.integration
EPS = 0.15  # the session student's training eps
FILES = ["model.onnx", "model.fp16.onnx", "model.int8.onnx"]


@pytest.fixture(scope="session")
def digits_exports(digits_robust_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FP32 + FP16 + INT8 (mixed calibration) exports of the session's robust small_cnn."""
    out = tmp_path_factory.mktemp("twin_exports") / "digits"
    export.run(digits_robust_run, out, ["onnx", "onnx-fp16", "onnx-int8"], n=64, calib="mixed", calib_n=128,
               threads=1)
    return out


@pytest.fixture(scope="session")
def digits_test() -> tuple[torch.Tensor, torch.Tensor]:
    from ciard_deploy.data.digits import load_digits_split

    return load_digits_split("test").tensors()


def fidelity_of(path: Path, x: torch.Tensor, y: torch.Tensor, **twin_options) -> TwinFidelity:
    from ciard_deploy.attacks import create_attack

    twin = build_twin(path, **twin_options)
    x_adv = create_attack("pgd20", EPS, seed=0).run(twin, x, y)
    sets = {"clean": x.numpy(), "adversarial": x_adv.numpy(), "random_in_ball": random_in_ball(x.numpy(), EPS, 0)}
    with open_backend(path, threads=1) as runtime:
        return measure_fidelity(twin, runtime.predict, sets)


@pytest.mark.parametrize("file", FILES)
def test_twin_agrees_with_onnxruntime(digits_exports, digits_test, file):
    x, y = digits_test
    fid = fidelity_of(digits_exports / file, x, y)
    print(f"{file}: {fid.line()}")
    assert set(fid.per_set) == {"clean", "adversarial", "random_in_ball"}
    assert all(s.n == len(x) for s in fid.per_set.values())
    assert fid.trusted and fid.agreement >= TRUST_THRESHOLD, fid.line()
    if file == "model.onnx":
        assert fid.max_abs_diff < 1e-4, fid.line()
    elif file == "model.fp16.onnx":  # onnxruntime's CPU provider computes it in float32 on float16 weights
        assert fid.max_abs_diff < 1e-4, fid.line()
    else:  # one int8 step of the logits' scale at most, and most rows bit-exact
        assert min(s.bit_exact for s in fid.per_set.values()) > 0.5, fid.line()


def test_fp16_twin_with_float16_rounding_agrees_too(digits_exports, digits_test):
    x, y = digits_test
    fid = fidelity_of(digits_exports / "model.fp16.onnx", x, y, half="emulate")
    print(f"model.fp16.onnx (half=emulate): {fid.line()}")
    assert fid.trusted and fid.max_abs_diff < 0.05, fid.line()


@pytest.mark.parametrize("file", FILES)
def test_twin_input_gradient_is_finite_and_nonzero(digits_exports, digits_test, file):
    x, y = digits_test
    twin = build_twin(digits_exports / file)
    xs = x[:64].clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(twin(xs), y[:64])
    (grad,) = torch.autograd.grad(loss, xs)
    assert torch.isfinite(grad).all() and (grad.abs().flatten(1).sum(1) > 0).all()
    assert twin.precision == {"model.onnx": "fp32", "model.fp16.onnx": "fp16", "model.int8.onnx": "int8"}[file]


# --------------------------------------------------------------------------- a CIFAR-shaped resnet18_tiny
@pytest.fixture(scope="session")
def resnet_exports(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A random resnet18_tiny (BatchNorm statistics randomized too) as a ciard checkpoint over a 3x32x32 image
    folder made here, exported FP32 + INT8 by ``export.run``; and the folder's test images."""
    from PIL import Image

    from ciard_deploy.data import create_dataset, get_dataset_info
    from ciard_deploy.checkpoints import CheckpointMeta, save_checkpoint
    from ciard_deploy.models import create_model

    d = tmp_path_factory.mktemp("twin_resnet")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 4), ("test", 6)):
        for c in range(10):
            (d / "images" / split / f"c{c}").mkdir(parents=True)
            for i in range(per_class):  # smooth random images: low-frequency noise, upsampled
                small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                img = Image.fromarray(small).resize((32, 32), Image.BILINEAR)
                img.save(d / "images" / split / f"c{c}" / f"{i}.png")
    root = str(d / "images")
    info = get_dataset_info("imagefolder", root)
    torch.manual_seed(0)
    model = create_model("resnet18_tiny", 10, 3, info.mean, info.std)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    save_checkpoint(d / "run" / "student_best", model.eval(),
                    CheckpointMeta("resnet18_tiny", 10, info.input_shape, info.mean, info.std, "imagefolder",
                                   info.classes))
    export.run(d / "run", d / "export", ["onnx", "onnx-int8"], n=40, calib="clean", calib_n=40, threads=1,
               data_root=root, reference_attack=None, check=False)
    x, _ = create_dataset("imagefolder", "test", root=root).tensors()
    return d / "export", x.numpy()


@pytest.mark.parametrize("file", ["model.onnx", "model.int8.onnx"])
def test_resnet18_tiny_twin_agrees(resnet_exports, file):
    out, x = resnet_exports
    twin = build_twin(out / file)
    assert {"Conv", "Add", "Relu", "Gemm"} <= set(twin.op_types)
    sets = {"clean": x, "random_in_ball": random_in_ball(x, 8 / 255, 0)}
    with open_backend(out / file, threads=1) as runtime:
        fid = measure_fidelity(twin, runtime.predict, sets)
    print(f"resnet18_tiny {file}: {fid.line()}")
    assert fid.trusted, fid.line()
    if file == "model.onnx":
        assert fid.max_abs_diff < 1e-4, fid.line()
