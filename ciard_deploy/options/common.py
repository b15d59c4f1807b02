"""What every option model shares: the frozen, unknown-key-refusing base, eps values, attack-spec checks.

``8/255`` reads as a float and is written back as ``"8/255"`` (in JSON/YAML only: ``model_dump()`` in
Python mode keeps the float, so fingerprints compare numbers).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from ciard_deploy.attacks.budget import format_eps, parse_eps
from ciard_deploy.attacks.base import parse_attack_spec
from ciard_deploy.errors import CiardError


class Options(BaseModel):
    """Base of every option model and recipe section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def eps_value(v: Any) -> float:
    """``8/255``, ``"0.1"`` or a number as a float; a bad one is a ValueError (a pydantic error at its key)."""
    try:
        return parse_eps(v)
    except CiardError as e:  # UsageError -> a pydantic error at this key
        raise ValueError(str(e)) from None


def eps_text(v: float) -> str | float:
    """``8/255`` stays ``"8/255"`` when written back; other values stay numbers."""
    text = format_eps(v)
    try:
        return text if "/" in text and parse_eps(text) == v else v
    except CiardError:
        return v


def check_attack_spec(spec: str) -> None:
    """A registered attack spec (``pgd20``, ``apgd-ce``); otherwise a ValueError naming the valid ones."""
    try:
        parse_attack_spec(spec)
    except CiardError as e:
        raise ValueError(str(e)) from None


__all__ = ["Options", "check_attack_spec", "eps_text", "eps_value"]
