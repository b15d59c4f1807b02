"""The gate table (``SPECS``) and the thresholds of one verify run (``Gates``), torch-free and verify-free.

A gate compares one named metric of a verify run with a threshold (the table is in
``verify.gates``' docstring, which judges them). This module is the one place a gate is declared:
``Gates``' fields, ``ciard verify``'s gate flags (``cli/model_options.gate_options``) and a recipe's
``deploy.gates`` all come from ``SPECS``.

Thresholds are fractions in [0, 1] (``0.9``, or the string ``"90%"``); a drop limit is >= 0.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from ciard_deploy.errors import UsageError


@dataclass(frozen=True)
class GateSpec:
    """What one gate checks (the table in ``verify.gates``' docstring)."""

    name: str
    metric: str
    op: Literal[">=", "<="]
    kind: Literal["accuracy", "drop", "agreement"]
    flag: str
    description: str


SPECS: dict[str, GateSpec] = {s.name: s for s in (
    GateSpec("min_clean", "clean_acc", ">=", "accuracy", "--min-clean", "clean accuracy on the runtime"),
    GateSpec("min_robust", "worst_case_acc", ">=", "accuracy", "--min-robust",
             "worst-case robust accuracy on the runtime (every attack of the pack and every live one, per sample)"),
    GateSpec("max_clean_drop", "clean_drop", "<=", "drop", "--max-clean-drop",
             "clean accuracy lost against the PyTorch reference in the pack"),
    GateSpec("max_robust_drop", "robust_drop", "<=", "drop", "--max-robust-drop",
             "worst case over the transferred attacks lost against the PyTorch reference in the pack"),
    GateSpec("min_agreement", "agreement_clean", ">=", "agreement", "--min-agreement",
             "top-1 agreement with the PyTorch reference on the clean images"),
    GateSpec("min_agreement_adv", "agreement_adversarial", ">=", "agreement", "--min-agreement-adv",
             "top-1 agreement with the PyTorch reference on the transferred adversarial images"),
)}


def threshold_problem(name: str, value: Any) -> tuple[float | None, str | None]:
    """``(threshold, None)`` for a sensible fraction (a number or ``"90%"``), else ``(None, problem)``:
    what is wrong, worded to follow the gate's flag or key (``"2 is outside [0, 1]: ..."``)."""
    if value is None:
        return None, None
    spec = SPECS[name]
    if isinstance(value, bool):
        return None, f"must be a number in [0, 1], got {value!r}"
    if isinstance(value, str):
        text = value.strip()
        try:
            v = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
        except ValueError:
            return None, f"must be a number in [0, 1] (or a percentage like 90%), got {value!r}"
    elif isinstance(value, (int, float)):
        v = float(value)
    else:
        return None, f"must be a number in [0, 1], got {type(value).__name__}"
    if not math.isfinite(v):
        return None, f"must be finite, got {value!r}"
    if spec.kind == "drop" and v < 0:
        return None, (f"{value} is negative: a drop limit is the accuracy you accept to lose, >= 0 "
                      "(a negative limit would demand a gain and can never be certain)")
    if v < 0 or v > 1:
        hint = f" (did you mean {v / 100:g}?)" if 1 < v <= 100 else ""
        return None, f"{value} is outside [0, 1]: thresholds are fractions, not percents{hint}"
    return v, None


def _where(name: str, source: str) -> str:
    return SPECS[name].flag if source == "flags" else f"{source}: {name}"


class GatesBase(BaseModel):
    """The thresholds of one verify run; ``None`` means no gate (its fields are made from ``SPECS``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _threshold(cls, v: Any, info: Any) -> float | None:
        value, problem = threshold_problem(info.field_name, v)
        if problem is not None:
            raise ValueError(problem)
        return value

    @classmethod
    def create(cls, source: str = "flags", **values: Any) -> "GatesBase":
        """Validated gates from keyword values (numbers or ``"90%"`` strings).

        Raises:
            UsageError: an unknown gate name (with the closest valid one), a threshold outside
                [0, 1] or a negative drop limit: gates no model can pass are bad input (exit 2),
                not a failed gate (exit 1).
        """
        unknown = sorted(k for k in values if k not in SPECS)
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(SPECS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"{source}: unknown gate {unknown[0]!r}.{hint} Valid: {', '.join(SPECS)}")
        for name, value in values.items():
            problem = threshold_problem(name, value)[1]
            if problem is not None:
                raise UsageError(f"{_where(name, source)} {problem}")
        return cls(**values)

    def items(self) -> list[tuple[str, float]]:
        """(name, threshold) of the gates that are set, in the fixed order of ``SPECS``."""
        return [(name, getattr(self, name)) for name in SPECS if getattr(self, name) is not None]

    def __bool__(self) -> bool:
        return bool(self.items())

    def to_dict(self) -> dict[str, float]:
        return dict(self.items())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "gates") -> "GatesBase":
        return cls.create(source=source, **dict(d))

    def merged(self, override: "GatesBase") -> "GatesBase":
        """These gates with every gate ``override`` sets replacing ours (flags override a file)."""
        return type(self)(**{**self.model_dump(), **dict(override.items())})


Gates = create_model(  # type: ignore[call-overload]
    "Gates", __base__=GatesBase, __module__=__name__,
    **{name: (float | None, Field(None, description=f"{spec.description}: {spec.metric} {spec.op} this (a fraction, "
                                                    f"or \"90%\"; same as verify's {spec.flag})"))
       for name, spec in SPECS.items()})
Gates.__doc__ = "Release gates judged on every artifact by ``ciard verify`` (unset: no gate); fields from ``SPECS``."

__all__ = ["GateSpec", "Gates", "GatesBase", "SPECS", "threshold_problem"]
