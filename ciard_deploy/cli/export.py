"""`ciard export` (student -> checked ONNX / TensorRT artifacts + manifest) and `ciard inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ciard_deploy.cli.app import app
from ciard_deploy.cli.common import (JsonOption, ForceJsonOption, ThreadsOption, apply_threads, artifact_inputs,
                                     check_outputs, checkpoint_inputs, console, err_console, from_run_folder,
                                     handle_errors, note, progress, write_json)
from ciard_deploy.cli.model_options import model_option
from ciard_deploy.errors import CiardError, GateFailed, UsageError
from ciard_deploy.options.export import ExportOptions
from ciard_deploy.run_folder import is_export_folder, is_run_folder, resolve_run_folder, stale_qat
from ciard_deploy.workflow.state import Layout
from ciard_deploy.signals import terminate_as_interrupt
from ciard_deploy import export
from ciard_deploy.attacks.budget import format_eps, parse_eps
from ciard_deploy.export.inspection import inspect_artifact, raise_mismatches


def _parse_batch(text: str) -> int | str:
    t = text.strip().lower()
    if t == "dynamic":
        return "dynamic"
    try:
        value = int(t)
    except ValueError:
        raise UsageError(f"--batch must be 'dynamic' or a positive integer, got {text!r}") from None
    if value < 1:
        raise UsageError(f"--batch must be 'dynamic' or a positive integer, got {text!r}")
    return value


@app.command("export")
@handle_errors
def export_cmd(
    source: Optional[Path] = typer.Argument(None, help="Run dir (its best student), `ciard run` folder, or ciard checkpoint (.safetensors + .json)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder for the artifacts and manifest.json."),
    onnx: bool = typer.Option(False, "--onnx", help="ONNX FP32 (the default when no format flag is given; also written whenever another format is chosen: they derive from it)."),
    fp16: bool = typer.Option(False, "--fp16", help="ONNX FP16 (and an FP16 engine with --tensorrt)."),
    int8: bool = typer.Option(False, "--int8", help="ONNX INT8 QDQ (and an INT8 engine with --tensorrt)."),
    tensorrt: bool = typer.Option(False, "--tensorrt", help="TensorRT engine per chosen precision (FP32 if none): needs TensorRT and an NVIDIA GPU."),
    opset: int = model_option(ExportOptions, "opset"),
    batch: str = model_option(ExportOptions, "batch"),
    calib: str = model_option(ExportOptions, "calib"),
    calib_n: int = model_option(ExportOptions, "calib_n"),
    calib_method: str = model_option(ExportOptions, "calib_method"),
    dataset: Optional[str] = model_option(ExportOptions, "dataset", "--dataset", "-d"),
    data_root: Optional[str] = model_option(ExportOptions, "data_root"),
    n: int = model_option(ExportOptions, "n"),
    eps: Optional[str] = model_option(ExportOptions, "eps"),
    min_agreement_fp32: float = model_option(ExportOptions, "min_agreement_fp32"),
    min_agreement_fp16: float = model_option(ExportOptions, "min_agreement_fp16"),
    min_agreement_int8: float = model_option(ExportOptions, "min_agreement_int8"),
    provider: str = model_option(ExportOptions, "provider"),
    threads: ThreadsOption = None,
    seed: int = model_option(ExportOptions, "seed"),
    arch: Optional[str] = model_option(ExportOptions, "arch"),
    workspace_mb: int = model_option(ExportOptions, "workspace_mb"),
    max_batch: int = model_option(ExportOptions, "max_batch"),
    trt_int8: str = model_option(ExportOptions, "trt_int8"),
    simplify: bool = model_option(ExportOptions, "simplify"),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs (the artifacts, manifest.json, --json)."),
    list_formats: bool = typer.Option(False, "--list", help="Show the formats, their options and whether they can run here, then exit."),
    json_out: Optional[Path] = typer.Option(
        None, "--json", help="Also write the manifest (with --list: the format table) as JSON to this file; - writes it "
                             "to stdout (the tables then go to stderr). An existing file needs --force."),
) -> None:
    """Export a student to ONNX (FP32/FP16/INT8) and TensorRT, check each artifact against PyTorch, write manifest.json.

    Without a format flag it exports ONNX FP32 (as --onnx).
    """

    if list_formats:
        check_outputs({"--json": json_out}, force)
        rows = export.format_table()
        render_formats(rows)
        write_json(json_out, rows, force)
        return
    if source is None:
        raise UsageError("missing SOURCE: a run dir or a ciard checkpoint (see ciard export --help)")
    if out is None:
        raise UsageError("missing --out DIR: where the artifacts and manifest.json go")
    check_outputs({"--json": json_out}, force, checkpoint_inputs(source, "SOURCE"))
    source = from_run_folder(source, "checkpoint")
    threads = apply_threads(threads)
    if not (onnx or fp16 or int8 or tensorrt):
        onnx = True  # no format flag: ONNX FP32
    formats = export.formats_from_flags(onnx=onnx, fp16=fp16, int8=int8, tensorrt=tensorrt)
    options = ExportOptions(
        opset=opset, batch=_parse_batch(batch), dataset=dataset, data_root=data_root, n=n, seed=seed,
        eps=parse_eps(eps) if eps is not None else None, calib=calib, calib_n=calib_n, calib_method=calib_method,
        min_agreement_fp32=min_agreement_fp32, min_agreement_fp16=min_agreement_fp16,
        min_agreement_int8=min_agreement_int8, provider=provider, threads=threads, simplify=simplify, arch=arch,
        workspace_mb=workspace_mb, max_batch=max_batch, opt_batch=min(32, max_batch), trt_int8=trt_int8)
    with terminate_as_interrupt(), progress("export", unit="step") as update:  # SIGTERM: staging removed, exit 130
        result = export.run(source, out, formats, options, force=force, progress=update, check=False)
    manifest = result.manifest.to_dict()
    render_manifest(manifest)
    write_json(json_out, manifest, force)
    console.print(f"wrote {len(manifest['artifacts'])} artifact(s) and manifest.json to {out}", highlight=False)
    if not result.passed:
        raise GateFailed(f"export check failed: {'; '.join(result.failures())} (kept, marked failed in the manifest)")


@app.command("inspect")
@handle_errors
def inspect_cmd(
    path: Path = typer.Argument(..., help="Export folder, `ciard run` folder (its export/; its qat/ is a folder to "
                                          "inspect of its own), manifest.json, .onnx file or .engine/.plan file."),
    json_out: JsonOption = None,
    force: ForceJsonOption = False,
) -> None:
    """Show an export's manifest (checking file hashes), or what an ONNX file or engine holds.

    Any ONNX file (ciard's or not): inputs and outputs, opsets, op histogram, QDQ nodes and the share of weights
    stored as int8/uint8, file and weight sizes, producer and metadata; a ciard artifact also its ciard metadata.
    A file that is not what its manifest records (missing, another size or sha256) is exit 2, after the table.
    """

    try:
        read = resolve_run_folder(path, "export")
    except CiardError:
        read = path  # inspect_artifact says what is wrong with it
    check_outputs({"--json": json_out}, force, {**artifact_inputs(read, "PATH"), "PATH": path})
    rep = inspect_artifact(from_run_folder(path, "export"))
    if is_run_folder(path) and is_export_folder(Layout(path).qat):  # one manifest per call: the export's
        stale = " (left from an earlier recipe with quantize:)" if stale_qat(path) else ""
        note(f"the run folder also holds its quantize stage's QAT artifact{stale}: `ciard inspect {Layout(path).qat}`")
    if rep["kind"] == "manifest":
        render_manifest(rep["manifest"])
    else:
        if rep.get("onnx"):
            render_onnx_summary(rep)
        if rep["metadata"] or rep.get("manifest_entry") or not rep.get("onnx"):
            render_artifact_metadata(rep, other_props=not rep.get("onnx"))
    for problem in rep["problems"]:
        if problem not in rep["mismatches"]:
            err_console.print(f"[bold yellow]warning:[/] {escape(problem)}", highlight=False)
    raise_mismatches(rep)  # exit 2, one line; no --json written
    write_json(json_out, rep, force)


# --------------------------------------------------------------------------- rendering (no logic)
def _fmt_size(size: int) -> str:
    return f"{size / 1024:,.1f} KiB" if size < 1 << 20 else f"{size / (1 << 20):,.2f} MiB"


def render_formats(rows: list[dict[str, Any]]) -> None:
    t = Table(title="export formats")
    for col in ("name", "flags", "file", "GPU", "consumes", "here"):
        t.add_column(col)
    reasons: dict[str, str] = {}
    for r in rows:
        ok = r["status"] == "ok"
        if not ok:
            reasons[r["runtime"]] = r["status"]
        t.add_row(r["name"], r["flags"], r["file"], "yes" if r["gpu"] else "no", ", ".join(r["needs"]) or "-",
                  "[green]ok[/]" if ok else "[yellow]unavailable[/]")
    console.print(t)
    for r in rows:
        console.print(f"{r['name']}: {r['description']}; options: {', '.join(r['options']) or '-'}", highlight=False,
                      markup=False)
    for runtime, why in reasons.items():
        console.print(f"{runtime}: {why}", highlight=False, markup=False)


def render_manifest(m: dict[str, Any]) -> None:
    # a manifest that validates may still lack keys (load_manifest types what is there): "-" for those
    src, model, ref = m["source"], m["model"], m["reference"]
    head = Table(title=f"export of {model.get('arch', '-')} ({m['status']})", show_header=False)
    head.add_column("key")
    head.add_column("value")
    head.add_row("source", f"{src.get('checkpoint', '-')} (sha256 {str(src.get('sha256'))[:12]}...)")
    head.add_row("recipe hash", src.get("recipe_hash") or "-")
    head.add_row("model", f"{model.get('num_classes', '-')} classes, input {model.get('input_shape', '-')}, "
                          f"dataset {model.get('dataset', '-')}, eps {_eps(model.get('eps'))}")
    refs = [f"clean {_num(ref.get('clean_acc'))}"] + [f"{k} {_num(v.get('robust_acc'))}"
                                                     for k, v in ref.get("attacks", {}).items()]
    head.add_row("PyTorch reference", f"{', '.join(refs)} on {ref.get('n', '-')} {ref.get('dataset', '-')} "
                                      f"{ref.get('split', '-')} images")
    if m.get("calibration"):
        c = m["calibration"]
        head.add_row("INT8 calibration", f"{c.get('source')} ({c.get('n')} {c.get('split')} images, method "
                                         f"{c.get('method')}, attack {c.get('attack') or '-'}, sha256 "
                                         f"{str(c.get('sha256'))[:12]}...)")
    head.add_row("versions", ", ".join(f"{k} {v}" for k, v in m["versions"].items()
                                       if k in ("torch", "onnx", "onnxruntime", "onnxscript", "tensorrt")))
    console.print(head)

    t = Table(title="artifacts: parity with PyTorch on the same test images (agreement gates, |Δ| is reported)")
    for col in ("file", "size", "top-1 agree", "max |Δ|", "clean", "transfer", "status"):
        t.add_column(col, justify="left" if col in ("file", "status") else "right")
    for a in m["artifacts"]:
        p = a["parity"].get("clean") or {}
        robust = [_num(v) for k, v in a["metrics"].items() if k != "clean_acc"]
        status = "[green]passed[/]" if a["status"] == "passed" else f"[bold red]{a['status']}[/]"
        t.add_row(a["file"], _fmt_size(a["size"]),
                  f"{_num(p.get('top1_agreement'), '.2%')} (>= {_num(p.get('threshold'), '.1%')})",
                  _num(p.get("max_abs_diff"), ".2g"), _num(a["metrics"].get("clean_acc")), ", ".join(robust) or "-",
                  status)
    console.print(t)
    attacks = list(m["reference"]["attacks"])
    if attacks:
        console.print(f"transfer: accuracy under {', '.join(attacks)} images crafted on the PyTorch student", highlight=False)
    for w in m.get("warnings", []):
        err_console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)


def _shape(shape: list[Any] | None) -> str:
    return "?" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _bytes(n: int) -> str:
    return f"{n} B" if n < 1024 else _fmt_size(n)


def render_onnx_summary(rep: dict[str, Any]) -> None:
    s = rep["onnx"]
    ir = f" IR {s['ir_version']}" if s["ir_version"] else ""
    t = Table(title=f"{Path(rep['path']).name} (ONNX{ir}, sha256 {rep['sha256'][:12]}...)", show_header=False)
    t.add_column("key")
    t.add_column("value", overflow="fold")
    for kind in ("inputs", "outputs"):
        for v in s[kind]:
            t.add_row(kind[:-1], escape(f"{v['name']}: {v['type']} {_shape(v['shape'])}"))
    if s["opsets"] is not None:
        t.add_row("opsets", ", ".join(f"{d} {v}" for d, v in s["opsets"].items()))
    t.add_row("producer", escape(s["producer"] or "-"))
    for key in ("graph", "model_version", "domain", "doc"):
        if s.get(key):
            t.add_row(key.replace("_", " "), escape(str(s[key])))
    w = s["weights"]
    size = _bytes(s["file_bytes"])
    if w is not None:
        size += f"; weights {_bytes(w['bytes'])} in {w['initializers']} initializers ({w['elements']:,} values)"
    if s["external_data"]:
        ext = s["external_data"]
        size += f"; external data {_bytes(ext['bytes'])} in {', '.join(ext['files'])}"
    t.add_row("size", escape(size))
    if w is not None:
        q = w["quantized"]
        t.add_row("quantized", f"{s['qdq_nodes']} QuantizeLinear/DequantizeLinear nodes; {'/'.join(q['types'])} "
                               f"weights: {q['share_of_elements']:.1%} of weight values, {q['share_of_bytes']:.1%} "
                               f"of weight bytes")
        t.add_row("weight types", ", ".join(f"{k} {_bytes(r['bytes'])}" for k, r in w["by_type"].items()) or "-")
    if s["ops"] is not None:
        t.add_row(f"ops ({s['nodes']} nodes)", escape(", ".join(f"{op} {n}" for op, n in s["ops"].items()) or "-"))
    for k, v in s["metadata"].items():
        if not k.startswith("ciard."):  # ciard's own keys: the metadata table below
            t.add_row(f"[dim]{escape(k)}[/]", escape(v))
    console.print(t)
    for line in s.get("notes", []):
        err_console.print(f"[yellow]note:[/] {escape(line)}", highlight=False)


def render_artifact_metadata(rep: dict[str, Any], other_props: bool = True) -> None:
    t = Table(title=f"{Path(rep['path']).name} ({rep['kind']}, {_fmt_size(rep['size'])}, sha256 {rep['sha256'][:12]}...)",
              show_header=True)
    t.add_column("key")
    t.add_column("value", overflow="fold")
    for k, v in rep["metadata"].items():
        t.add_row(escape(k), escape(v if isinstance(v, str) else _compact(v)))
    for k, v in (rep["other_props"] if other_props else {}).items():
        t.add_row(f"[dim]{escape(k)}[/]", escape(str(v)))
    entry = rep.get("manifest_entry")
    if entry:
        p = entry["parity"].get("clean") or {}
        t.add_row("manifest status", f"{entry['status']} (top-1 agreement {_num(p.get('top1_agreement'), '.2%')})")
    console.print(t)


def _num(v: Any, spec: str = ".4f") -> str:
    """A number as ``spec`` says, or "-" where the manifest has none."""
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _eps(v: Any) -> str:
    """A manifest's eps as people write it (``8/255``, not 0.0313725...)."""

    return "-" if v is None else format_eps(float(v))


def _compact(v: Any) -> str:
    import json

    return json.dumps(v, sort_keys=True)
