"""Parity of a runtime's logits with the PyTorch reference's, at two levels: the one implementation.

Decision level (top-1 agreement, the number of flipped predictions, the largest change of
the reference class's probability) is what gates: a correct FP16 or INT8 model fails any
tight element-wise tolerance (Polygraphy's 1e-5 default fails FP16 engines that predict
correctly; NVIDIA/TensorRT#2709). Element level (max and mean absolute logit difference,
and which image diverged most) is reported so a reader can see how far apart they are.

Used by export (``export.parity_gate.compare_logits``: the same numbers plus a threshold, in the
manifest) and by verify (``verify.parity_report.ParityReport``: clean and per-attack, in the report).
numpy only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

#: flipped images listed by index in a report (the count is always exact)
MAX_LISTED_FLIPS = 20


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable for large logits)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose top-1 class is the label (0.0 for no rows)."""
    return float((np.asarray(logits).argmax(1) == np.asarray(labels)).mean()) if len(labels) else 0.0


@dataclass(frozen=True)
class Parity:
    """How far a runtime's logits are from the reference's on the same images.

    Attributes:
        n: images compared.
        top1_agreement: fraction of images whose top-1 class is the same.
        flips: images whose top-1 class differs.
        flip_indices: the first ``MAX_LISTED_FLIPS`` of them (positions in the compared set).
        max_abs_diff: largest absolute logit difference over all images and classes.
        mean_abs_diff: mean absolute logit difference.
        max_prob_change: largest change of the reference top-1 class's softmax probability.
        worst_index: image with the largest logit difference (-1 if ``n == 0``).
        nonfinite: images for which the candidate returned a NaN or infinite logit: a defect of the
            artifact. Each counts as flipped (it has no prediction), and the logit differences and the
            probability change are over the images finite in both (0 when there are none), so no
            number of a report is NaN.
    """

    n: int
    top1_agreement: float
    flips: int
    max_abs_diff: float
    mean_abs_diff: float
    max_prob_change: float
    worst_index: int
    flip_indices: tuple[int, ...] = field(default=())
    nonfinite: int = 0

    def summary(self) -> str:
        """One line: ``"top-1 agreement 99.50% (1/200 flipped), max |dlogit| 0.0123 (image 17), mean 0.0011"``."""
        return f"top-1 agreement {self.top1_agreement:.2%} ({self.flips}/{self.n} flipped), {self._logit_summary()}"

    def _logit_summary(self) -> str:
        text = f"max |dlogit| {self.max_abs_diff:.3g} (image {self.worst_index}), mean {self.mean_abs_diff:.3g}"
        if self.nonfinite:
            text += f" (of the finite ones); NaN/inf logits for {self.nonfinite} of {self.n} images"
        return text

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flip_indices"] = list(self.flip_indices)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Parity":
        return cls(n=int(d["n"]), top1_agreement=float(d["top1_agreement"]), flips=int(d["flips"]),
                   max_abs_diff=float(d["max_abs_diff"]), mean_abs_diff=float(d["mean_abs_diff"]),
                   max_prob_change=float(d["max_prob_change"]), worst_index=int(d["worst_index"]),
                   flip_indices=tuple(int(i) for i in d.get("flip_indices", ())),
                   nonfinite=int(d.get("nonfinite", 0)))


def compare(reference: np.ndarray, candidate: np.ndarray) -> Parity:
    """Compares (N, classes) logits of a runtime with the reference's on the same images.

    Args:
        reference: the PyTorch reference logits (FP32).
        candidate: the runtime's logits on the same images, in the same order.

    Raises:
        ValueError: the shapes differ (an internal bug: the caller checks class counts first).
    """
    ref = np.asarray(reference, dtype=np.float32)
    cand = np.asarray(candidate, dtype=np.float32)
    if ref.shape != cand.shape or ref.ndim != 2:
        raise ValueError(f"logits shapes differ: reference {ref.shape}, candidate {cand.shape}")
    n = len(ref)
    if n == 0:
        return Parity(0, 1.0, 0, 0.0, 0.0, 0.0, -1)
    cand_ok = np.isfinite(cand).all(axis=1)
    ok = cand_ok & np.isfinite(ref).all(axis=1)  # rows whose differences are numbers
    top_ref, top_cand = ref.argmax(1), cand.argmax(1)
    flipped = np.flatnonzero((top_ref != top_cand) | ~cand_ok)  # a NaN/inf row has no prediction
    max_abs = mean_abs = max_prob = 0.0
    worst = -1
    if ok.any():
        rows = np.flatnonzero(ok)
        diff = np.abs(ref[rows].astype(np.float64) - cand[rows].astype(np.float64))
        prob_change = np.abs(softmax(ref[rows])[np.arange(len(rows)), top_ref[rows]]
                             - softmax(cand[rows])[np.arange(len(rows)), top_ref[rows]])
        max_abs, mean_abs, max_prob = float(diff.max()), float(diff.mean()), float(prob_change.max())
        worst = int(rows[diff.max(axis=1).argmax()])
    return Parity(n=n, top1_agreement=float(1.0 - len(flipped) / n), flips=int(len(flipped)),
                  max_abs_diff=max_abs, mean_abs_diff=mean_abs, max_prob_change=max_prob, worst_index=worst,
                  flip_indices=tuple(int(i) for i in flipped[:MAX_LISTED_FLIPS]), nonfinite=int((~cand_ok).sum()))


def pooled(parts: Mapping[str, Parity]) -> Parity | None:
    """One Parity over several compared sets (the adversarial images of every attack together).

    Agreement and the mean are weighted by images; maxima are maxima; ``worst_index`` and
    ``flip_indices`` are those of the part with the largest difference / the first flips.
    """
    items = [p for p in parts.values() if p.n > 0]
    if not items:
        return None
    n = sum(p.n for p in items)
    flips = sum(p.flips for p in items)
    worst = max(items, key=lambda p: p.max_abs_diff)
    listed: list[int] = []
    for p in items:
        listed.extend(p.flip_indices)
    return Parity(n=n, top1_agreement=1.0 - flips / n, flips=flips, max_abs_diff=worst.max_abs_diff,
                  mean_abs_diff=sum(p.mean_abs_diff * p.n for p in items) / n,
                  max_prob_change=max(p.max_prob_change for p in items), worst_index=worst.worst_index,
                  flip_indices=tuple(listed[:MAX_LISTED_FLIPS]), nonfinite=sum(p.nonfinite for p in items))


__all__ = ["MAX_LISTED_FLIPS", "Parity", "accuracy", "compare", "pooled", "softmax"]
