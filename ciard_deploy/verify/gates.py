"""Release gates: thresholds from flags, a YAML file or a recipe -> one pass/fail per gate, with numbers.

The gate table (``SPECS``) and the thresholds (``Gates``) are declared in ``options.gates``; this module
reads them from files and recipes and judges them.

A gate compares one named metric of a verify run with a threshold::

    gate               metric                 passes when
    min_clean          clean_acc              runtime clean accuracy            >= threshold
    min_robust         worst_case_acc         runtime worst case (every attack) >= threshold
    max_clean_drop     clean_drop             reference clean - runtime clean   <= threshold
    max_robust_drop    robust_drop            reference worst - runtime worst
                                              (both over the pack's transferred attacks) <= threshold
    min_agreement      agreement_clean        top-1 agreement with PyTorch, clean images >= threshold
    min_agreement_adv  agreement_adversarial  the same on the transferred adversarial images >= threshold

Thresholds are fractions in [0, 1] (``0.9``, or the string ``"90%"``). The metrics are stored
in the report next to the gates, so ``judge`` can re-run on a report without the model.

Warnings are judged too, by a ``Policy`` stored with the gates (``judge_warnings``):

    a warning that says the numbers are not about this artifact (``MISMATCH_CODES``: V103 the
    artifact changed since export, V104 the pack was built for another model, V105 the manifest
    does not vouch for the artifact, V109 pack and artifact metadata disagree) fails, unless
    ``allow_mismatch`` (``--allow-mismatch``);
    with ``strict`` (``--strict``) every warning fails (mismatches included); notes (level
    ``info``) never fail;
    a warning that says the artifact is broken (``DEFECT_CODES``: V114 NaN/inf logits) fails under
    every policy (pseudo-gate ``defect V114``).

Each failing warning is a pseudo-gate (``WarningVerdict``: ``mismatch V104``, ``strict V111``).
A run with no gates set and no failing warning judged nothing: its status is ``not_gated``.

A gates file (``--gates gates.yaml``)::

    # ciard verify model.int8.onnx --pack pack.npz --gates gates.yaml
    gates:
      min_clean: 0.90
      min_robust: 0.40
      max_clean_drop: 0.01
      min_agreement: 0.97
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from ciard_deploy.errors import UsageError
from ciard_deploy.options.gates import SPECS, Gates

#: float slack so that 19/20 >= 0.95 passes despite rounding
TOLERANCE = 1e-9


def load_gates(path: str | os.PathLike) -> Gates:
    """Reads gates from a YAML file: the keys at the top level or under ``gates:`` (or ``verify: gates:``).

    Raises:
        UsageError: missing or unreadable file, not a mapping, unknown keys, bad values.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"gates file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot read gates file {p}: {first}") from None
    return gates_from_mapping(data, source=p.name)


def gates_from_mapping(data: Any, source: str = "gates") -> Gates:
    """Gates from a parsed mapping: top-level keys, ``{gates: {...}}`` or ``{verify: {gates: {...}}}``."""
    if data is None:
        return Gates()
    if not isinstance(data, Mapping):
        raise UsageError(f"{source}: expected a mapping of gate: threshold, got {type(data).__name__}")
    if "verify" in data and isinstance(data["verify"], Mapping):
        data = data["verify"]
    if "gates" in data:
        data = data["gates"] or {}
        if not isinstance(data, Mapping):
            raise UsageError(f"{source}: 'gates' must be a mapping of gate: threshold")
    return Gates.create(source=source, **{str(k): v for k, v in data.items()})


def gates_from_recipe(recipe: Any) -> Gates:
    """Gates from a recipe's ``verify.gates`` section (a recipe without one has no gates).

    Accepts a recipe object with a ``verify`` attribute (a mapping or a model with ``gates``)
    or a plain dict, so recipes can grow the section without this module changing.
    """
    section = recipe.get("verify") if isinstance(recipe, Mapping) else getattr(recipe, "verify", None)
    if section is None:
        return Gates()
    if not isinstance(section, Mapping):
        section = getattr(section, "model_dump", lambda: {"gates": getattr(section, "gates", None)})()
    return gates_from_mapping({"gates": section.get("gates") or {}}, source="recipe verify.gates")


# --------------------------------------------------------------------------- judging
@dataclass(frozen=True)
class GateResult:
    """One gate's verdict with the numbers: ``measured op threshold``."""

    name: str
    metric: str
    op: str
    threshold: float
    measured: float | None
    passed: bool
    description: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "metric": self.metric, "op": self.op, "threshold": self.threshold,
                "measured": self.measured, "passed": self.passed, "description": self.description,
                "message": self.message}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GateResult":
        return cls(name=d["name"], metric=d["metric"], op=d["op"], threshold=float(d["threshold"]),
                   measured=None if d.get("measured") is None else float(d["measured"]), passed=bool(d["passed"]),
                   description=d.get("description", ""), message=d.get("message", ""))


def judge_one(name: str, threshold: float, metrics: Mapping[str, float | None]) -> GateResult:
    spec = SPECS[name]
    measured = metrics.get(spec.metric)
    if measured is None:
        return GateResult(name, spec.metric, spec.op, threshold, None, False, spec.description,
                          f"{spec.metric} was not measured (the pack or settings give no such number)")
    ok = measured >= threshold - TOLERANCE if spec.op == ">=" else measured <= threshold + TOLERANCE
    if ok:
        message = f"{spec.metric} {measured:.4f} {spec.op} {threshold:.4f}"
    else:
        message = f"{spec.metric} {measured:.4f} {'<' if spec.op == '>=' else '>'} required {threshold:.4f}"
    return GateResult(name, spec.metric, spec.op, threshold, float(measured), ok, spec.description, message)


def judge(gates: Gates, metrics: Mapping[str, float | None]) -> list[GateResult]:
    """One ``GateResult`` per set gate, from a report's ``metrics`` dict (see the module docstring)."""
    return [judge_one(name, threshold, metrics) for name, threshold in gates.items()]


def unmeasurable(gates: Gates, available: Mapping[str, bool]) -> list[str]:
    """Gates whose metric a run cannot produce (``available``: metric -> will it exist)."""
    return [f"{SPECS[name].flag} needs {SPECS[name].metric}" for name, _ in gates.items()
            if not available.get(SPECS[name].metric, False)]


# --------------------------------------------------------------------------- judging warnings
#: warnings that mean "these numbers are not about this artifact": they fail unless allow_mismatch
MISMATCH_CODES: tuple[str, ...] = ("V103", "V104", "V105", "V109")
#: warnings that mean "this artifact is broken" (V114 NaN/inf logits): they fail under every policy
DEFECT_CODES: tuple[str, ...] = ("V114",)


@dataclass(frozen=True)
class Policy:
    """How a verify run judges its warnings (see the module docstring).

    Attributes:
        allow_mismatch: judge the numbers even when a ``MISMATCH_CODES`` warning says they may not be
            about this artifact (``--allow-mismatch``; the warnings stay in the report).
        strict: every warning (level ``warning``) fails, mismatches included (``--strict``).
    """

    allow_mismatch: bool = False
    strict: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"allow_mismatch": self.allow_mismatch, "strict": self.strict, "mismatch_codes": list(MISMATCH_CODES),
                "defect_codes": list(DEFECT_CODES)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Policy":
        """From a report's ``policy`` (None: a report of schema 2 or older, judged by today's default)."""
        d = d or {}
        return cls(allow_mismatch=bool(d.get("allow_mismatch", False)), strict=bool(d.get("strict", False)))


@dataclass(frozen=True)
class WarningVerdict:
    """A warning that fails the run under its ``Policy``: a pseudo-gate ``mismatch V104`` / ``strict V111``."""

    rule: Literal["mismatch", "strict", "defect"]
    code: str
    message: str

    @property
    def name(self) -> str:
        return f"{self.rule} {self.code}"

    @property
    def fix(self) -> str:
        """What makes it pass: fix the inputs, or accept it with the flag that names the rule."""
        if self.rule == "mismatch":
            return "use the pack and manifest made for this artifact, or pass --allow-mismatch to judge it anyway"
        if self.rule == "defect":
            return "a broken artifact: fix the export; no flag accepts it"
        return "resolve the warning, or drop --strict"

    def line(self) -> str:
        return f"{self.name}: {self.message} ({self.fix})"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "rule": self.rule, "code": self.code, "passed": False, "message": self.message,
                "fix": self.fix}


def judge_warnings(policy: Policy, findings: Any) -> list[WarningVerdict]:
    """The warnings that fail under ``policy``, in order (``findings``: objects with code, level, message)."""
    out: list[WarningVerdict] = []
    for f in findings:
        if f.level != "warning":
            continue
        if f.code in DEFECT_CODES:
            out.append(WarningVerdict("defect", f.code, f.message))
        elif f.code in MISMATCH_CODES and not policy.allow_mismatch:
            out.append(WarningVerdict("mismatch", f.code, f.message))
        elif policy.strict:
            out.append(WarningVerdict("strict", f.code, f.message))
    return out


__all__ = ["DEFECT_CODES", "GateResult", "MISMATCH_CODES", "Policy", "TOLERANCE",
           "WarningVerdict", "gates_from_mapping", "gates_from_recipe", "judge", "judge_one", "judge_warnings", "load_gates",
           "unmeasurable"]
