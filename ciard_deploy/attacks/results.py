"""Results of an attack evaluation: per-sample robust flags, accuracies named by attack and budget.

numpy only (no torch), so verify/report code can load and re-judge them anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ciard_deploy.attacks.budget import format_eps

SCHEMA_KIND = "ciard.attack_eval"
SCHEMA_VERSION = 1


def worst_case_label(attacks: Sequence[Any]) -> str:
    """The worst case's name: ``worst(fgsm+pgd20)@8/255``, or each attack's label when their budgets differ.

    ``attacks``: records with ``name``, ``label`` and ``eps`` (``AttackResult``s, or report/pack dicts).
    """
    def get(a: Any, k: str) -> Any:
        return a[k] if isinstance(a, Mapping) else getattr(a, k)

    if not attacks:
        return "worst()"
    eps_labels = {format_eps(float(get(a, "eps"))) for a in attacks}
    if len(eps_labels) == 1:
        return f"worst({'+'.join(get(a, 'name') for a in attacks)})@{eps_labels.pop()}"
    return f"worst({'+'.join(get(a, 'label') for a in attacks)})"


def _flags(value: Any) -> np.ndarray | None:
    return None if value is None else np.asarray(value, dtype=bool).reshape(-1)


@dataclass
class AttackResult:
    """One attack's outcome on the evaluated samples.

    Attributes:
        name: attack name, e.g. ``"pgd20"``.
        label: name and budget, e.g. ``"pgd20@8/255"``.
        eps: L-inf radius.
        robust_acc: fraction of all samples correct on clean and still correct under this attack.
        seconds: wall time of the attack (for a result taken from an evaluation state, the time
            recorded there: the work was not redone).
        per_sample: bool per sample (same meaning as ``robust_acc``), if kept.
        origin: ``"ran"`` (computed by this evaluation), ``"reused"`` (finished earlier, taken from
            an ``EvaluationState``) or ``"resumed"`` (a partial run in the state, continued).
    """

    name: str
    label: str
    eps: float
    robust_acc: float
    seconds: float
    per_sample: np.ndarray | None = field(default=None, repr=False)
    origin: str = "ran"

    def to_dict(self, per_sample: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "label": self.label, "eps": self.eps,
                             "eps_label": format_eps(self.eps), "robust_acc": self.robust_acc,
                             "seconds": round(self.seconds, 4), "origin": self.origin}
        if per_sample and self.per_sample is not None:
            d["per_sample"] = [bool(v) for v in self.per_sample]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AttackResult":
        return cls(name=str(d["name"]), label=str(d["label"]), eps=float(d["eps"]),
                   robust_acc=float(d["robust_acc"]), seconds=float(d.get("seconds", 0.0)),
                   per_sample=_flags(d.get("per_sample")), origin=str(d.get("origin", "ran")))


@dataclass
class EvalResult:
    """Clean accuracy, each attack's robust accuracy and the per-sample worst case.

    Attributes:
        n: number of evaluated samples.
        clean_acc: fraction classified correctly without attack.
        attacks: one ``AttackResult`` per attack, in the order they ran.
        worst_case_acc: fraction correct on clean and under every attack (AutoAttack-style union).
        clean_correct: bool per sample, if kept.
    """

    n: int
    clean_acc: float
    attacks: list[AttackResult]
    worst_case_acc: float
    clean_correct: np.ndarray | None = field(default=None, repr=False)

    @property
    def worst_case_label(self) -> str:
        """E.g. ``"worst(fgsm+pgd20+aa)@8/255"``; each attack keeps its own budget if they differ."""
        return worst_case_label(self.attacks)

    @property
    def worst_case(self) -> np.ndarray | None:
        """Per-sample worst-case flags (correct on clean and under every attack), if kept."""
        if self.clean_correct is None or any(a.per_sample is None for a in self.attacks):
            return None
        flags = self.clean_correct.copy()
        for a in self.attacks:
            flags &= a.per_sample
        return flags

    def __getitem__(self, label: str) -> AttackResult:
        """The result of one attack, by label (``"pgd20@8/255"``) or by name (``"pgd20"``)."""
        for a in self.attacks:
            if label in (a.label, a.name):
                return a
        raise KeyError(f"no attack {label!r} in this result; have: {', '.join(a.label for a in self.attacks)}")

    def accuracies(self) -> dict[str, float]:
        """Every number by its label: ``{"clean": ..., "pgd20@8/255": ..., "worst(...)@8/255": ...}``."""
        out = {"clean": self.clean_acc}
        out.update({a.label: a.robust_acc for a in self.attacks})
        out[self.worst_case_label] = self.worst_case_acc
        return out

    def to_dict(self, per_sample: bool = False) -> dict[str, Any]:
        """JSON-ready; per-sample flags only if ``per_sample`` (and they were kept)."""
        d: dict[str, Any] = {
            "kind": SCHEMA_KIND,
            "schema_version": SCHEMA_VERSION,
            "n": self.n,
            "clean_acc": self.clean_acc,
            "attacks": [a.to_dict(per_sample) for a in self.attacks],
            "robust_acc": {a.label: a.robust_acc for a in self.attacks},
            "worst_case_label": self.worst_case_label,
            "worst_case_acc": self.worst_case_acc,
        }
        if per_sample and self.clean_correct is not None:
            d["clean_correct"] = [bool(v) for v in self.clean_correct]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalResult":
        kind = d.get("kind", SCHEMA_KIND)
        if kind != SCHEMA_KIND:
            raise ValueError(f"not an attack evaluation (kind {kind!r}, expected {SCHEMA_KIND!r})")
        version = int(d.get("schema_version", SCHEMA_VERSION))
        if version > SCHEMA_VERSION:
            raise ValueError(f"attack evaluation schema {version} is newer than this ciard-deploy reads "
                             f"({SCHEMA_VERSION}); upgrade ciard-deploy")
        return cls(n=int(d["n"]), clean_acc=float(d["clean_acc"]),
                   attacks=[AttackResult.from_dict(a) for a in d["attacks"]],
                   worst_case_acc=float(d["worst_case_acc"]), clean_correct=_flags(d.get("clean_correct")))
