"""Parity of a runtime's logits with the PyTorch reference stored in the pack: clean and per attack.

The comparison itself (``Parity``, ``compare``, ``pooled``) is ``ciard_deploy.runtime.parity_metrics``;
this is the report's ``parity`` section built from it. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ciard_deploy.runtime.parity_metrics import Parity, pooled


@dataclass
class ParityReport:
    """Parity on the clean images and on the transferred adversarial images of the pack.

    Attributes:
        clean: runtime vs reference logits on the clean images.
        per_attack: the same on each attack's adversarial images, by label (``pgd20@8/255``).
        adversarial: all adversarial images pooled (None when the pack has no attacks).
    """

    clean: Parity
    per_attack: dict[str, Parity] = field(default_factory=dict)

    @property
    def adversarial(self) -> Parity | None:
        return pooled(self.per_attack)

    def to_dict(self) -> dict[str, Any]:
        adv = self.adversarial
        return {"clean": self.clean.to_dict(), "adversarial": adv.to_dict() if adv else None,
                "per_attack": {k: v.to_dict() for k, v in self.per_attack.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ParityReport":
        return cls(clean=Parity.from_dict(d["clean"]),
                   per_attack={k: Parity.from_dict(v) for k, v in d.get("per_attack", {}).items()})


__all__ = ["ParityReport"]
