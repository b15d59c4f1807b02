"""Black-box transfer attacks: adversarial images crafted white-box on a *source* model (in the papers,
the original robust teacher) and evaluated on the model under test, which gives only its predictions.

Imports no torch itself: the wrapped attack does when it runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from ciard_deploy.attacks.base import GRADIENTS, SCORES, Attack

if TYPE_CHECKING:  # pragma: no cover
    import torch


class TransferAttack(Attack):
    """``inner`` run on ``source``; the target model is only asked for its predictions (by the cascade).

    Args:
        inner: a white-box attack (``create_attack("pgdt20", eps)``); its budget is this attack's.
        source: the torch model the images are crafted on; moved to the images' device when it runs.
        source_ref: what identifies the source (path, sha256, arch): part of ``describe()``, so a
            resumable evaluation state refuses another source.
    """

    requires = frozenset({SCORES})

    def __init__(self, inner: Attack, source: "torch.nn.Module", source_ref: Mapping[str, Any]) -> None:
        if GRADIENTS not in inner.requires:
            raise ValueError(f"a transfer attack crafts white-box on its source; {inner.label} needs no gradients")
        self.inner, self.source, self.source_ref = inner, source, dict(source_ref)
        self.name = f"transfer-{inner.name}"
        self.budget = inner.budget

    def run(self, model: "torch.nn.Module", x: "torch.Tensor", y: "torch.Tensor") -> "torch.Tensor":
        self.source.to(x.device)
        return self.inner.run(self.source, x, y)

    def options(self) -> dict[str, Any]:
        return {"crafted_on": self.source_ref, "attack": self.inner.describe()}


__all__ = ["TransferAttack"]
