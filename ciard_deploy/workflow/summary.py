"""What a ``ciard run`` call tells its caller: the stage events as they happen (``StageEvent``), each
stage's outcome, and the result (``WorkflowResult``: one row per artifact, the PyTorch reference and
the failures, read back from the manifest and the reports on disk by ``summarize``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ciard_deploy.export.manifest import load_manifest
from ciard_deploy.checkpoints import checkpoint_paths, resolve_checkpoint
from ciard_deploy.verify.report import VerifyReport
from ciard_deploy.workflow.state import QAT_NAME, QAT_REPORT, Layout, paths_of, report_paths


@dataclass
class StageEvent:
    """What ``on_event`` receives: ``start`` (with the action and why), ``skip`` (why) or ``end`` (seconds)."""

    kind: Literal["start", "skip", "end"]
    stage: str
    action: str
    reason: str
    seconds: float | None = None


@dataclass
class StageOutcome:
    """What happened to one stage in this call: ``ran``, ``resumed``, ``rejudged`` or ``skipped``, and why."""

    stage: str
    action: str
    reason: str
    seconds: float = 0.0


@dataclass
class WorkflowResult:
    """The outcome of ``run``: per-stage outcomes, one row per artifact, the report files, the verdict.

    Attributes:
        out_dir: the workflow dir.
        stages: stage name -> StageOutcome of this call.
        rows: one dict per artifact (name, file, precision, size, clean, worst_case {label, acc, n},
            agreement, gates {passed, total, failed}, status, export_status, reports).
        reference: the PyTorch student's numbers from the pack (clean, worst case over the pack's
            attacks, size of its checkpoint).
        failures: one line per failed gate, failing warning (``mismatch V104``) or export check.
        state: the content of ``workflow.json``.
        qat: the recipe has a ``quantize:`` section (its paths list DIR/qat/).
    """

    out_dir: Path
    stages: dict[str, StageOutcome]
    rows: list[dict[str, Any]]
    reference: dict[str, Any]
    failures: list[str]
    state: dict[str, Any]
    qat: bool = False

    @property
    def failed(self) -> bool:
        """A gate, a warning under the policy or an export check failed (``ciard run`` exits 1)."""
        return bool(self.failures)

    @property
    def gated(self) -> bool:
        """Every artifact had gates to judge (a recipe without ``deploy.gates`` judges nothing)."""
        return bool(self.rows) and all(r["gates"]["total"] > 0 for r in self.rows)

    @property
    def passed(self) -> bool:
        """Nothing failed and every artifact was judged by gates (never True without gates)."""
        return not self.failed and self.gated

    @property
    def status(self) -> str:
        """``failed``, ``passed`` or ``not_gated`` (nothing failed, but no gates were set: nothing was judged)."""
        return "failed" if self.failed else "passed" if self.gated else "not_gated"

    def reports(self) -> list[Path]:
        """Every report file (JSON, JUnit, Markdown) of every artifact."""
        return [self.out_dir / p for row in self.rows for p in row["reports"].values()]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "ciard.workflow_result", "status": self.status, "out_dir": str(self.out_dir),
                "stages": {k: asdict(v) for k, v in self.stages.items()}, "artifacts": self.rows,
                "reference": self.reference, "failures": self.failures,
                "paths": paths_of(Layout(self.out_dir), self.qat), "state": self.state}


def verified_artifacts(layout: Layout, qat: bool = False) -> list[tuple[str, Any, Path]]:
    """(report name, artifact record, file) of every artifact verify measures: the export manifest's, then
    the quantize stage's QAT artifact (report name ``onnx-int8-qat``) when ``qat`` (a recipe with ``quantize:``)."""
    out = [(a.name, a, layout.export / a.file) for a in load_manifest(layout.export).artifacts]
    if qat:
        out += [(QAT_REPORT, a, layout.qat / a.file) for a in load_manifest(layout.qat).artifacts]
    return out


def summarize(layout: Layout, qat: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """Rows per artifact, the PyTorch reference and the failures, from the manifests and the reports on disk
    (``qat``: the quantize stage's artifact too, in a row named ``onnx-int8 (qat)``: ``QAT_NAME``)."""
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    pack: dict[str, Any] = {}
    for report_name, a, file in verified_artifacts(layout, qat):
        paths = report_paths(layout, report_name)
        name = QAT_NAME if report_name == QAT_REPORT else a.name
        rep = VerifyReport.from_json(paths["json"])
        pack = rep.pack
        wc = rep.results.get("worst_case") or {}
        bad, warned = rep.failures(), rep.warning_failures()
        rows.append({
            "name": name, "file": layout.rel(file), "format": a.format, "precision": a.precision,
            "runtime": rep.artifact.get("backend"), "size": a.size, "sha256": a.sha256,
            "clean": rep.metrics.get("clean_acc"),
            "worst_case": {"label": wc.get("label"), "acc": wc.get("acc"), "n": wc.get("n"),
                           "covers": wc.get("covers"), "upper_bound": wc.get("upper_bound"),
                           "upper_bound_reason": wc.get("upper_bound_reason")},
            "worst_case_transfer": rep.results.get("worst_case_transfer"),
            "agreement": rep.metrics.get("agreement_clean"),
            "agreement_adversarial": rep.metrics.get("agreement_adversarial"),
            "gates": {"passed": len(rep.gate_results) - len(bad), "total": len(rep.gate_results),
                      "failed": [g.name for g in bad]},
            "failed_warnings": [w.name for w in warned],
            "status": rep.status, "export_status": a.status,
            "warnings": [f.line() for f in rep.warnings if f.level == "warning"],
            "reports": {k: layout.rel(p) for k, p in paths.items()},
        })
        if bad or warned:
            failures.append(f"{name}: {rep.failure_summary()}")
        if not a.passed:
            p = a.parity.get("clean", {})
            failures.append(f"{name}: export check failed (top-1 agreement with PyTorch "
                            f"{p.get('top1_agreement', 0):.2%} < {p.get('threshold', 0):.1%})")
    ref = pack.get("reference", {})
    ckpt = resolve_checkpoint(layout.run)
    reference = {"name": "pytorch", "file": layout.rel(ckpt), "precision": "fp32", "runtime": "torch",
                 "size": sum(p.stat().st_size for p in checkpoint_paths(ckpt) if p.is_file() and p.suffix != ".json"),
                 "clean": ref.get("clean_acc"),
                 "worst_case": {"label": ref.get("worst_case_label"), "acc": ref.get("worst_case_acc"),
                                "n": pack.get("n")},
                 "n": pack.get("n"), "eps_label": pack.get("eps_label")}
    return rows, reference, failures


__all__ = ["StageEvent", "StageOutcome", "WorkflowResult", "summarize", "verified_artifacts"]
