"""A recipe's ``deploy:`` section: what ``ciard run`` does after training (export, pack, verify, gates).

It is made of the option models of ``ciard_deploy.options``, not a copy of them: the export keys take
their defaults and descriptions from ``ExportOptions`` (tightened to the choices a recipe may name),
``pack:`` is ``PackOptions`` and ``gates:`` is ``Gates`` (both from the same table ``ciard pack`` and
``ciard verify`` read). ``DeployConfig.stage_options`` gives each ``ciard run`` stage the keys it reads
(``model_dump()``), and ``STAGE_KEYS`` assigns every field to a stage, so a new key cannot be left out
of a stage's skip decision (a unit test holds it).

The recipe YAML keys are those of before (``square_queries`` / ``square_n`` still read as
``live_attacks`` / ``live_n``); the recipe hash leaves this section out.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal, Mapping

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic.fields import FieldInfo

from ciard_deploy.config.sections import Section
from ciard_deploy.errors import CiardError
from ciard_deploy.export.base import FORMATS
from ciard_deploy.options.export import MAX_OPSET, MIN_OPSET, ExportOptions
from ciard_deploy.options.gates import Gates
from ciard_deploy.options.live import DEFAULT_LIVE, live_from_square_queries, parse_live
from ciard_deploy.options.pack import PackOptions

log = logging.getLogger(__name__)


def _export_field(name: str, description: str | None = None, **constraints: Any) -> Any:
    """A deploy key that means ``ExportOptions``' field ``name``: its default and description (or
    ``description``), with the recipe's ``constraints`` (``gt=0``: a recipe error at the key, where
    ``ExportOptions`` words the same rule for the CLI flag)."""
    f: FieldInfo = ExportOptions.model_fields[name]
    return Field(f.default, description=description or f.description, **constraints)


def _live_text(queries: Any) -> str:
    """``square_queries: 300`` as the new key reads it (``live_attacks: [square300]``)."""
    if isinstance(queries, int) and not isinstance(queries, bool) and queries >= 0:
        return f"live_attacks: [{f'square{queries}' if queries else ''}]"
    return f"live_attacks from {queries!r}"


class DeployConfig(Section):
    """What ``ciard run`` does after training: export, robustness pack, verification and its gates."""

    formats: list[str] = Field(default_factory=lambda: ["onnx", "onnx-int8"],
                               description="export formats (`ciard export --list`): onnx, onnx-fp16, onnx-int8, "
                                           "tensorrt-fp32, tensorrt-fp16, tensorrt-int8; each one is verified")
    opset: int = _export_field("opset")
    calib: Literal["clean", "adversarial", "mixed"] = _export_field("calib")
    calib_n: int = _export_field("calib_n", gt=0)
    calib_method: Literal["minmax", "entropy", "percentile"] = _export_field("calib_method")
    parity_n: int = _export_field("n", "test images of the export's parity check against PyTorch", gt=0)
    pack: PackOptions = Field(default_factory=PackOptions, description="the robustness pack built on the PyTorch "
                                                                        "student")
    live_attacks: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LIVE), validation_alias=AliasChoices("square_queries", "live_attacks"),
        description="query-only attacks run live on each runtime by verify (registered attacks that need no "
                    "gradients: square<Q>), e.g. [square1000]; [] turns them off (verify's --live). The old key "
                    "square_queries: N still reads as [square<N>] (0: []) and wins over live_attacks")
    live_n: int | None = Field(None, gt=0, validation_alias=AliasChoices("square_n", "live_n"),
                               description="images the live attacks attack (one seeded class-stratified subset of "
                                           "the pack; null: all; verify's --live-n; the old key square_n reads as it)")
    provider: Literal["cpu", "cuda", "tensorrt"] = _export_field(
        "provider", "onnxruntime execution provider of the export check and of verify")
    seed: int = _export_field("seed", "seed of the parity/pack samples, calibration, attacks and live attacks")
    gates: Gates = Field(default_factory=Gates,  # type: ignore[valid-type]
                         description="release gates, judged on every artifact (verify's --min-clean, ...); "
                                     "none set: the artifacts are reported NOT GATED, never passed")
    allow_mismatch: bool = Field(False, description="judge an artifact even when a warning says the numbers may not "
                                                    "be about it (V103, V104, V105, V109); false: such a warning "
                                                    "fails the run (verify's --allow-mismatch)")
    strict: bool = Field(False, description="every verify warning fails the run, mismatches included (verify's "
                                            "--strict)")

    #: the keys each ``ciard run`` stage reads (its fingerprint; ``pack`` and ``gates`` are sections of their
    #: own); every field is in one of them at least (tests/unit/test_config_split.py holds it)
    STAGE_KEYS: ClassVar[dict[str, tuple[str, ...]]] = {
        "export": ("formats", "opset", "calib", "calib_n", "calib_method", "parity_n", "provider", "seed"),
        "pack": ("pack", "seed"),
        "verify": ("live_attacks", "live_n", "seed", "provider", "gates", "allow_mismatch", "strict"),
    }

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one format (e.g. [onnx, onnx-int8])")
        for name in v:
            try:
                FORMATS.get(name)
            except CiardError as e:
                raise ValueError(str(e)) from None
        return list(dict.fromkeys(v))

    @field_validator("opset")
    @classmethod
    def _opset(cls, v: int) -> int:
        if not MIN_OPSET <= v <= MAX_OPSET:
            raise ValueError(f"opset must lie in {MIN_OPSET}..{MAX_OPSET}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _old_live_keys(cls, data: Any) -> Any:
        """The old keys (``square_queries``, ``square_n``) win over the new ones when both are given (an
        old ``--set deploy.square_queries=0`` on a recipe that has ``live_attacks``); validation maps them."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        for old, new in (("square_queries", "live_attacks"), ("square_n", "live_n")):
            if old in data:
                also = f", over {new}: {data.pop(new)!r}" if new in data else ""
                log.info("deploy.%s is the old name of deploy.%s: read as %s%s", old, new,
                         _live_text(data[old]) if old == "square_queries" else f"{new}: {data[old]!r}", also)
        return data

    @field_validator("live_attacks", mode="before")
    @classmethod
    def _live(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):  # the old key: square_queries: N
            if v == 1:
                raise ValueError("Square needs at least 2 queries per image (0 turns it off)")
            try:
                return live_from_square_queries(v, "square_queries")
            except CiardError as e:
                raise ValueError(str(e)) from None
        if v is None or isinstance(v, str):
            raise ValueError("give a list of query-only attacks, e.g. [square1000] ([] turns them off)")
        try:
            return parse_live(v, "", pack_hint="white-box attacks belong in deploy.pack.attacks (or "
                                                "deploy.pack.artifact_attacks for the artifacts themselves)")
        except CiardError as e:
            raise ValueError(str(e)) from None

    def gates_mapping(self) -> dict[str, float]:
        """The set gates as ``{name: threshold}`` (for ``verify.gates_from_mapping``)."""
        return self.gates.to_dict()

    def policy_mapping(self) -> dict[str, bool]:
        """How verify judges warnings, as ``{allow_mismatch, strict}`` (for ``verify.gates.Policy``)."""
        return {"allow_mismatch": self.allow_mismatch, "strict": self.strict}

    def stage_options(self, stage: str) -> dict[str, Any]:
        """The deploy keys ``stage`` reads, as ``model_dump()`` gives them (``pack``: its section's keys and the
        seed, flat; ``verify``: the live-attack settings, gates and policy left to ``gates_mapping`` and
        ``policy_mapping``)."""
        if stage == "export":
            return self.model_dump(include=set(self.STAGE_KEYS["export"]))
        if stage == "pack":
            return {**self.pack.model_dump(), "seed": self.seed}
        if stage == "verify":
            return self.model_dump(include=set(self.STAGE_KEYS["verify"]) - {"gates", "allow_mismatch", "strict"})
        raise ValueError(f"unknown stage {stage!r}")

    def export_options(self, dataset: str, data_root: str | None = None, threads: int | None = None) -> ExportOptions:
        """The ``ExportOptions`` of the export stage (its images come from the recipe's own ``data``)."""
        return ExportOptions(opset=self.opset, n=self.parity_n, seed=self.seed, calib=self.calib, calib_n=self.calib_n,
                             calib_method=self.calib_method, provider=self.provider, threads=threads, dataset=dataset,
                             data_root=data_root)


__all__ = ["DeployConfig"]
