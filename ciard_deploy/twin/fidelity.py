"""How faithfully a twin reproduces its runtime: top-1 agreement and logit differences per input set.

Torch-free at module level (a stored ``TwinFidelity`` reads back on a device without torch);
``measure_fidelity`` imports torch when it runs the twin.

    from ciard_deploy.runtime import open_backend
    from ciard_deploy.twin import build_twin, measure_fidelity, random_in_ball

    twin = build_twin("export/model.int8.onnx")
    with open_backend("export/model.int8.onnx", threads=1) as rt:
        fid = measure_fidelity(twin, rt.predict, {"clean": x, "adversarial": x_adv,
                                                  "random_in_ball": random_in_ball(x, 0.15, seed=0)})
    fid.trusted, fid.line()
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ciard_deploy.runtime.parity_metrics import compare

#: The lowest top-1 agreement (over every set) at which attacks crafted on the twin count as white-box
#: attacks on the runtime.
TRUST_THRESHOLD = 0.995


@dataclass(frozen=True)
class SetFidelity:
    """Twin against runtime on one input set.

    Attributes:
        n: rows compared.
        agreement: share of rows whose top-1 class is the same.
        max_abs_diff: largest |twin logit - runtime logit| over every row and class.
        bit_exact: share of rows whose logits are all equal as float32.
    """

    n: int
    agreement: float
    max_abs_diff: float
    bit_exact: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_set(twin_logits: np.ndarray, runtime_logits: np.ndarray) -> SetFidelity:
    """``SetFidelity`` of two (N, K) logit arrays (the twin's, the runtime's)."""
    a = np.asarray(twin_logits, dtype=np.float32)
    b = np.asarray(runtime_logits, dtype=np.float32)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"twin logits {a.shape} and runtime logits {b.shape} must be the same (N, K) shape")
    p = compare(b, a)  # the runtime is the reference here
    bit_exact = float(np.mean(np.all(a == b, axis=1))) if len(a) else 1.0
    return SetFidelity(p.n, p.top1_agreement, p.max_abs_diff, bit_exact)


@dataclass
class TwinFidelity:
    """``SetFidelity`` per named input set, and whether the twin can stand in for the runtime.

    Attributes:
        per_set: set name (``clean``, ``adversarial``, ``random_in_ball`` ...) -> ``SetFidelity``.
        threshold: the agreement ``trusted`` asks of every set.
    """

    per_set: dict[str, SetFidelity] = field(default_factory=dict)
    threshold: float = TRUST_THRESHOLD

    @property
    def agreement(self) -> float:
        """The lowest top-1 agreement over the sets (0.0 when nothing was measured)."""
        return min((s.agreement for s in self.per_set.values()), default=0.0)

    @property
    def max_abs_diff(self) -> float:
        return max((s.max_abs_diff for s in self.per_set.values()), default=float("nan"))

    @property
    def trusted(self) -> bool:
        """Every set agrees top-1 on at least ``threshold`` of its rows."""
        return bool(self.per_set) and self.agreement >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"per_set": {k: v.to_dict() for k, v in self.per_set.items()}, "threshold": self.threshold,
                "agreement": self.agreement, "trusted": self.trusted}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TwinFidelity":
        return cls({k: SetFidelity(**v) for k, v in d["per_set"].items()}, float(d.get("threshold", TRUST_THRESHOLD)))

    def line(self) -> str:
        """One line for people, e.g. ``twin fidelity: top-1 agreement clean 100.0% (n=360), ...; trusted``."""
        if not self.per_set:
            return "twin fidelity: nothing measured; not trusted"
        sets = ", ".join(f"{k} {v.agreement:.1%} (n={v.n})" for k, v in self.per_set.items())
        exact = min(v.bit_exact for v in self.per_set.values())
        verdict = "trusted" if self.trusted else f"NOT trusted (< {self.threshold:.1%})"
        return (f"twin fidelity: top-1 agreement {sets}; max |logit diff| {self.max_abs_diff:.3g}, "
                f"bit-exact rows >= {exact:.1%}; {verdict}")


def random_in_ball(x: np.ndarray, eps: float, seed: int = 0) -> np.ndarray:
    """``x`` plus uniform noise in the L-inf ball of radius ``eps``, clipped to [0, 1], float32 (seeded)."""
    x = np.asarray(x, dtype=np.float32)
    noise = np.random.default_rng(seed).uniform(-eps, eps, size=x.shape).astype(np.float32)
    return np.clip(x + noise, 0.0, 1.0).astype(np.float32)


def measure_fidelity(twin: Any, predict: Callable[[np.ndarray], np.ndarray], sets: Mapping[str, np.ndarray],
                     batch_size: int = 256) -> TwinFidelity:
    """Runs the twin and the runtime on each set and compares their logits.

    Args:
        twin: an ``OnnxTwin`` (or any torch module with the same contract), run without gradients on the
            device its parameters and buffers live on.
        predict: the runtime's logits function, float32 NCHW in [0, 1] -> (N, K), e.g.
            ``open_backend(path, threads=1).predict``.
        sets: name -> float32 NCHW images in [0, 1].
        batch_size: images per call, for both.

    Returns:
        ``TwinFidelity`` with one ``SetFidelity`` per set, in the order given.
    """
    import torch

    if not sets:
        raise ValueError("measure_fidelity needs at least one input set")
    device = next((t.device for t in [*twin.parameters(), *twin.buffers()]), torch.device("cpu"))
    per_set: dict[str, SetFidelity] = {}
    was_training = twin.training
    twin.eval()
    try:
        for name, images in sets.items():
            x = np.ascontiguousarray(images, dtype=np.float32)
            ours, theirs = [], []
            for i in range(0, len(x), batch_size):
                chunk = x[i:i + batch_size]
                with torch.no_grad():
                    ours.append(twin(torch.from_numpy(chunk).to(device)).float().cpu().numpy())
                theirs.append(np.asarray(predict(chunk), dtype=np.float32))
            k = ours[0].shape[1] if ours else 0
            per_set[name] = compare_set(np.concatenate(ours) if ours else np.zeros((0, k), np.float32),
                                        np.concatenate(theirs) if theirs else np.zeros((0, k), np.float32))
    finally:
        twin.train(was_training)
    return TwinFidelity(per_set)
