"""``PackOptions``: the robustness pack built on the PyTorch student (``ciard pack``, a recipe's ``deploy.pack``).

``ciard pack``'s flags take their defaults and help from these fields where the two mean the same
(``--n``, ``--step-size``, ``--artifact-attacks``, ``--allow-untrusted-twin``); ``--attacks`` and ``--eps``
keep the CLI's own defaults by design (the device's default attacks, the checkpoint's eps), where a
recipe has fixed ones (``attacks`` below, the recipe's ``attack.eps``). ``ciard run``'s pack fingerprint
is ``model_dump()`` of the recipe's ``PackOptions``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_serializer, field_validator

from ciard_deploy.attacks.base import GRADIENTS, parse_attack_spec
from ciard_deploy.options.common import Options, check_attack_spec, eps_text, eps_value


class PackOptions(Options):
    """The robustness pack: which attacks are crafted on the PyTorch student and on each artifact, on how many images."""

    attacks: list[str] = Field(default_factory=lambda: ["apgd-ce", "apgd-t"],
                               description="white-box attacks crafted on the PyTorch student and stored in the "
                                           "robustness pack (transferred to every artifact)")
    artifact_attacks: list[str] = Field(
        default_factory=lambda: ["apgd-ce", "apgd-t", "fab-t", "mtpgd100"],
        description="white-box attacks run on each exported ONNX artifact itself (gradients from its twin, every "
                    "iterate scored on its runtime); [] leaves verify with an upper bound (transfer + query-only)")
    allow_untrusted_twin: bool = Field(False, description="attack an artifact through a twin that agrees with its "
                                                          "runtime on < 99.5 % of images instead of failing")
    n: int = Field(1000, gt=0, description="test images in the pack (seeded, class-stratified; all of the test "
                                           "split if it has fewer)")
    eps: float | None = Field(None, description="L-inf budget of the pack's attacks and of the live attacks (null: "
                                                "the recipe's attack.eps)")
    step_size: float | None = Field(None, gt=0, description="step of the iterative pack attacks (null: each "
                                                            "attack's default, max(2/255, eps/4))")

    @field_validator("attacks")
    @classmethod
    def _attacks(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one attack (e.g. [apgd-ce, apgd-t])")
        for spec in v:
            check_attack_spec(spec)
        if len(set(v)) != len(v):
            raise ValueError(f"attack listed twice in {v}")
        return v

    @field_validator("artifact_attacks")
    @classmethod
    def _artifact_attacks(cls, v: list[str]) -> list[str]:
        for spec in v:
            check_attack_spec(spec)
            if GRADIENTS not in parse_attack_spec(spec)[0].requires:
                raise ValueError(f"{spec} is query-only: it runs live in verify (deploy.live_attacks), not on the twin")
        if len(set(v)) != len(v):
            raise ValueError(f"attack listed twice in {v}")
        return v

    @field_validator("eps", "step_size", mode="before")
    @classmethod
    def _parse(cls, v: Any) -> float | None:
        return None if v is None else eps_value(v)

    @field_serializer("eps", "step_size", when_used="json")
    def _write(self, v: float | None) -> str | float | None:
        return None if v is None else eps_text(v)


__all__ = ["PackOptions"]
