"""The L-inf budget of an attack: eps parsed and written the way people write it (``8/255``), the
choice between a given eps and the one a checkpoint records (``choose_eps``), and an attack's
``Budget``. numpy-free and torch-free.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Literal

from ciard_deploy.errors import UsageError

Norm = Literal["Linf"]

_EPS_RE = re.compile(r"^\s*(?P<num>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?:/\s*(?P<den>[0-9]*\.?[0-9]+))?\s*$")


def parse_eps(text: str | float) -> float:
    """Parses an L-inf radius given as a fraction of the pixel range [0, 1].

    Accepts ``"8/255"``, ``"8/255.0"``, ``"0.03"`` (and plain floats). The result must lie in
    [0, 1].

    Args:
        text: the radius as typed by a user, or a number.

    Returns:
        eps as a float.

    Raises:
        UsageError: malformed, negative, larger than 1, or not finite (one-line message).

    Example:
        >>> round(parse_eps("8/255") * 255, 6)
        8.0
    """
    if isinstance(text, bool):
        raise UsageError(f"invalid eps {text!r}: expected a number like 8/255 or 0.03")
    if isinstance(text, numbers.Real):
        value = float(text)
    else:
        s = str(text)
        m = _EPS_RE.match(s)
        if m is None:
            if s.strip().startswith("-"):
                raise UsageError(f"invalid eps {s!r}: must not be negative (expected e.g. 8/255 or 0.03)")
            raise UsageError(f"invalid eps {s!r}: expected a number like 8/255 or 0.03")
        value = float(m["num"])
        if m["den"] is not None:
            den = float(m["den"])
            if den == 0:
                raise UsageError(f"invalid eps {s!r}: division by zero")
            value /= den
    if not math.isfinite(value):
        raise UsageError(f"invalid eps {text!r}: must be finite")
    if value < 0:
        raise UsageError(f"invalid eps {text!r}: must not be negative")
    if value > 1:
        hint = f" (did you mean {value:g}/255?)" if value.is_integer() and value <= 255 else ""
        raise UsageError(f"invalid eps {text!r}: pixels are in [0, 1], so eps must be <= 1{hint}")
    return value


def format_eps(eps: float) -> str:
    """Formats eps for labels: a short decimal when it has one, else ``k/255``, else 4 digits.

    ``0.1 -> "0.1"``, ``8/255 -> "8/255"``, ``0.2 -> "0.2"`` (although it is 51/255),
    ``0.0314 -> "0.0314"``.
    """
    if eps == 0:
        return "0"
    short = repr(float(eps))
    if len(short) <= 5:  # "0.1", "0.03", "0.005", "1.0"
        return short[:-2] if short.endswith(".0") else short
    k = eps * 255.0
    if abs(k - round(k)) < 1e-6 and round(k) > 0:
        return f"{int(round(k))}/255"
    return f"{eps:.4g}"


@dataclass(frozen=True)
class EpsChoice:
    """The L-inf budget a verb measures at, and where it came from.

    ``ciard eval`` and ``ciard pack`` measure at the budget the model was trained for unless
    told otherwise; a budget given with ``--eps`` that differs from it is allowed, and every
    table and report then says so (``warning``).

    Attributes:
        eps: the budget used.
        training_eps: the budget recorded with the model (its metadata); None when none is recorded.
        explicit: True when the user gave ``eps`` (``--eps``), False when it was taken from the record.
        where: what records ``training_eps``, for messages (``"the checkpoint"``).
    """

    eps: float
    training_eps: float | None
    explicit: bool
    where: str = "the checkpoint"

    @property
    def differs(self) -> bool:
        """True when a budget was given that is not the recorded training budget."""
        return self.training_eps is not None and abs(self.eps - self.training_eps) > 1e-9

    @property
    def warning(self) -> str | None:
        """``"eps 8/255 differs from the training eps 0.15 recorded in the checkpoint"``, or None."""
        if not self.differs:
            return None
        return (f"eps {format_eps(self.eps)} differs from the training eps {format_eps(float(self.training_eps))} "
                f"recorded in {self.where}")

    def note(self) -> str:
        """One line saying which budget is used and why."""
        if self.warning:
            return self.warning
        if self.training_eps is None:
            return f"eps {format_eps(self.eps)} as given ({self.where} records no training eps)"
        return f"eps {format_eps(self.eps)}: the training eps recorded in {self.where}"

    def to_dict(self) -> dict[str, Any]:
        """JSON fields: eps, eps_label, eps_source (``--eps`` or ``metadata``), training_eps, eps_warning."""
        return {"eps": self.eps, "eps_label": format_eps(self.eps),
                "eps_source": "--eps" if self.explicit else "metadata",
                "training_eps": self.training_eps, "eps_warning": self.warning}


def choose_eps(given: str | float | None, recorded: float | None, where: str = "the checkpoint",
               flag: str = "--eps") -> EpsChoice:
    """The budget to measure at: ``given`` when there is one, else the one ``where`` records.

    Raises:
        UsageError: ``given`` is malformed, or neither is there (the message asks for ``flag``):
            guessing 8/255 would measure a model trained for another budget at the wrong one.
    """
    recorded_value = None if recorded is None else float(recorded)
    if given is not None:
        return EpsChoice(parse_eps(given), recorded_value, True, where)
    if recorded_value is None:
        raise UsageError(f"{where} records no training eps: pass {flag} (e.g. {flag} 8/255 for CIFAR, "
                         f"{flag} 0.15 for the digits recipes)")
    return EpsChoice(recorded_value, recorded_value, False, where)


@dataclass(frozen=True)
class Budget:
    """The threat model of one attack run.

    Attributes:
        norm: only ``"Linf"`` for now.
        eps: radius in pixel units of [0, 1].
        steps: gradient steps (PGD, CW), 1 for FGSM, queries for Square, APGD iterations for AA.
        step_size: step per iteration; ``None`` where the attack adapts it (AutoAttack, Square).
    """

    norm: Norm
    eps: float
    steps: int
    step_size: float | None

    @property
    def eps_label(self) -> str:
        return format_eps(self.eps)

    def to_dict(self) -> dict[str, Any]:
        return {"norm": self.norm, "eps": self.eps, "eps_label": self.eps_label,
                "steps": self.steps, "step_size": self.step_size}



__all__ = ["Budget", "EpsChoice", "Norm", "choose_eps", "format_eps", "parse_eps"]
