"""What every option model shares: the frozen, unknown-key-refusing base, eps values, attack-spec checks.

``8/255`` reads as a float and is written back as ``"8/255"`` (in JSON/YAML only: ``model_dump()`` in
Python mode keeps the float, so fingerprints compare numbers).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer

from ciard_deploy.attacks.budget import format_eps, parse_eps
from ciard_deploy.attacks.base import parse_attack_spec
from ciard_deploy.errors import CiardError


class Options(BaseModel):
    """Base of every option model and recipe section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class OmitsNewDefaults(BaseModel):
    """Base of a model whose fields added after recipes were first hashed (``OMIT_AT_DEFAULT``) are left
    out of its dump (hence out of the recipe hash and the stage fingerprints) while at their default, so
    a recipe that does not set them keeps its hash."""

    OMIT_AT_DEFAULT: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        d = handler(self)
        for name in self.OMIT_AT_DEFAULT:
            if getattr(self, name) == type(self).model_fields[name].default:
                d.pop(name, None)
        return d


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
