"""White-box attacks on an exported artifact: gradients from its twin, every iterate scored on the runtime.

An attack crafted on the PyTorch model and transferred to an FP16 or INT8 graph gives an upper
bound on that graph's robustness, not its robustness: quantization misaligns the gradients. Here
the attacks run on the artifact itself. ``RuntimeScored`` wraps the artifact's twin (a torch
module built from the exported file, ``ciard_deploy.twin``) and the runtime's logits function:
its forward pass *returns the runtime's logits* while its gradient is the twin's (the
straight-through trick of BPDA, Athalye et al. 2018). So every success check an attack makes on
an iterate (APGD's and FAB's own, the multi-targeted PGD's) is a check on the runtime, and an
image counts as adversarial only when the runtime misclassifies it.

``attack_artifact`` runs a list of white-box attacks (default ``ARTIFACT_ATTACKS``: APGD-CE,
APGD-T, FAB-T at the reference's 100 iterations and a multi-targeted margin PGD) as a cascade,
AutoAttack-style: each attack only sees the samples that every earlier one left correct, and
for each sample the first image the runtime misclassified is kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ciard_deploy.attacks.base import Attack, create_attack
from ciard_deploy.attacks.base import GRADIENTS, parse_attack_spec
from ciard_deploy.attacks.cascade import check_budget
from ciard_deploy.errors import UsageError

#: The default cascade on an artifact: AutoAttack's gradient attacks (reference settings) + MT-PGD.
ARTIFACT_ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "mtpgd100")

PredictFn = Callable[[np.ndarray], np.ndarray]
#: ``progress(done, total, stage=label)``
Progress = Callable[..., None]

#: found_by codes besides an attack's index
NOT_ATTACKED = -2  # the runtime misclassifies the clean image
ROBUST = -1  # no attack found an image the runtime misclassifies


class RuntimeScored(nn.Module):
    """Forward: the runtime's logits; backward: the twin's gradient (straight-through).

    ``forward(x) = twin(x) + (runtime(x) - twin(x)).detach()``: the values are exactly the
    runtime's (numpy round trip, batched), the gradient w.r.t. ``x`` is the twin's. ``queries``
    counts the images the runtime scored.

    Args:
        twin: a differentiable module reproducing the runtime (float32 NCHW in [0, 1] -> logits).
        predict: the runtime's logits function on float32 numpy batches.
        batch_size: most images per runtime call.
    """

    def __init__(self, twin: nn.Module, predict: PredictFn, batch_size: int = 256) -> None:
        super().__init__()
        self.twin = twin
        self.predict = predict
        self.batch_size = int(batch_size)
        self.queries = 0

    def runtime_logits(self, x: torch.Tensor) -> torch.Tensor:
        xs = np.ascontiguousarray(x.detach().float().cpu().numpy(), dtype=np.float32)
        parts = [np.asarray(self.predict(xs[i:i + self.batch_size]), dtype=np.float32)
                 for i in range(0, len(xs), self.batch_size)]
        self.queries += len(xs)
        out = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        return torch.from_numpy(out).to(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z_twin = self.twin(x).float()
        z_rt = self.runtime_logits(x).to(z_twin.dtype)
        if z_rt.shape != z_twin.shape:
            raise ValueError(f"runtime logits {tuple(z_rt.shape)} and twin logits {tuple(z_twin.shape)} differ in shape")
        return z_twin + (z_rt - z_twin).detach()


@dataclass
class ArtifactAttackResult:
    """What the cascade found on one artifact.

    Attributes:
        x_adv: float32 (N, C, H, W): per sample, the first image the runtime misclassified (the
            clean image where none was found or the clean image is already wrong).
        logits: float32 (N, K): the runtime's logits on ``x_adv``.
        logits_clean: float32 (N, K): the runtime's logits on the clean images.
        found_by: int8 (N,): index of the attack that broke the sample, ``ROBUST`` (-1) or
            ``NOT_ATTACKED`` (-2, clean already wrong).
        records: one dict per attack (name, label, eps, settings, seconds, attacked, broken,
            robust_acc_after, queries).
        seconds: the whole cascade's wall time.
    """

    x_adv: np.ndarray
    logits: np.ndarray
    logits_clean: np.ndarray
    found_by: np.ndarray
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def robust(self) -> np.ndarray:
        return self.found_by == ROBUST

    @property
    def robust_acc(self) -> float:
        return float(self.robust.mean()) if len(self.found_by) else 0.0


def create_artifact_attacks(specs: Sequence[str], eps: float, seed: int = 0) -> list[Attack]:
    """The cascade's attacks from specs (``apgd-ce``, ``mtpgd100``, ...); each must need gradients."""
    import inspect


    out = []
    for spec in specs:
        entry, _ = parse_attack_spec(spec)
        if GRADIENTS not in entry.requires:
            raise UsageError(f"artifact attack {spec!r} is query-only: it runs live in verify (--live), not in a pack")
        params = inspect.signature(entry.load().__init__).parameters
        out.append(create_attack(spec, eps, **({"seed": seed} if "seed" in params else {})))
    labels = [a.label for a in out]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise UsageError(f"artifact attack(s) listed twice: {', '.join(dupes)}")
    return out


def attack_artifact(twin: nn.Module, predict: PredictFn, x: np.ndarray, y: np.ndarray, attacks: Sequence[Attack], *,
                    seed: int = 0, batch_size: int = 256, device: str | torch.device = "cpu",
                    progress: Progress | None = None) -> ArtifactAttackResult:
    """Runs ``attacks`` as a cascade on the artifact (twin gradients, runtime scores).

    Args:
        twin: the artifact's twin (``ciard_deploy.twin.build_twin``), any device.
        predict: the runtime's logits function (``Backend.predict``).
        x, y: clean images (float32 NCHW in [0, 1]) and int64 labels.
        attacks: white-box attacks, run in order on the samples still correct on the runtime.
        seed: ``torch.manual_seed(seed)`` before each attack (so a rerun gives the same images).
        batch_size: images per attack call and per runtime call.
        device: where the twin runs.
        progress: ``callback(done, total, stage=attack label)``.

    Returns:
        the ``ArtifactAttackResult``; every stored image lies within each attack's eps and in [0, 1].
    """

    dev = torch.device(device)
    model = RuntimeScored(twin.to(dev).eval(), predict, batch_size)
    xs = np.ascontiguousarray(x, dtype=np.float32)
    ys = np.asarray(y).astype(np.int64)
    t_all = time.perf_counter()
    with torch.no_grad():
        logits_clean = model.runtime_logits(torch.from_numpy(xs)).cpu().numpy()
    found = np.where(logits_clean.argmax(1) == ys, ROBUST, NOT_ATTACKED).astype(np.int8)
    x_adv = xs.copy()
    logits = logits_clean.copy()
    records: list[dict[str, Any]] = []
    n = len(ys)
    for i, attack in enumerate(attacks):
        todo = np.flatnonzero(found == ROBUST)
        t0 = time.perf_counter()
        q0 = model.queries
        broken_here = 0
        if progress is not None:
            progress(0, len(todo), stage=attack.label)
        torch.manual_seed(seed)
        for s in range(0, len(todo), batch_size):
            pos = todo[s:s + batch_size]
            xb = torch.from_numpy(xs[pos]).to(dev)
            yb = torch.from_numpy(ys[pos]).to(dev)
            xa = attack.run(model, xb, yb).detach()
            check_budget(xa, xb, attack.eps, attack.label)
            xa_np = np.ascontiguousarray(xa.float().cpu().numpy(), dtype=np.float32)
            with torch.no_grad():
                la = model.runtime_logits(xa).cpu().numpy()
            hit = la.argmax(1) != ys[pos]
            x_adv[pos[hit]] = xa_np[hit]
            logits[pos[hit]] = la[hit]
            found[pos[hit]] = i
            broken_here += int(hit.sum())
            if progress is not None:
                progress(min(s + batch_size, len(todo)), len(todo), stage=attack.label)
        records.append({"index": i, "name": attack.name, "label": attack.label, "eps": float(attack.eps),
                        "settings": attack.describe(), "seconds": round(time.perf_counter() - t0, 3),
                        "attacked": int(len(todo)), "broken": broken_here,
                        "robust_acc_after": float((found == ROBUST).mean()) if n else 0.0,
                        "queries": int(model.queries - q0)})
    return ArtifactAttackResult(x_adv=x_adv, logits=logits, logits_clean=logits_clean, found_by=found,
                                records=records, seconds=time.perf_counter() - t_all)


__all__ = ["ARTIFACT_ATTACKS", "ArtifactAttackResult", "NOT_ATTACKED", "ROBUST", "RuntimeScored",
           "attack_artifact", "create_artifact_attacks"]
