"""Parity between an artifact's logits and the PyTorch reference, at two levels.

Decision level (top-1 agreement, flips, largest change of the reference class's
probability) gates; element level (max/mean absolute logit difference) is reported only: a
correct FP16 or INT8 model fails any tight element-wise tolerance (Polygraphy's 1e-5 default
fails FP16 engines that predict correctly; NVIDIA/TensorRT#2709). numpy only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class ParityResult:
    """How far an artifact's logits are from the reference's on the same images.

    Truthy when ``top1_agreement >= threshold`` (or when no threshold was set).
    """

    n: int
    top1_agreement: float
    flips: int
    max_abs_diff: float
    mean_abs_diff: float
    max_prob_change: float
    worst_index: int
    threshold: float | None = None

    @property
    def passed(self) -> bool:
        return self.threshold is None or self.top1_agreement >= self.threshold

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> str:
        gate = "" if self.threshold is None else f" (needs >= {self.threshold:.2%})"
        return (f"top-1 agreement {self.top1_agreement:.2%}{gate}, {self.flips}/{self.n} flipped, "
                f"max |dlogit| {self.max_abs_diff:.3g} (image {self.worst_index}), mean {self.mean_abs_diff:.3g}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d


def compare_logits(reference: np.ndarray, candidate: np.ndarray, threshold: float | None = None) -> ParityResult:
    """Compares (N, classes) logits of a candidate runtime with the reference's.

    Args:
        reference: logits of the reference (PyTorch FP32).
        candidate: logits of the artifact on the same images, same order.
        threshold: minimum top-1 agreement for ``passed`` (None: report only).
    """
    ref = np.asarray(reference, dtype=np.float32)
    cand = np.asarray(candidate, dtype=np.float32)
    if ref.shape != cand.shape or ref.ndim != 2:
        raise ValueError(f"logits shapes differ: reference {ref.shape}, candidate {cand.shape}")
    n = len(ref)
    if n == 0:
        return ParityResult(0, 1.0, 0, 0.0, 0.0, 0.0, -1, threshold)
    diff = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
    top_ref, top_cand = ref.argmax(1), cand.argmax(1)
    flips = int((top_ref != top_cand).sum())
    p_ref, p_cand = softmax(ref), softmax(cand)
    rows = np.arange(n)
    prob_change = np.abs(p_ref[rows, top_ref] - p_cand[rows, top_ref])
    per_image = diff.max(axis=1)
    return ParityResult(n=n, top1_agreement=float(1.0 - flips / n), flips=flips, max_abs_diff=float(diff.max()),
                        mean_abs_diff=float(diff.mean()), max_prob_change=float(prob_change.max()),
                        worst_index=int(per_image.argmax()), threshold=threshold)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(1) == np.asarray(labels)).mean()) if len(labels) else 0.0
