"""The export's parity check: ``runtime.parity_metrics.compare`` plus the precision's agreement threshold.

What is measured, and why agreement gates while logit differences are only reported, is in
``ciard_deploy.runtime.parity_metrics``. This adds the gate and the shape of the manifest's
``parity.clean`` / ``parity.adversarial`` entries. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from ciard_deploy.runtime.parity_metrics import Parity, compare


@dataclass(frozen=True)
class ParityResult(Parity):
    """A Parity judged against a minimum top-1 agreement.

    Truthy when every logit is finite and ``top1_agreement >= threshold`` (or no threshold was set): an
    artifact that returns NaN or inf for any image is broken whatever the threshold.
    """

    threshold: float | None = field(default=None, kw_only=True)

    @property
    def passed(self) -> bool:
        return self.nonfinite == 0 and (self.threshold is None or self.top1_agreement >= self.threshold)

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> str:
        gate = "" if self.threshold is None else f" (needs >= {self.threshold:.2%})"
        return (f"top-1 agreement {self.top1_agreement:.2%}{gate}, {self.flips}/{self.n} flipped, "
                f"{self._logit_summary()}")

    def to_dict(self) -> dict[str, Any]:
        """The manifest's fields: the Parity's without ``flip_indices``, then ``threshold`` and ``passed``."""
        d = super().to_dict()
        del d["flip_indices"]
        d["passed"] = self.passed
        return d


def compare_logits(reference: np.ndarray, candidate: np.ndarray, threshold: float | None = None) -> ParityResult:
    """Compares (N, classes) logits of a candidate runtime with the reference's.

    Args:
        reference: logits of the reference (PyTorch FP32).
        candidate: logits of the artifact on the same images, same order.
        threshold: minimum top-1 agreement for ``passed`` (None: report only).

    Raises:
        ValueError: the shapes differ.
    """
    p = compare(reference, candidate)
    return ParityResult(**{f.name: getattr(p, f.name) for f in fields(p)}, threshold=threshold)


__all__ = ["ParityResult", "compare_logits"]
