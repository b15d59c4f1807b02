"""``ExportOptions``: everything ``export.run`` can be told besides the source, the output folder and the formats.

One schema: ``ciard export``'s flags take their defaults and help from these fields
(``cli/model_options.py``), a recipe's ``deploy:`` export keys reuse them (``config.deploy``) and
``ciard run``'s export fingerprint is their ``model_dump()``. ``MIN_AGREEMENT`` is the one table of the
per-precision top-1 agreement thresholds (export's defaults, verify's fallback).

Construction checks every option at once and raises one ``UsageError`` that names each bad flag.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ciard_deploy.errors import UsageError

Precision = Literal["fp32", "fp16", "int8"]
CalibSource = Literal["clean", "adversarial", "mixed"]
CalibMethod = Literal["minmax", "entropy", "percentile"]

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
CALIB_SOURCES: tuple[str, ...] = ("clean", "adversarial", "mixed")
CALIB_METHODS: tuple[str, ...] = ("minmax", "entropy", "percentile")
TRT_INT8_MODES: tuple[str, ...] = ("qdq", "calibrator")
PROVIDERS: tuple[str, ...] = ("cpu", "cuda", "tensorrt")
MIN_OPSET, MAX_OPSET = 13, 23

#: top-1 agreement with PyTorch below which an artifact of that precision fails its export check (and
#: verify warns, V102, when no manifest says otherwise); "unknown": a file whose precision is not recorded
MIN_AGREEMENT: dict[str, float] = {"fp32": 0.999, "fp16": 0.99, "int8": 0.97}


class ExportOptions(BaseModel):
    """Everything ``export.run`` can be told besides the source, the output folder and the formats.

    ``calib``, ``calib_method``, ``trt_int8`` and ``provider`` are plain strings checked against their
    choices with the other options, so one ``UsageError`` lists every problem (see the field descriptions).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    opset: int = Field(18, description="ONNX opset of the exported files (checked in the saved file)")
    batch: int | Literal["dynamic"] = Field("dynamic", description="'dynamic' or a fixed batch size baked into "
                                                                   "the graph/engine")
    dataset: str | None = Field(None, description="dataset for parity and calibration (default: the checkpoint's)")
    data_root: str | None = Field(None, description="where the dataset files are")
    n: int = Field(512, description="test images of the export's parity check against PyTorch and of the reference "
                                    "metrics (seeded, class-stratified)")
    seed: int = Field(0, description="seed of every sample and attack")
    eps: float | None = Field(None, description="L-inf budget of the reference attack and of adversarial "
                                                "calibration (default: the checkpoint's)")
    reference_attack: str | None = Field("pgd20", description="white-box attack of the PyTorch reference metrics "
                                                              "(None: clean only)")
    calib: str = Field("clean", description="INT8 calibration images: clean, adversarial (PGD on the FP32 student) "
                                            "or mixed")
    calib_n: int = Field(512, description="INT8 calibration images from the training split")
    calib_method: str = Field("minmax", description="onnxruntime INT8 calibration method: minmax, entropy or "
                                                    "percentile")
    calib_attack: str = Field("pgd20", description="attack that makes the adversarial calibration images")
    int8_symmetric: bool = Field(True, description="symmetric activation ranges (zero point 0), which TensorRT "
                                                   "requires")
    min_agreement_fp32: float = Field(MIN_AGREEMENT["fp32"], description="minimum top-1 agreement of an FP32 "
                                                                          "artifact with PyTorch (fraction)")
    min_agreement_fp16: float = Field(MIN_AGREEMENT["fp16"], description="minimum top-1 agreement of an FP16 "
                                                                          "artifact with PyTorch (fraction)")
    min_agreement_int8: float = Field(MIN_AGREEMENT["int8"], description="minimum top-1 agreement of an INT8 "
                                                                          "artifact with PyTorch (fraction)")
    provider: str = Field("cpu", description="onnxruntime execution provider of the export check (and of verify): "
                                             "cpu, cuda or tensorrt")
    threads: int | None = Field(None, description="onnxruntime intra-op threads for the check (None: its default)")
    simplify: bool = Field(True, description="onnxslim/onnxsim on the FP32 graph when installed")
    arch: str | None = Field(None, description="architecture of a plain state dict without ciard metadata (with "
                                               "--dataset)")
    workspace_mb: int = Field(1024, description="TensorRT builder workspace (MiB)")
    min_batch: int = Field(1, description="TensorRT profile's smallest batch (dynamic batch)")
    opt_batch: int = Field(32, description="TensorRT profile's optimal batch (dynamic batch)")
    max_batch: int = Field(256, description="TensorRT profile's largest batch (dynamic batch)")
    trt_int8: str = Field("qdq", description="INT8 engine from the QDQ ONNX (qdq: explicit quantization) or an "
                                             "entropy calibrator with a calibration cache (calibrator)")
    timing_cache: str | None = Field(None, description="TensorRT timing cache file (default: under $CIARD_CACHE)")

    @model_validator(mode="after")
    def _check(self) -> "ExportOptions":
        """Every option at once: one UsageError (exit 2) naming each bad flag."""
        errs: list[str] = []
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            errs.append(f"--opset must be an integer in {MIN_OPSET}..{MAX_OPSET}, got {self.opset!r}")
        if self.batch != "dynamic" and not self.batch >= 1:
            errs.append(f"--batch must be 'dynamic' or a positive integer, got {self.batch!r}")
        for name in ("n", "calib_n", "workspace_mb", "min_batch", "opt_batch", "max_batch"):
            if int(getattr(self, name)) < 1:
                errs.append(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            errs.append(f"TensorRT profile needs min <= opt <= max batch, got {self.min_batch}/{self.opt_batch}/"
                        f"{self.max_batch}")
        for flag, value, choices in (("--calib", self.calib, CALIB_SOURCES),
                                     ("--calib-method", self.calib_method, CALIB_METHODS),
                                     ("--trt-int8", self.trt_int8, TRT_INT8_MODES)):
            if value not in choices:
                errs.append(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
        for p in PRECISIONS:
            t = self.threshold(p)
            if not 0.0 <= t <= 1.0:
                errs.append(f"--min-agreement-{p} must lie in [0, 1] (a fraction), got {t}")
        if self.eps is not None and not 0.0 <= float(self.eps) <= 1.0:
            errs.append(f"--eps must lie in [0, 1], got {self.eps}")
        if self.provider not in PROVIDERS:
            errs.append(f"--provider must be cpu, cuda or tensorrt, got {self.provider!r}")
        if self.threads is not None and self.threads < 1:
            errs.append(f"--threads must be positive, got {self.threads}")
        if errs:
            raise UsageError("; ".join(errs))  # not a ValueError: pydantic lets it through as is
        return self

    def threshold(self, precision: str) -> float:
        """The agreement threshold of ``precision`` (fp32, fp16, int8)."""
        return float(getattr(self, f"min_agreement_{precision}"))

    def with_overrides(self, **overrides: Any) -> "ExportOptions":
        """These options with ``overrides`` replacing fields (checked again); an unknown name is a UsageError."""
        bad = sorted(set(overrides) - set(type(self).model_fields))
        if bad:
            raise UsageError(f"unknown export option(s) {', '.join(bad)}; known: "
                             f"{', '.join(sorted(type(self).model_fields))}")
        return type(self)(**{**self.model_dump(), **overrides})

    def validate(self) -> "ExportOptions":  # type: ignore[override]
        """The options (construction already checked them; kept so a caller states where it relies on that)."""
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


__all__ = ["CALIB_METHODS", "CALIB_SOURCES", "CalibMethod", "CalibSource", "ExportOptions", "MAX_OPSET",
           "MIN_AGREEMENT", "MIN_OPSET", "PRECISIONS", "PROVIDERS", "Precision", "TRT_INT8_MODES"]
