"""`ciard pack` (on the machine with PyTorch) and `ciard verify` (on the runtime, torch-free).

Nothing here imports torch, at module level or inside ``verify``: the CLI must start and verify
an ONNX file or engine on a device that has only numpy and the runtime.
"""

from __future__ import annotations

import functools
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.markup import escape

from ciard_deploy.cli.app import app
from ciard_deploy.cli.common import (QuietOption, State, ThreadsOption, apply_threads, artifact_inputs, check_outputs,
                                     checkpoint_inputs, console, err_console, from_run_folder, handle_errors, is_stdout,
                                     note, progress, setup_logging, write_json)
from ciard_deploy.cli.model_options import gate_options, model_option
from ciard_deploy.errors import GateFailed, UsageError
from ciard_deploy.options.gates import Gates
from ciard_deploy.options.live import resolve_live
from ciard_deploy.options.pack import PackOptions
from ciard_deploy.signals import interrupt_name, terminate_as_interrupt
from ciard_deploy.verify.pack import check_output
from ciard_deploy.verify.pack_build import write_pack
from ciard_deploy.verify.pack_partial import check_partial_dir, partial_dir, read_partial
from ciard_deploy.verify.render import render_pack
from ciard_deploy.errors import CiardError
from ciard_deploy.run_folder import (artifact_name, is_export_folder, is_run_folder, manifest_artifacts,
                                     resolve_run_folder, run_artifacts, run_folder_of, stale_qat, verify_settings)
from ciard_deploy.runtime import backend_for
from ciard_deploy.verify.gates import Policy, gates_from_mapping, load_gates
from ciard_deploy.verify.render import render_report
from ciard_deploy.verify.verification import run


class StagedProgress:
    """A progress callback ``(done, total, stage=...)`` that opens one bar per stage, so each bar's
    images/s is that stage's own (inference on the pack vs each live attack's queries)."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.stage: str | None = None
        self.stack = ExitStack()
        self.update: Callable[..., None] | None = None

    def __call__(self, done: int, total: int | None = None, stage: str | None = None) -> None:
        if stage != self.stage or self.update is None:
            self.stack.close()
            self.stack = ExitStack()
            label = f"{self.description} {stage}" if stage else self.description
            self.update = self.stack.enter_context(progress(label, total, unit="img"))
            self.stage = stage
        self.update(done, total)

    def close(self) -> None:
        """Ends the live bar, if any (the next call opens a new one)."""
        self.stack.close()
        self.stack = ExitStack()
        self.stage, self.update = None, None

    def __enter__(self) -> "StagedProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _state_line(ev: Any) -> None:
    """One stderr line when `verify --state` takes a live attack from the state file (not with --quiet)."""
    if ev.kind == "reused":
        note(f"state: reusing {ev.stage} from {ev.path} (finished earlier in {ev.seconds:.1f} s; not re-run; "
             "clean and transferred attacks measured again)")
    elif ev.kind == "resumed":
        note(f"state: resuming {ev.stage} at {ev.done}/{ev.total} from {ev.path} (clean and transferred attacks "
             "measured again)")
    else:
        note(f"state: {ev.stage} in {ev.path} was measured on other clean predictions than the runtime gives now "
             "(a non-deterministic runtime?): it runs again")


def _partial_line(ev: Any) -> None:
    """One stderr line per attack `ciard pack` takes from its partial folder (not with --quiet)."""
    where = ev.path.parent if ev.path is not None else "the partial folder"
    if ev.kind == "reused":
        note(f"pack: reusing {ev.stage} from {where} (finished earlier in {ev.seconds:.1f} s; not re-run)")
    else:
        note(f"pack: {ev.stage} in {where} is damaged: it runs again")


def _interrupted(exc: BaseException) -> str:
    """``interrupted`` for Ctrl-C, ``interrupted (SIGTERM)`` for a SIGTERM (a CI cancel), as markup."""
    name = interrupt_name(exc)
    return "[yellow]interrupted[/]" if name == "SIGINT" else f"[yellow]interrupted ({name})[/]"


def _interrupted_pack(partial: Path, exc: BaseException) -> None:
    """The Ctrl-C (or SIGTERM) line of `ciard pack`: what was kept, and that the same command continues."""
    state = read_partial(partial)
    labels = [a.label for a in state.attacks] if state is not None else []
    if labels:
        err_console.print(f"{_interrupted(exc)}: {len(labels)} finished attack{'s' if len(labels) != 1 else ''} "
                          f"({escape(', '.join(labels))}) kept in {escape(str(partial))}; run the same command again "
                          "to continue", highlight=False, soft_wrap=True)
    else:
        err_console.print(f"{_interrupted(exc)} before any attack finished (nothing kept)", highlight=False)


def _plan_lines(plan: Any) -> None:
    """Before the pack's attacks run: the attacks chosen for the device when none were named (one line, not
    with --quiet) and a warning when the eps is not the training one (always)."""
    if plan.attacks_default:
        note(f"pack: attacks {','.join(plan.attacks)} (the default on {plan.device}; choose others with --attacks)")
    if plan.eps.warning:
        err_console.print(f"[yellow]warning:[/] pack: {escape(plan.eps.warning)}", highlight=False, soft_wrap=True)


def _wrote(path: Path | None) -> None:
    if path is not None and not State.quiet:
        err_console.print(f"wrote {path}", highlight=False)


@app.command("pack")
@handle_errors
def pack_cmd(
    source: Path = typer.Argument(..., help="Run dir, `ciard run` folder, ciard checkpoint (.safetensors + .json), or a plain .pt/.pth with --arch."),
    out: Path = typer.Option(..., "--out", "-o",
                             help="The pack file to write (.npz). While it is built, each finished attack is kept in "
                                  "OUT.partial/ beside it (removed once the pack is saved)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Dataset of the test sample (default: the checkpoint's)."),
    n: int = model_option(PackOptions, "n"),
    attacks: Optional[str] = typer.Option(
        None, "--attacks", "-a",
        help="Comma-separated white-box attacks crafted on the PyTorch model: fgsm, pgd20, cw30, apgd-ce, apgd-t, "
             "fab-t, aa, ... (default: what finishes in reasonable time on the device: apgd-ce,apgd-t on CPU, "
             "apgd-ce,apgd-t,fab-t on CUDA; a line on stderr names the choice)."),
    eps: Optional[str] = typer.Option(
        None, "--eps",
        help="L-inf budget, e.g. 8/255 or 0.1 (default: the training eps recorded in the checkpoint; another value "
             "is allowed and the table and JSON say it differs)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample and of every attack."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where the dataset files are."),
    download: bool = typer.Option(False, "--download", help="Download the dataset if absent (torchvision datasets)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N, mps."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images per attack call."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture, for a plain state dict without metadata."),
    step_size: Optional[str] = model_option(PackOptions, "step_size"),
    artifact: Optional[list[Path]] = typer.Option(
        None, "--artifact",
        help="An exported .onnx file (repeatable) to attack white-box itself: a torch twin of its graph gives the "
             "gradients, its runtime scores every iterate; `ciard verify` of that file then measures the artifact, "
             "not only attacks transferred from PyTorch."),
    artifact_attacks: str = model_option(PackOptions, "artifact_attacks", help="Comma-separated white-box attacks run "
                                         "on each --artifact itself (gradients from its twin, every iterate scored on "
                                         "its runtime)."),
    allow_untrusted_twin: bool = model_option(PackOptions, "allow_untrusted_twin"),
    threads: ThreadsOption = None,
    force: bool = typer.Option(False, "--force", help="Overwrite --out (and --json) if it exists."),
    json_out: Optional[Path] = typer.Option(
        None, "--json", help="Also write the pack's metadata as JSON to this file; - writes it to stdout (the table "
                             "then goes to stderr). An existing file needs --force."),
    quiet: QuietOption = False,
) -> None:
    """Build a robustness pack: test images, adversarial images crafted on the PyTorch model, its logits,
    and white-box attacks on each exported --artifact.

    Run it where PyTorch is; copy the pack to the device and run `ciard verify` there. Without
    --artifact for a file, verify of that file can only report an upper bound (transferred and
    query-only attacks).

    Resumable: each finished attack (images, logits, record) is saved to OUT.partial/ beside --out.
    After Ctrl-C or a killed job, run the same command again: the finished attacks are reused, not
    re-run (a line on stderr names them), and the pack's arrays equal an uninterrupted build's. The
    folder is kept only for the same pack (model sha256, data, n, seed, eps, batch size, device type,
    torch version, and each attack's settings); one made for another is discarded with a log line.
    It is removed once the pack is saved.

    Exit codes: 0 written, 2 bad input, 3 PyTorch missing, 130 interrupted.
    """
    if quiet:
        State.quiet = True
        setup_logging(State.verbose, quiet=True)  # the discard log line too
    inputs = checkpoint_inputs(source, "SOURCE")
    for a in artifact or []:
        inputs.update(artifact_inputs(a, f"--artifact {a}"))
    check_outputs({"--out": out}, True, inputs)  # never an input, --force or not (an existing pack: check_output)
    check_output(out, force)
    partial = check_partial_dir(partial_dir(out))
    check_outputs({"--json": json_out}, force, {"--out": out, **inputs})
    source = from_run_folder(source, "checkpoint")
    threads = apply_threads(threads)
    names = None if attacks is None else [a.strip() for a in attacks.split(",") if a.strip()]
    art_names = [a.strip() for a in artifact_attacks.split(",") if a.strip()]
    # write_pack holds the partial folder's lock from the build to its removal: a second `ciard pack --out OUT` is
    # refused (exit 2); SIGTERM (a CI cancel) is Ctrl-C: the finished attacks are kept, exit 130
    with terminate_as_interrupt():
        try:
            with StagedProgress("pack") as update:
                pack = write_pack(source, out, force=force, dataset=dataset, n=n, attacks=names, eps=eps, seed=seed,
                                  data_root=data_root, download=download, device=device, batch_size=batch_size,
                                  arch=arch, step_size=step_size, progress=update, on_state=_partial_line,
                                  artifacts=artifact or [], artifact_attacks=art_names,
                                  allow_untrusted_twin=allow_untrusted_twin, threads=threads, on_plan=_plan_lines)
        except KeyboardInterrupt as e:
            _interrupted_pack(partial, e)
            raise typer.Exit(130) from None
    summary = pack.summary()
    render_pack(summary, console)
    _wrote(out)
    write_json(json_out, summary, force)


def _verify_inputs(artifact: Path, pack: Optional[Path]) -> tuple[list[Path], Path, Optional[dict]]:
    """What `ciard verify` measures: the artifacts, the pack and, for a `ciard run` folder, what its recipe told
    its verify stage (``run_folder.verify_settings``; None for anything else).

    ARTIFACT may be a run folder (each artifact its export manifest lists, then its quantize stage's QAT artifact
    in qat/ when it has one, against its pack.npz); --pack may be left out for an artifact in a run folder's
    export/ or qat/ (its pack.npz), or for either folder, or --pack may name the run folder."""

    recorded = None
    if is_run_folder(artifact):
        targets, root, recorded = run_artifacts(artifact), artifact, verify_settings(artifact)
        stale = stale_qat(artifact)
        if stale is not None:
            note(f"{stale} is left from an earlier recipe with quantize: (the run's recipe has none now): not "
                 f"verified (verify its file by name to measure it)")
    elif is_export_folder(artifact):  # what `ciard export` wrote: each artifact its manifest lists
        targets = manifest_artifacts(artifact)
        root = run_folder_of(targets[0])
        note(f"verifying the {len(targets)} artifact(s) of {artifact / 'manifest.json'}: "
             + ", ".join(_named(t) for t in targets))
    else:
        if artifact.is_dir():  # a training run dir (PyTorch), or one line naming what the folder lacks
            from_run_folder(artifact, "checkpoint")
        targets, root = [artifact], run_folder_of(artifact)
    if pack is not None:
        return targets, from_run_folder(pack, "pack"), recorded
    if root is None:
        raise UsageError("missing --pack PACK: the robustness pack `ciard pack` built (found without --pack only for "
                         "a `ciard run` folder or an artifact in its export/ or qat/)")
    found = resolve_run_folder(root, "pack")
    if recorded is None:
        note(f"using {found} from the run folder {root}")
    return targets, found, recorded


def _named(target: Path) -> str:
    """A target as the lines of `ciard verify` name it: its file name, and the workflow's name of a run folder's
    QAT artifact (``model.qat.int8.onnx (onnx-int8 (qat))``), so it is never taken for the export's INT8 file."""
    name = artifact_name(target)
    return target.name if name == target.name else f"{target.name} ({name})"


def _one_artifact_for(flags: dict[str, Optional[Path]], folder: Path, targets: list[Path]) -> None:
    """Report and state files name one artifact's: refused (exit 2) when a run folder holds several."""
    given = [flag for flag, path in flags.items() if path is not None]
    if given:

        what, reports = (("the run folder", f" (the run's own reports are in {folder / 'verify'})")
                         if is_run_folder(folder) else ("the export folder", ""))
        raise UsageError(f"{given[0]} writes one artifact's file, and {what} {folder} holds {len(targets)} "
                         f"({', '.join(_named(t) for t in targets)}): verify one of them, e.g. `ciard verify "
                         f"{targets[0]} {given[0]} ...`{reports}")


def _run_folder_line(folder: Path, targets: list[Path], pack: Path, recorded: dict, gates: Any, live: Optional[str],
                     live_n: Optional[int], square_queries: Optional[int]) -> str:
    """The one line saying what `ciard verify DIR` took from the run folder, gates included (or why none), and
    the live attacks it runs (the recipe's unless flags said otherwise)."""
    names = ", ".join(_named(t) for t in targets)
    head = f"verify: {len(targets)} artifact{'s' if len(targets) != 1 else ''} of the run folder {folder} ({names}) " \
           f"against {pack}"
    if not recorded:
        return f"{head}; its workflow.json records no verify settings (its verify stage never started): no gates " \
               "from its recipe, verify's own defaults"
    judged = ("gates " + ", ".join(f"{k} {v:g}" for k, v in gates.items())) if gates \
        else "no gates: its recipe sets none (deploy.gates), so nothing is judged"
    attacks = f"square{square_queries}" if square_queries else "none" if square_queries == 0 else live or "default"
    on = f" on {live_n} images" if live_n and attacks != "none" else ""
    return f"{head}, with {judged}; live {attacks}{on} (the recipe's, unless flags override them)"


def _on_torch(path: Path) -> bool:
    """``path`` runs on PyTorch (a checkpoint or a training run dir), so --threads sets torch's threads too."""

    try:
        return backend_for(path).name == "torch"
    except CiardError:
        return False


def _takes_provider(path: Path) -> bool:
    """``path``'s runtime has execution providers (onnxruntime), so the recipe's --provider applies to it."""
    try:
        return bool(backend_for(path).providers)
    except CiardError:
        return False


@app.command("verify")
@handle_errors
@gate_options
def verify_cmd(
    artifact: Path = typer.Argument(
        ..., help="Exported model: .onnx (onnxruntime), .engine/.plan (TensorRT), a checkpoint (PyTorch), or a `ciard "
                  "run` folder (each artifact of its export/, and of its qat/ with a quantize: recipe, against its "
                  "pack, with its recipe's gates)."),
    pack: Optional[Path] = typer.Option(
        None, "--pack", "-p",
        help="Robustness pack built by `ciard pack` (default, for ARTIFACT in a `ciard run` folder's export/ or qat/, "
             "or the folder itself: its pack.npz)."),
    provider: Optional[str] = typer.Option(None, "--provider", help="onnxruntime execution provider: cpu (default), cuda, tensorrt."),
    live: Optional[str] = typer.Option(
        None, "--live",
        help="Comma-separated query-only attacks run live on the runtime, each a registered attack that needs no "
             "gradients (square<Q>: e.g. square5000, or square1000,square5000); none (or \"\") turns them off. "
             "Default: square1000. White-box attacks belong in the pack."),
    live_n: Optional[int] = typer.Option(None, "--live-n", help="Images the live attacks attack (one seeded "
                                                                "class-stratified subset of the pack; default: all)."),
    square_queries: Optional[int] = typer.Option(None, "--square-queries",
                                                 help="Deprecated: --live square<N> (0: --live none)."),
    square_n: Optional[int] = typer.Option(None, "--square-n", help="Deprecated: --live-n."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images per runtime call."),
    threads: ThreadsOption = None,
    gate_flags: dict = typer.Option(None, hidden=True),  # replaced by one flag per gate of SPECS (gate_options)
    gates_file: Optional[Path] = typer.Option(None, "--gates", help="YAML file of gates (flags override it)."),
    allow_mismatch: bool = typer.Option(
        False, "--allow-mismatch",
        help="Judge the numbers even when a warning says they may not be about this artifact (V103 artifact changed "
             "since export, V104 pack built for another model, V105 manifest does not vouch for it, V109 pack and "
             "artifact metadata disagree); without it such a warning fails verify (exit 1)."),
    strict: bool = typer.Option(False, "--strict",
                                help="Every warning fails verify (exit 1), mismatches included; notes never do."),
    json_out: Optional[Path] = typer.Option(
        None, "--json", help="Write the full report as JSON; - writes it to stdout (the table then goes to stderr)."),
    junit_out: Optional[Path] = typer.Option(None, "--junit", help="Write a JUnit XML file (one testcase per gate)."),
    md_out: Optional[Path] = typer.Option(None, "--markdown", help="Write a short Markdown report (for a PR comment)."),
    md_chart: str = typer.Option(
        "file", "--markdown-chart",
        help="The --markdown report's accuracy chart (needs matplotlib): file (a PNG beside it, MARKDOWN with .png, "
             "linked by name), inline (embedded as a data:image/png;base64 URI: one self-contained file to append to "
             "a CI step summary or post as a comment) or none."),
    force: bool = typer.Option(False, "--force",
                               help="Overwrite existing report files (--json, --junit, --markdown and its chart)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the live attacks and their subset (batch i: seed + i)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    state: Optional[Path] = typer.Option(
        None, "--state",
        help="Resumable verify state (JSON; none unless given). Created if absent and saved as the live attacks go "
             "(after their finished batches, at most every ~10 s, and on Ctrl-C). If it exists it must hold the same "
             "verification (artifact sha256, pack checksum, runtime and provider, live n, seed, eps, batch size, and "
             "each live attack's settings): the clean and transferred attacks are measured again (seconds) and each "
             "live attack continues after its last saved batch, or is reused if it finished (a line on stderr says "
             "so); live attacks the file lacks run. The report's numbers equal an uninterrupted run's. A different "
             "verification is an error (exit 2) and the file is left as it is."),
    fresh: bool = typer.Option(False, "--fresh",
                               help="With --state: discard what the state file holds and start over."),
) -> None:
    """Measure robustness on the runtime: clean, transferred attacks, live query-only attacks, worst case, parity, gates.

    Without gates nothing is judged: the status is NOT GATED (exit 0), never passed. A warning
    that says the numbers are not about this artifact (V103, V104, V105, V109) fails unless
    --allow-mismatch; --strict fails on every warning.

    With --state FILE, an interrupted verify (Ctrl-C, a killed CI job) continues where its live
    attacks stopped when the same command runs again.

    Exit codes: 0 every gate passed (or no gates: NOT GATED), 1 a gate failed or a warning failed
    (mismatch, or any under --strict), 2 bad input, 3 runtime missing, 130 interrupted.
    """

    if quiet:
        State.quiet = True
    targets, pack, recorded = _verify_inputs(artifact, pack)
    base_gates, recipe_provider = Gates(), None
    if len(targets) > 1:  # a run folder or an export folder: report files would name one artifact
        _one_artifact_for({"--state": state, "--json": json_out, "--junit": junit_out, "--markdown": md_out},
                          artifact, targets)
    if recorded is not None:  # a `ciard run` folder: its recipe's gates, policy and live attacks, unless flags say
        if live is None and square_queries is None and "live_attacks" in recorded.get("settings", {}):
            live = ",".join(recorded["settings"]["live_attacks"]) or "none"
        if live_n is None and square_n is None:
            live_n = recorded.get("settings", {}).get("live_n")
        recipe_provider = recorded.get("settings", {}).get("provider")
        base_gates = gates_from_mapping(recorded.get("gates") or {}, source=f"{artifact}/workflow.json deploy.gates")
        allow_mismatch = allow_mismatch or bool(recorded.get("policy", {}).get("allow_mismatch"))
        strict = strict or bool(recorded.get("policy", {}).get("strict"))
    folder, artifact = artifact, targets[0]
    threads = apply_threads(threads, torch=any(_on_torch(t) for t in targets))
    specs, n_live = resolve_live(live, live_n, square_queries=square_queries, square_n=square_n)
    if md_chart not in ("file", "inline", "none"):
        raise UsageError(f"--markdown-chart must be file, inline or none, not {md_chart!r}")
    chart_png = md_out.with_suffix(".png") if md_out is not None and md_chart == "file" else None
    reports = {"--json": json_out, "--junit": junit_out, "--markdown": md_out, "--markdown's chart": chart_png}
    inputs = {**artifact_inputs(artifact), "--pack": pack, "--gates": gates_file}
    check_outputs({"--state": state, **reports}, True, inputs)  # writable, distinct, no input (a state is resumed)
    check_outputs(reports, force, inputs)  # no existing report overwritten without --force
    gates = base_gates.merged(load_gates(gates_file)) if gates_file is not None else base_gates
    gates = gates.merged(Gates.create(**{k: v for k, v in gate_flags.items() if v is not None}))
    if recorded is not None:
        note(_run_folder_line(folder, targets, pack, recorded, gates, live, live_n, square_queries))
    failures = []
    for artifact in targets:  # one, or each artifact of a `ciard run` folder (then no report flags)
        on_runtime = provider if provider is not None or not _takes_provider(artifact) else recipe_provider
        try:
            with terminate_as_interrupt(), StagedProgress("verify") as update:  # SIGTERM: as Ctrl-C, state saved
                report = run(artifact, pack, provider=on_runtime, gates=gates,
                             policy=Policy(allow_mismatch=allow_mismatch, strict=strict), live=specs, live_n=n_live,
                             batch_size=batch_size, seed=seed, threads=threads, progress=update,
                             state_path=state, fresh=fresh, on_state=_state_line, name=artifact_name(artifact))
        except KeyboardInterrupt as e:
            if state is not None and state.is_file():
                again = "the same command again without --fresh" if fresh else "the same command again"
                err_console.print(f"{_interrupted(e)}: finished work is in {escape(str(state))}; run {again} "
                                  "to continue", highlight=False, soft_wrap=True)
                raise typer.Exit(130) from None
            raise
        render_report(report, console)
        if is_stdout(json_out):
            sys.stdout.write(report.to_json().rstrip("\n") + "\n")
            json_out = None
        for path, write in ((json_out, report.write_json), (junit_out, report.write_junit),
                            (md_out, functools.partial(report.write_markdown, chart=md_chart))):
            if path is not None:
                write(path)
                _wrote(path)
        if report.failed:
            failures.append(report.failure_summary() if len(targets) == 1
                            else f"{report.name}: {report.failure_summary()}")
    if failures:
        raise GateFailed("; ".join(failures))
