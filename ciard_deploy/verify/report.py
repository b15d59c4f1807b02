"""The verify report: data first (a dataclass with a JSON round trip), then JUnit and Markdown writers.

The JSON report (``kind: ciard.verify_report``, ``schema_version: 3``) holds::

    kind, schema_version, status ("passed" | "failed" | "not_gated"), created, tool
    artifact:  {path, name, sha256, size, backend, provider, precision, num_classes, input_spec,
                active_providers, metadata (the artifact's own), manifest: {path, listed, expected_sha256,
                sha256_matches, status, source_sha256} | null, metadata_source_sha256, source_sha256,
                pack_model_sha256, pack_matches_source}
    pack:      {path, file_sha256, checksum, format, schema_version, n, eps, eps_label, input_shape,
                num_classes, model: {...}, data: {dataset, split, n, seed, sampling}, attacks: [...],
                reference: {clean_acc, robust_acc: {label: acc}, worst_case_label, worst_case_acc, ...},
                versions, created, tool}
    settings:  {live_attacks: [spec, ...], live_n, batch_size, seed, provider, threads,
                state (the --state file, or null), parity_thresholds: {clean, adversarial}}
    results:   {n, clean_acc, reference_clean_acc,
                attacks: [{name, label, kind: whitebox|transfer|query, eps, eps_label, n, robust_acc, reference_acc,
                           drop, seconds, queries, origin: ran|resumed|reused, settings}],
                robust_acc: {label: acc}, worst_case: {label, acc, n, attacks},
                worst_case_transfer: {label, acc, n, attacks, reference_acc}}
    parity:    {clean: {n, top1_agreement, flips, flip_indices, max_abs_diff, mean_abs_diff,
                        max_prob_change, worst_index}, adversarial: {...} | null, per_attack: {label: {...}}}
    metrics:   {clean_acc, worst_case_acc, clean_drop, robust_drop, agreement_clean, agreement_adversarial,
                worst_case_transfer_acc, reference_clean_acc, reference_worst_case_acc,
                <family>_acc per query-only family (square_acc), live_acc, whitebox_acc}
    gates:     {gate: threshold}           the thresholds, so CI can re-judge without re-running
    gate_results: [{name, metric, op, threshold, measured, passed, description, message}]
    policy:    {allow_mismatch, strict, mismatch_codes, defect_codes}   how warnings are judged (``gates.Policy``)
    warning_results: [{name ("mismatch V104"), rule, code, passed (false), message, fix}]   the failing ones
    warnings:  [{code, check, level, title, message, doc}]
    timings:   {open_s, clean_s, transfer_s, inference_s, inference_images, inference_images_per_s,
                live_s, live_s_per_100_images, runtime: {images, calls, seconds, images_per_second}, total_s}
    versions:  {python, numpy, onnxruntime, ...}
    per_sample: {clean: "1101...", "<label>": "...", live_indices: [...] | null}

``status`` is ``failed`` when a gate failed or a warning fails under the policy (``warning_results``),
``passed`` when gates were set and none of that happened, and ``not_gated`` when no gate was set and
no warning failed: nothing was judged, and the report never calls that passed.

Each live attack (``kind: query``) covers the ``live_indices`` subset of the pack; the worst case then
covers that subset too. Schema 1 (before live attacks were a list) had ``settings.square_queries``,
``square_n``, ``square_p_init``, ``timings.square_s`` and ``per_sample.square_indices``; such reports
are still read (and re-judged). Schema 2 (before warnings were judged) had no ``policy``: such a report is
read with the default policy (mismatches fail, not strict) and its status computed again, so an old
report of a pack made for another model reads as failed, and one without gates as not gated.

``VerifyReport.rejudge(gates, policy)`` re-runs the gates and the warning policy on the stored metrics
and warnings. numpy-free and torch-free.
"""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from ciard_deploy.io import write_blocker
from ciard_deploy.errors import UsageError
from ciard_deploy.verify.checks import CHECKS, Finding
from ciard_deploy.verify.checks import DOCS as WARNING_DOCS
from ciard_deploy.options.gates import Gates
from ciard_deploy.verify.gates import GateResult, Policy, WarningVerdict, judge, judge_warnings
from ciard_deploy.errors import EnvironmentMissing
from ciard_deploy.io import atomic_write_text
from ciard_deploy.plots import accuracy_chart, rows_from_reports

REPORT_KIND = "ciard.verify_report"
SCHEMA_VERSION = 3

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    """The outcome of one ``ciard verify`` (see the module docstring for every key)."""

    artifact: dict[str, Any]
    pack: dict[str, Any]
    settings: dict[str, Any]
    results: dict[str, Any]
    parity: dict[str, Any]
    metrics: dict[str, Any]
    gates: dict[str, float] = field(default_factory=dict)
    gate_results: list[GateResult] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    policy: dict[str, Any] = field(default_factory=lambda: Policy().to_dict())
    timings: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    per_sample: dict[str, Any] | None = None
    created: str = ""
    tool: str = ""
    kind: str = REPORT_KIND
    schema_version: int = SCHEMA_VERSION

    # ---------------------------------------------------------------- verdict
    @property
    def gated(self) -> bool:
        """True when at least one gate was set."""
        return bool(self.gate_results)

    @property
    def failed(self) -> bool:
        """True when a gate failed or a warning fails under the policy (the CLI exits 1)."""
        return bool(self.failures() or self.warning_failures())

    @property
    def passed(self) -> bool:
        """True when gates were set and every one passed, and no warning fails (never without gates)."""
        return self.gated and not self.failed

    @property
    def status(self) -> str:
        """``failed``, ``passed``, or ``not_gated`` (no gate set, no failing warning: nothing was judged)."""
        return "failed" if self.failed else "passed" if self.gated else "not_gated"

    def failures(self) -> list[GateResult]:
        return [g for g in self.gate_results if not g.passed]

    def warning_failures(self) -> list[WarningVerdict]:
        """The warnings that fail under the report's policy (pseudo-gates ``mismatch V104``, ``strict V111``)."""
        return judge_warnings(Policy.from_dict(self.policy), self.warnings)

    def failure_summary(self) -> str:
        """One line for the CLI: ``"2 of 5 gates failed: min_clean (clean_acc 0.91 < required 0.95), ...;
        mismatch V104: the pack was built from ... (... pass --allow-mismatch ...)"``."""
        bad, warned = self.failures(), self.warning_failures()
        parts = []
        if bad:
            parts.append(f"{len(bad)} of {len(self.gate_results)} gates failed: "
                         + ", ".join(f"{g.name} ({g.message})" for g in bad))
        parts += [w.line() for w in warned]
        if parts:
            return "; ".join(parts)
        if not self.gated:
            return "no gates set: nothing was judged (set --min-clean, --min-robust, ... or --gates FILE)"
        return f"all {len(self.gate_results)} gates passed"

    def rejudge(self, gates: Gates | None = None, policy: Policy | None = None) -> "VerifyReport":
        """A copy judged again on the stored metrics and warnings, with ``gates`` and ``policy``
        (default: the stored thresholds and policy)."""
        g = gates if gates is not None else Gates.from_dict(self.gates, source="report gates")
        out = VerifyReport.from_dict(self.to_dict())
        out.gates, out.gate_results = g.to_dict(), judge(g, self.metrics)
        if policy is not None:
            out.policy = policy.to_dict()
        return out

    def warning_lines(self, level: str | None = None) -> list[str]:
        return [f.line() for f in self.warnings if level is None or f.level == level]

    @property
    def name(self) -> str:
        return str(self.artifact.get("name") or Path(str(self.artifact.get("path", "artifact"))).name)

    # ---------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "schema_version": self.schema_version, "status": self.status,
                "created": self.created, "tool": self.tool, "artifact": self.artifact, "pack": self.pack,
                "settings": self.settings, "results": self.results, "parity": self.parity, "metrics": self.metrics,
                "gates": self.gates, "gate_results": [g.to_dict() for g in self.gate_results],
                "policy": self.policy, "warning_results": [w.to_dict() for w in self.warning_failures()],
                "warnings": [f.to_dict() for f in self.warnings], "timings": self.timings,
                "versions": self.versions, "per_sample": self.per_sample}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VerifyReport":
        if not isinstance(d, Mapping) or d.get("kind") != REPORT_KIND:
            raise UsageError(f"not a ciard verify report (kind {d.get('kind') if isinstance(d, Mapping) else None!r})")
        version = int(d.get("schema_version", SCHEMA_VERSION))
        if version > SCHEMA_VERSION:
            raise UsageError(f"verify report schema {version} is newer than this ciard-deploy reads "
                             f"({SCHEMA_VERSION}); upgrade ciard-deploy")
        try:
            return cls(artifact=dict(d["artifact"]), pack=dict(d["pack"]), settings=dict(d["settings"]),
                       results=dict(d["results"]), parity=dict(d["parity"]), metrics=dict(d["metrics"]),
                       gates=dict(d.get("gates", {})),
                       gate_results=[GateResult.from_dict(g) for g in d.get("gate_results", [])],
                       warnings=[Finding.from_dict(f) for f in d.get("warnings", [])],
                       policy=Policy.from_dict(d.get("policy")).to_dict(),
                       timings=dict(d.get("timings", {})), versions=dict(d.get("versions", {})),
                       per_sample=d.get("per_sample"), created=d.get("created", ""), tool=d.get("tool", ""),
                       kind=d["kind"], schema_version=SCHEMA_VERSION)  # read as (and written back in) today's
        except KeyError as e:
            raise UsageError(f"verify report is missing the key {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n"

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> "VerifyReport":
        """From a JSON string or a file path."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            p = Path(text_or_path)
            try:
                text = p.read_text()
            except OSError as e:
                raise UsageError(f"cannot read verify report {p}: {e.strerror or e}") from None
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise UsageError(f"verify report is not valid JSON: {e}") from None

    # ---------------------------------------------------------------- JUnit
    def to_junit(self) -> str:
        """JUnit XML: one testsuite, one testcase per gate and one failing testcase per warning that fails
        under the policy (``mismatch V104``); a failed gate carries measured and required values. Without
        gates and failing warnings, one skipped testcase says nothing was judged (never a pass)."""
        total = float(self.timings.get("total_s") or 0.0)
        bad, warned = self.failures(), self.warning_failures()
        not_gated = self.status == "not_gated"
        tests = len(self.gate_results) + len(warned) + (1 if not_gated else 0)
        failures = len(bad) + len(warned)
        root = ET.Element("testsuites", name="ciard verify", tests=str(tests), failures=str(failures), errors="0",
                          skipped=str(int(not_gated)), time=f"{total:.3f}")
        suite = ET.SubElement(root, "testsuite", name=f"ciard verify {self.name}", tests=str(tests),
                              failures=str(failures), errors="0", skipped=str(int(not_gated)), time=f"{total:.3f}",
                              timestamp=self.created)
        props = ET.SubElement(suite, "properties")
        for k, v in self._properties().items():
            ET.SubElement(props, "property", name=k, value="" if v is None else str(v))
        classname = "ciard.verify." + "".join(c if c.isalnum() else "_" for c in self.name)
        for g in self.gate_results:
            case = ET.SubElement(suite, "testcase", classname=classname,
                                 name=f"{g.name}: {g.metric} {g.op} {g.threshold:g}", time="0")
            if not g.passed:
                measured = "not measured" if g.measured is None else f"{g.measured:.6g}"
                fail = ET.SubElement(case, "failure", type="GateFailed",
                                     message=f"{g.name}: {g.message}")
                fail.text = (f"gate: {g.name} ({g.description})\nmetric: {g.metric}\nmeasured: {measured}\n"
                             f"required: {g.op} {g.threshold:g}\n")
            else:
                out = ET.SubElement(case, "system-out")
                out.text = g.message
        for w in warned:
            case = ET.SubElement(suite, "testcase", classname=classname, name=w.name, time="0")
            fail = ET.SubElement(case, "failure", type={"mismatch": "MismatchWarning", "defect": "DefectWarning"}
                                 .get(w.rule, "StrictWarning"),
                                 message=w.line())
            fail.text = f"warning: {w.code} ({WARNING_DOCS}-{w.code.lower()})\n{w.message}\nto pass: {w.fix}\n"
        if not_gated:
            case = ET.SubElement(suite, "testcase", classname=classname, name="not gated", time="0")
            ET.SubElement(case, "skipped", message="no gates set: nothing was judged")
        lines = [f"{f.level}: {f.line()} (see {f.doc})" for f in self.warnings]
        if lines:
            ET.SubElement(suite, "system-err").text = "\n".join(lines)
        ET.indent(root)
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"

    def _properties(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "artifact": self.artifact.get("path"),
                               "artifact_sha256": self.artifact.get("sha256"),
                               "precision": self.artifact.get("precision"), "backend": self.artifact.get("backend"),
                               "provider": self.artifact.get("provider"), "pack": self.pack.get("path"),
                               "pack_checksum": self.pack.get("checksum"), "n": self.results.get("n"),
                               "seed": self.settings.get("seed")}
        out.update({f"metric.{k}": v for k, v in self.metrics.items() if v is not None})
        return out

    # ---------------------------------------------------------------- Markdown
    def to_markdown(self, chart: str | None = None) -> str:
        """A short report a pull-request comment can carry; ``chart`` names a PNG to embed."""
        a, r, m = self.artifact, self.results, self.metrics
        verdict = self._markdown_verdict()
        lines = [f"### ciard verify: `{self.name}` {verdict}", "",
                 f"{a.get('backend')} ({a.get('provider') or 'default'}), {a.get('precision')}, "
                 f"n={r.get('n')} from `{Path(str(self.pack.get('path') or 'pack')).name}` "
                 f"({self.pack.get('data', {}).get('dataset')}, seed {self.pack.get('data', {}).get('seed')})", "",
                 "| evaluation | runtime | reference | drop |", "|---|---:|---:|---:|",
                 f"| clean | {_pct(r.get('clean_acc'))} | {_pct(r.get('reference_clean_acc'))} | "
                 f"{_pts(m.get('clean_drop'))} |"]
        kinds = {"whitebox": "white-box on this artifact", "transfer": "transferred from PyTorch"}
        for att in r.get("attacks", []):
            how = kinds.get(att["kind"], f"query-only, n={att['n']}")
            lines.append(f"| {att['label']} ({how}) | {_pct(att['robust_acc'])} | {_pct(att.get('reference_acc'))} | "
                         f"{_pts(att.get('drop'))} |")
        wt, wc = r.get("worst_case_transfer"), r.get("worst_case")
        if wt:
            lines.append(f"| {wt['label']} (transfer) | {_pct(wt['acc'])} | {_pct(wt.get('reference_acc'))} | "
                         f"{_pts(m.get('robust_drop'))} |")
        if wc and (not wt or wc["label"] != wt["label"] or wc.get("upper_bound")):
            bound = " (upper bound)" if wc.get("upper_bound") else ""
            lines.append(f"| **{wc['label']}**{bound} (n={wc['n']}) | **{_pct(wc['acc'])}** | | |")
        if wc and wc.get("covers"):
            lines += ["", f"Worst case covers: {wc['covers']}."
                          + (f" **Upper bound**: {wc.get('upper_bound_reason')}." if wc.get("upper_bound") else "")
                          + " Reference: PyTorch for clean and transferred attacks; for white-box, the artifact's "
                            "runtime where the pack was built."]
        pc, pa = self.parity.get("clean") or {}, self.parity.get("adversarial")
        parity = (f"Parity with PyTorch: top-1 agreement {_pct(pc.get('top1_agreement'))} clean "
                  f"({pc.get('flips')} flips)")
        if pa:
            parity += f", {_pct(pa.get('top1_agreement'))} adversarial ({pa.get('flips')} flips)"
        parity += f"; max abs logit diff {pc.get('max_abs_diff', 0):.3g}"
        lines += ["", parity + "."]
        if chart:
            lines += ["", f"![clean and robust accuracy: PyTorch vs runtime]({chart})"]
        warned = self.warning_failures()
        if self.gate_results or warned:
            lines += ["", "| gate | measured | required | |", "|---|---:|---:|---|"]
            for g in self.gate_results:
                measured = "—" if g.measured is None else f"{g.measured:.4f}"
                lines.append(f"| {g.name} | {measured} | {g.op} {g.threshold:g} | {'✅' if g.passed else '❌'} |")
            for w in warned:
                need = {"mismatch": "no mismatch (or --allow-mismatch)", "defect": "finite logits"}.get(
                    w.rule, "no warning (--strict)")
                lines.append(f"| {w.name} | {_check_title(w.code)} | {need} | ❌ |")
        warn = [f for f in self.warnings if f.level == "warning"]
        if warn:
            lines += ["", "**Warnings**", ""] + [f"- ⚠️ `{f.code}` {f.message}" for f in warn]
        lines += ["", f"<sub>{self.tool}; artifact sha256 `{str(a.get('sha256') or '')[:12]}`, pack checksum "
                      f"`{str(self.pack.get('checksum') or '')[7:19]}`; {self.timings.get('total_s', 0):.1f} s</sub>"]
        return "\n".join(lines) + "\n"

    def _markdown_verdict(self) -> str:
        n_gates, bad, warned = len(self.gate_results), self.failures(), self.warning_failures()
        if self.status == "not_gated":
            return "➖ **not gated** (no gates set: nothing was judged)"
        parts = [f"{n_gates - len(bad)}/{n_gates} gates"] if n_gates else []
        parts += [w.name for w in warned]
        icon = "✅" if self.status == "passed" else "❌"
        return f"{icon} **{self.status}** ({'; '.join(parts)})"

    # ---------------------------------------------------------------- files
    def write_json(self, path: str | os.PathLike) -> Path:
        atomic_write_text(path, self.to_json())
        return Path(path)

    def write_junit(self, path: str | os.PathLike) -> Path:
        atomic_write_text(path, self.to_junit())
        return Path(path)

    def write_markdown(self, path: str | os.PathLike, chart: bool | Literal["file", "inline", "none"] = True) -> Path:
        """Writes the Markdown report with, where matplotlib is installed, a chart of clean and robust
        accuracy per attack for PyTorch vs this artifact.

        Args:
            path: the Markdown file.
            chart: ``"file"`` (or True): the chart is a PNG beside it (``<name>.png``), linked by name;
                ``"inline"``: the PNG is embedded in the Markdown as a ``data:image/png;base64`` URI (one
                self-contained file, for a CI step summary or a comment that cannot reach a file);
                ``"none"`` (or False): no chart. The torch-free device install has no matplotlib: the
                report then simply has no picture.
        """

        mode = ("file" if chart else "none") if isinstance(chart, bool) else chart
        if mode not in ("file", "inline", "none"):
            raise ValueError(f"chart must be 'file', 'inline' or 'none', not {chart!r}")
        path = Path(path)
        link = None
        if mode != "none":
            import tempfile


            try:
                with tempfile.TemporaryDirectory() as tmp:
                    target = path.with_suffix(".png") if mode == "file" else Path(tmp) / "chart.png"
                    png = accuracy_chart(rows_from_reports([self.to_dict()]), target,
                                         title=f"{self.name}: PyTorch vs runtime")
                    link = png.name if mode == "file" else _data_uri(png.read_bytes())
            except (EnvironmentMissing, ValueError) as e:
                log.info("no accuracy chart in the Markdown report: %s", e)
        atomic_write_text(path, self.to_markdown(chart=link))
        return path


def _data_uri(png: bytes) -> str:
    """A PNG as a ``data:`` URI a Markdown image can carry inline."""
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _check_title(code: str) -> str:
    info = CHECKS.get(code)
    return info.title if info is not None else code


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * float(v):.1f}%"


def _pts(v: Any) -> str:
    return "—" if v is None else f"{100 * float(v):+.1f} pt"


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, (np.floating, np.integer, np.bool_)):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, (Path, tuple, set)):
        return str(o) if isinstance(o, Path) else list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# --------------------------------------------------------------------------- output paths
def check_writable(path: str | os.PathLike, flag: str) -> Path:
    """Raises UsageError (exit 2) now if ``path`` could not be written later (a folder, a parent that
    is a file, or a read-only folder) or is a dangling symbolic link (what it points at is never created
    through it, nor the link silently replaced)."""
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise UsageError(f"cannot write {flag} {p}: it is a symbolic link to {os.readlink(p)}, which does not "
                         "exist; remove the link or give another path")
    if p.is_dir():
        raise UsageError(f"cannot write {flag} {p}: it is a folder")
    blocker = write_blocker(p.parent)
    if blocker:
        raise UsageError(f"cannot write {flag} {p}: {blocker}")
    return p


def check_report_paths(outputs: Mapping[str, str | os.PathLike | None],
                       inputs: Mapping[str, str | os.PathLike | None] = {}) -> None:  # noqa: B006
    """Every report path writable, distinct, and none of them an input file (``--json pack.npz``)."""
    seen: dict[Path, str] = {}
    for flag, value in inputs.items():
        if value is not None:
            seen[Path(value).resolve()] = flag
    for flag, value in outputs.items():
        if value is None:
            continue
        p = check_writable(value, flag)
        key = p.resolve()
        if key in seen:
            raise UsageError(f"{flag} {p} is the same file as {seen[key]}: it would be overwritten")
        seen[key] = flag


__all__ = ["REPORT_KIND", "SCHEMA_VERSION", "VerifyReport", "check_report_paths", "check_writable"]
