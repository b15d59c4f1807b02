"""Fixtures for the verify unit tests, torch-free: a real onnxruntime model and packs made in numpy.

The model is a linear classifier on scikit-learn's 8x8 digits (ridge regression to one-hot
targets, ~95 % test accuracy), written as a two-node ONNX graph (Flatten -> Gemm) with the
``onnx`` helpers, so onnxruntime really runs it. Its adversarial images are exact FGSM and PGD
on the same linear model, computed in numpy: the pack's "reference" is the model itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ciard_deploy.verify.pack import RobustnessPack, save_pack
from ciard_deploy.verify.pack_build import pack_from_arrays

EPS = 0.1
SOURCE_SHA = "ab" * 32


@pytest.fixture(scope="session")
def digits_np() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    return {"x_train": x[:1200], "y_train": y[:1200], "x_test": x[1200:], "y_test": y[1200:]}


@pytest.fixture(scope="session")
def linear(digits_np) -> tuple[np.ndarray, np.ndarray]:
    """(W (64, 10), b (10,)): ridge regression of one-hot labels on centred pixels."""
    x = digits_np["x_train"].reshape(len(digits_np["x_train"]), -1).astype(np.float64)
    t = np.eye(10)[digits_np["y_train"]]
    mu = x.mean(0)
    xc = x - mu
    w = np.linalg.solve(xc.T @ xc + 1.0 * np.eye(64), xc.T @ (t - t.mean(0)))
    b = t.mean(0) - mu @ w
    return (8.0 * w).astype(np.float32), (8.0 * b).astype(np.float32)  # scaled: softmax-sized logits


def logits_np(wb: tuple[np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    w, b = wb
    return (x.reshape(len(x), -1) @ w + b).astype(np.float32)


def grad_np(wb: tuple[np.ndarray, np.ndarray], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """d CE / d x for the linear model."""
    z = logits_np(wb, x).astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return (p @ wb[0].T.astype(np.float64)).reshape(x.shape)


def fgsm_np(wb, x, y, eps):
    return np.clip(x + eps * np.sign(grad_np(wb, x, y)), 0, 1).astype(np.float32)


def pgd_np(wb, x, y, eps, steps=10):
    xa = x.copy()
    for _ in range(steps):
        xa = xa + (eps / 4) * np.sign(grad_np(wb, xa, y))
        xa = np.clip(np.minimum(np.maximum(xa, x - eps), x + eps), 0, 1)
    return xa.astype(np.float32)


def make_linear_onnx(path: Path, wb: tuple[np.ndarray, np.ndarray], metadata: dict | None = None,
                     shape: tuple[int, int, int] = (1, 8, 8)) -> Path:
    """A real ONNX model: Flatten -> Gemm, float32 NCHW input ``input``, output ``logits``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ciard_deploy.runtime.metadata import encode_metadata

    w, b = wb
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1), helper.make_node("Gemm", ["flat", "W", "b"], ["logits"])],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", w.shape[1]])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    for k, v in encode_metadata(metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def linear_pack(wb, x, y, eps=EPS, attacks=("pgd10", "fgsm"), sha=SOURCE_SHA, num_classes=10) -> RobustnessPack:
    """A pack whose reference is the linear model itself (numpy FGSM/PGD)."""
    from ciard_deploy.attacks.budget import format_eps

    advs, records = [], []
    for name in attacks:
        xa = pgd_np(wb, x, y, eps) if name.startswith("pgd") else fgsm_np(wb, x, y, eps)
        advs.append(xa)
        records.append({"name": name, "label": f"{name}@{format_eps(eps)}", "eps": eps,
                        "settings": {"implementation": "numpy, linear model"}, "seconds": 0.0})
    return pack_from_arrays(x, y, logits_np(wb, x), records, advs, [logits_np(wb, a) for a in advs],
                            model={"sha256": sha, "arch": "linear", "num_classes": num_classes,
                                   "classes": [str(i) for i in range(num_classes)],
                                   "input_shape": list(x.shape[1:]), "dataset": "digits"},
                            data={"dataset": "digits", "split": "test", "seed": 0, "sampling": "first n"},
                            eps=eps)


@pytest.fixture(scope="session")
def linear_onnx(tmp_path_factory, linear) -> Path:
    meta = {"arch": "linear", "num_classes": 10, "precision": "fp32", "format": "onnx", "dataset": "digits",
            "eps": EPS, "source_sha256": SOURCE_SHA, "classes": [str(i) for i in range(10)]}
    return make_linear_onnx(tmp_path_factory.mktemp("linear") / "linear.onnx", linear, meta)


@pytest.fixture(scope="session")
def test_xy(digits_np) -> tuple[np.ndarray, np.ndarray]:
    """120 test images, the first 12 of each class."""
    x, y = digits_np["x_test"], digits_np["y_test"]
    idx = np.sort(np.concatenate([np.flatnonzero(y == c)[:12] for c in range(10)]))
    return x[idx], y[idx]


@pytest.fixture(scope="session")
def pack_file(tmp_path_factory, linear, test_xy) -> Path:
    p = tmp_path_factory.mktemp("pack") / "pack.npz"
    save_pack(linear_pack(linear, *test_xy), p)
    return p


def noise_pack(linear: np.ndarray, x: np.ndarray, y: np.ndarray, path: Path) -> Path:
    """A pack whose only 'attack' is a tiny random perturbation (0.01, signed): it transfers almost
    nothing, so any real attack on the runtime does better (V101). Saved at ``path``."""
    noise = np.clip(x + np.float32(0.01) * np.sign(np.random.default_rng(0).normal(size=x.shape)), 0, 1)
    noise = noise.astype(np.float32)
    pack = pack_from_arrays(x, y, logits_np(linear, x), [{"name": "noise", "label": "noise@0.1", "eps": 0.1}], [noise],
                            [logits_np(linear, noise)], model={"sha256": SOURCE_SHA, "num_classes": 10,
                                                               "input_shape": [1, 8, 8]},
                            data={"dataset": "digits", "seed": 0}, eps=0.1)
    return save_pack(pack, path)


class Helpers:
    """The numpy helpers above, for test modules (conftest is not importable under importlib mode)."""

    eps = EPS
    source_sha = SOURCE_SHA
    logits = staticmethod(logits_np)
    fgsm = staticmethod(fgsm_np)
    pgd = staticmethod(pgd_np)
    make_onnx = staticmethod(make_linear_onnx)
    pack = staticmethod(linear_pack)
    noise_pack = staticmethod(noise_pack)


@pytest.fixture(scope="session")
def h() -> type[Helpers]:
    return Helpers
