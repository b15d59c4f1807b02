"""Rich tables for people. No logic: every number comes from a ``VerifyReport`` or a pack summary."""

from __future__ import annotations

from typing import Any, Mapping

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ciard_deploy.verify.report import VerifyReport


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * float(v):.2f}%"


def _pts(v: Any) -> str:
    return "" if v is None else f"{100 * float(v) + 0.0:+.2f}"


def results_table(report: VerifyReport) -> Table:
    a, r, m = report.artifact, report.results, report.metrics
    t = Table(title=f"{report.name} on {a.get('backend')} ({a.get('provider') or 'default'}, {a.get('precision')}), "
                    f"n={r.get('n')}", title_justify="left")
    t.add_column("evaluation", overflow="fold")
    t.add_column("n", justify="right")
    t.add_column("runtime", justify="right")
    t.add_column("reference", justify="right")
    t.add_column("drop pt", justify="right")
    t.add_row("clean", str(r.get("n")), _pct(r.get("clean_acc")), _pct(r.get("reference_clean_acc")),
              _pts(m.get("clean_drop")))
    for att in r.get("attacks", []):
        kind = KIND_NAMES.get(att["kind"], att["kind"])
        if att.get("origin", "ran") != "ran":
            kind += f", {att['origin']}"  # continued from, or taken from, a --state file
        t.add_row(f"{att['label']} ({kind})", str(att["n"]), _pct(att["robust_acc"]), _pct(att.get("reference_acc")),
                  _pts(att.get("drop")))
    wt, wc = r.get("worst_case_transfer"), r.get("worst_case")
    if wt:
        t.add_row(f"{wt['label']} (transfer)", str(wt["n"]), _pct(wt["acc"]), _pct(wt.get("reference_acc")),
                  _pts(m.get("robust_drop")))
    if wc and (not wt or wc["label"] != wt["label"] or wc.get("upper_bound")):
        bound = " [yellow](upper bound)[/]" if wc.get("upper_bound") else ""
        t.add_row(f"[bold]{wc['label']}[/]{bound}", str(wc["n"]), f"[bold]{_pct(wc['acc'])}[/]", "", "")
    if wc and wc.get("covers"):
        t.caption = (f"worst case covers: {wc['covers']}"
                     + (f"; UPPER BOUND: {wc.get('upper_bound_reason')}" if wc.get("upper_bound") else "")
                     + ". reference: PyTorch (clean, transfer), the artifact's runtime where the pack was built "
                       "(white-box)")
        t.caption_justify = "left"
    return t


#: how each kind of attack is named in tables
KIND_NAMES = {"whitebox": "white-box on this artifact", "transfer": "transferred from PyTorch", "query": "query-only"}


def parity_table(report: VerifyReport) -> Table:
    t = Table(title="parity with the PyTorch reference", title_justify="left")
    for col in ("images", "n", "agree", "flips", "max |dz|", "mean |dz|"):
        t.add_column(col, justify="left" if col == "images" else "right", overflow="fold")
    rows: list[tuple[str, Mapping[str, Any]]] = [("clean", report.parity["clean"])]
    if report.parity.get("adversarial"):
        rows.append(("adversarial", report.parity["adversarial"]))
    rows += [(f"  {k}", v) for k, v in report.parity.get("per_attack", {}).items()]
    for name, p in rows:
        odd = f" ({p['nonfinite']} NaN/inf)" if p.get("nonfinite") else ""  # V114: differences of the finite rows
        t.add_row(name, str(p["n"]), _pct(p["top1_agreement"]), str(p["flips"]), f"{p['max_abs_diff']:.3g}{odd}",
                  f"{p['mean_abs_diff']:.3g}")
    return t


def gates_table(report: VerifyReport) -> Table | None:
    """The gates and the warnings that fail under the report's policy (pseudo-gates), or None if neither."""
    warned = report.warning_failures()
    if not report.gate_results and not warned:
        return None
    t = Table(title="gates", title_justify="left")
    for col in ("gate", "metric", "measured", "required", "result"):
        t.add_column(col, justify="right" if col in ("measured", "required") else "left")
    for g in report.gate_results:
        measured = "—" if g.measured is None else f"{g.measured:.4f}"
        t.add_row(g.name, g.metric, measured, f"{g.op} {g.threshold:g}",
                  "[green]pass[/]" if g.passed else "[bold red]FAIL[/]")
    for w in warned:
        need = {"mismatch": "none (or --allow-mismatch)", "defect": "finite logits"}.get(w.rule, "none (--strict)")
        t.add_row(w.name, "warning", w.code, need, "[bold red]FAIL[/]")
    return t


def render_report(report: VerifyReport, console: Console) -> None:
    """Results, parity, gates, warnings and the verdict."""
    parts: list[Any] = [results_table(report), parity_table(report)]
    gates = gates_table(report)
    if gates is not None:
        parts.append(gates)
    for f in report.warnings:
        style = "yellow" if f.level == "warning" else "dim"
        parts.append(Text(f"{f.level}: {f.line()}", style=style))
    tm = report.timings
    rate = tm.get("inference_images_per_s")
    live_s = tm.get("live_s", tm.get("square_s", 0))  # square_s: a schema-1 report
    parts.append(Text(f"inference: {tm.get('inference_images', 0)} images at {rate or 0:,.0f} img/s; live attacks: "
                      f"{live_s or 0:.1f} s; total {tm.get('total_s', 0):.1f} s", style="dim"))
    status = report.status
    style = {"passed": "bold green", "failed": "bold red"}.get(status, "bold yellow")
    parts.append(Text(f"{status.replace('_', ' ').upper()}: {report.failure_summary()}", style=style))
    console.print(Group(*parts))


def _pack_eps_caption(summary: Mapping[str, Any]) -> str:
    """The pack's budget against the training eps its checkpoint records."""
    label = escape(str(summary.get("eps_label")))
    if summary.get("eps_warning"):
        return f"[bold yellow]warning: {escape(summary['eps_warning'])}[/]"
    if summary.get("training_eps") is None:
        return f"eps {label} (the checkpoint records no training eps)"
    return f"eps {label}: the training eps recorded in the checkpoint"


def render_pack(summary: Mapping[str, Any], console: Console) -> None:
    """The reference numbers of a freshly built pack."""
    ref = summary["reference"]
    data = summary["data"]
    t = Table(title=f"pack {summary.get('path')}: {summary['model']['arch']} on {data['dataset']} {data['split']} "
                    f"(n={summary['n']}, seed {data['seed']})", title_justify="left")
    t.add_column("evaluation")
    t.add_column("PyTorch accuracy", justify="right")
    t.add_column("seconds", justify="right")
    t.add_row("clean", _pct(ref["clean_acc"]), "")
    for a in summary["attacks"]:
        t.add_row(a["label"], _pct(ref["robust_acc"].get(a["label"])), f"{a.get('seconds', 0):.1f}")
    if ref.get("worst_case_label"):
        t.add_row(f"[bold]{ref['worst_case_label']}[/]", f"[bold]{_pct(ref['worst_case_acc'])}[/]", "")
    console.print(t)
    console.print(_pack_eps_caption(summary), highlight=False, soft_wrap=True)
    arts = summary.get("artifacts") or []
    if arts:
        w = Table(title="white-box on each artifact", title_justify="left",
                  caption="gradients from each artifact's twin, every iterate scored on its own runtime",
                  caption_justify="left")
        for col in ("artifact", "attacks", "clean", "robust", "twin agreement", "seconds"):
            w.add_column(col, justify="left" if col in ("artifact", "attacks") else "right", overflow="fold")
        for a in arts:
            if a.get("skipped"):
                w.add_row(a.get("name", "?"), f"[yellow]none: {a['skipped']}[/]", "", "", "", "")
                continue
            fid = (a.get("twin") or {}).get("fidelity") or {}
            trusted = "" if (a.get("twin") or {}).get("trusted", True) else " [yellow](untrusted)[/]"
            w.add_row(a.get("name", "?"), str(a.get("label")), _pct(a.get("clean_acc")), _pct(a.get("robust_acc")),
                      _pct(fid.get("agreement")) + trusted, f"{a.get('seconds', 0):.1f}")
        console.print(w)
    console.print(Text(f"pack checksum {str(summary.get('checksum'))[:19]}..., model sha256 "
                       f"{str(summary['model'].get('sha256'))[:12]}...", style="dim"))


__all__ = ["gates_table", "parity_table", "render_pack", "render_report", "results_table"]
