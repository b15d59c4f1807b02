"""``ciard run``: one recipe from training to a verified artifact, in stages that know when to skip.

    from ciard_deploy import workflow
    result = workflow.run("recipes/quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15.yaml", "runs/digits")
    result.status                      # passed (gates set, all passed), failed, or not_gated (no gates set)
    result.rows                        # one row per artifact: precision, size, clean, worst case, agreement, gates

The stages, in order, each a plain library call:

    distill   distill.trainer.run (kind distill; kind train trains the model alone) -> DIR/run/
              (+ training curves in DIR/run/plots/)
    export    export.run(DIR/run, DIR/export, deploy.formats, ...)  -> artifacts + manifest.json
    pack      verify.build_pack(DIR/run, ...) + save_pack          -> DIR/pack.npz
              (while it runs, finished attacks in DIR/pack.npz.partial/, removed when the stage is done)
    verify    verify.run(artifact, DIR/pack.npz, gates=...) for every artifact of the manifest
              -> DIR/verify/<format>.json (report), .xml (JUnit), .md (Markdown) and .png (chart);
              while it runs, DIR/verify/<format>.state.json (removed when the stage is done)

The recipe's ``deploy:`` section (``config.DeployConfig``) says what export, pack and verify do.
``DIR/workflow.json`` records, per stage, its inputs (the recipe parts it reads and the sha256 of
the upstream files it consumes), the sha256 of its outputs, its status and its timings. A second
run skips every stage whose inputs are unchanged and whose outputs are still there with the
recorded hashes; an interrupted distill stage resumes from its last checkpoint (the trainer's own
resume); an interrupted pack stage reuses the attacks it finished (``build_pack(resume_dir=...)``);
an interrupted verify stage continues each artifact's live attacks from its state file
(``verify.run(state_path=...)``); a stage whose only changed inputs are the gates or the warning
policy (``deploy.allow_mismatch``, ``deploy.strict``) is re-judged from its stored reports
(``VerifyReport.rejudge``) instead of measured again. ``from_stage``
forces a stage and every stage after it.

``DIR`` belongs to the workflow: its own earlier outputs are replaced when a stage runs again.
A folder that exists, holds files and has no ``workflow.json`` is someone else's and is refused.
A call holds ``DIR``'s lock (``lock.folder_lock``) from start to end: a second ``ciard run`` into
``DIR`` meanwhile is refused (exit 2, naming the holder's pid).

The library never prints: stage events go to ``on_event``, training events to
``train_callbacks``, and ``progress(done, total, stage=...)`` reports export, pack and verify work.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Mapping, Sequence

from ciard_deploy import lock
from ciard_deploy.errors import ArtifactError, CiardError, RecipeError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from ciard_deploy.config import RecipeBase

log = logging.getLogger(__name__)

STAGES = ("distill", "export", "pack", "verify")
STATE_NAME = "workflow.json"
STATE_FORMAT = "ciard-workflow/1"
Stage = Literal["distill", "export", "pack", "verify"]
Action = Literal["run", "resume", "rejudge", "skip"]
Progress = Callable[..., None]


# --------------------------------------------------------------------------- events and results
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
    """

    out_dir: Path
    stages: dict[str, StageOutcome]
    rows: list[dict[str, Any]]
    reference: dict[str, Any]
    failures: list[str]
    state: dict[str, Any]

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
                "paths": paths_of(Layout(self.out_dir)), "state": self.state}


# --------------------------------------------------------------------------- layout and state
@dataclass(frozen=True)
class Layout:
    """Where everything lives in a workflow dir."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / STATE_NAME

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def pack(self) -> Path:
        return self.root / "pack.npz"

    @property
    def verify(self) -> Path:
        return self.root / "verify"

    def rel(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()


def paths_of(layout: Layout) -> dict[str, str]:
    return {"state": str(layout.state), "recipe": str(layout.recipe), "run": str(layout.run),
            "plots": str(layout.run / "plots"), "export": str(layout.export),
            "manifest": str(layout.export / "manifest.json"), "pack": str(layout.pack), "verify": str(layout.verify)}


def canonical_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no spaces)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def load_state(out_dir: str | Path) -> dict[str, Any] | None:
    """The ``workflow.json`` of ``out_dir`` (None when there is none).

    Raises:
        UsageError: the file exists but is not a ciard workflow state.
    """
    path = Path(out_dir) / STATE_NAME
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is not a readable workflow state ({type(e).__name__}); use another --out") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("stages"), dict):
        raise UsageError(f"{path} is not a {STATE_FORMAT} file; use another --out")
    return state


def check_out_dir(out_dir: str | Path, entry: str = "run") -> dict[str, Any] | None:
    """Refuses an output folder that is not this workflow's to write; returns its state, if any.

    A missing or empty folder is fine (a new workflow); a folder with ``workflow.json`` is a
    workflow's own (``entry="quickstart"`` also requires it to have been made by the quickstart);
    anything else (a file, a folder of someone else's files) is a UsageError: nothing is overwritten.
    """
    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise UsageError(f"--out {d} is a file, not a folder")
    if not d.is_dir() or not lock.entries(d):  # a lock file alone (lock.LOCK_NAME) is no content
        return None
    state = load_state(d)
    if state is None:
        raise UsageError(f"--out {d} exists and is not a ciard workflow dir (no {STATE_NAME}); nothing is "
                         f"overwritten: use a new or empty folder")
    if entry == "quickstart" and state.get("entry") != "quickstart":
        raise UsageError(f"--out {d} is a `ciard {state.get('entry', 'run')}` workflow dir, not a quickstart one; "
                         f"use another --out")
    return state


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_keys(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two input records."""
    fo, fn = _flat(old or {}), _flat(new)
    return sorted(k for k in set(fo) | set(fn) if fo.get(k) != fn.get(k))


def outputs_problem(root: Path, outputs: Mapping[str, str]) -> str | None:
    """None when every recorded output exists with its recorded sha256, else what is wrong."""
    from ciard_deploy.fingerprint import sha256_file

    if not outputs:
        return "no outputs recorded"
    for rel, digest in outputs.items():
        p = root / rel
        if not p.is_file():
            return f"{rel} is missing"
        if sha256_file(p) != digest:
            return f"{rel} changed since it was written"
    return None


def plan(stage: str, record: Mapping[str, Any] | None, inputs: Mapping[str, Any], root: Path, *,
         forced: bool = False, from_stage: str | None = None) -> tuple[Action, str]:
    """What a stage should do this time, and why.

    ``run`` (first time, forced, inputs changed, earlier failure, outputs gone), ``resume``
    (distill interrupted with the same inputs and a saved training state), ``rejudge`` (verify whose
    only changed inputs are the gates or the warning policy) or ``skip`` (done, same inputs, outputs intact).
    """
    if forced:
        return "run", f"forced (--from {from_stage})"
    if not record or record.get("status") in (None, "pending"):
        return "run", "first run"
    same = record.get("inputs_hash") == canonical_hash(inputs)
    status = record.get("status")
    if status != "done":
        if stage == "distill" and same and status in ("running", "interrupted") \
                and (root / "run" / "train_state.pt").is_file():
            return "resume", f"{status} earlier; resuming from its last checkpoint"
        return "run", f"{status} earlier"
    if not same:
        keys = changed_keys(record.get("inputs"), inputs)
        if stage == "verify" and keys and all(k.startswith(("gates", "policy")) for k in keys) \
                and outputs_problem(root, record.get("outputs", {})) is None:
            what = ", ".join(k.removeprefix("gates.").removeprefix("policy.") for k in keys)
            return "rejudge", f"only the gates or the warning policy changed: {what}; the stored measurements " \
                              "are judged again"
        shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        return "run", f"inputs changed: {shown or 'recorded inputs unreadable'}"
    problem = outputs_problem(root, record.get("outputs", {}))
    if problem:
        return "run", problem
    return "skip", "up to date"


class _StateFile:
    """``workflow.json``, written atomically after every change."""

    def __init__(self, layout: Layout, state: dict[str, Any]) -> None:
        self.layout = layout
        self.data = state

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(name, {"status": "pending"})

    def save(self) -> None:
        from ciard_deploy.io import atomic_write_json

        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(self.layout.state, self.data)


def _new_state(entry: str) -> dict[str, Any]:
    from ciard_deploy import __version__

    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return {"format": STATE_FORMAT, "tool": f"ciard-deploy {__version__}", "entry": entry, "created": now,
            "updated": now, "status": "running", "recipe": {}, "stages": {s: {"status": "pending"} for s in STAGES}}


# --------------------------------------------------------------------------- inputs of each stage
def _file_hashes(layout: Layout, paths: Sequence[Path]) -> dict[str, str]:
    from ciard_deploy.fingerprint import sha256_file

    return {layout.rel(p): sha256_file(p) for p in paths if p.is_file()}


def _checkpoint_files(run_dir: Path) -> list[Path]:
    from ciard_deploy.checkpoints import checkpoint_paths, resolve_checkpoint

    ckpt = resolve_checkpoint(run_dir)
    return [p for p in checkpoint_paths(ckpt) if p.is_file()]


def _teacher_inputs(recipe: "RecipeBase") -> dict[str, Any]:
    """What the teachers of a distill recipe are: their recipe's hash, or their checkpoint's sha256."""
    from ciard_deploy.config import TEACHER_ROLES, DistillRecipe
    from ciard_deploy.checkpoints import checkpoint_paths
    from ciard_deploy.fingerprint import sha256_file

    if not isinstance(recipe, DistillRecipe):
        return {}
    out: dict[str, Any] = {role: {"recipe_hash": h} for role, h in recipe.teacher_hashes().items()}
    for role in TEACHER_ROLES:
        spec = getattr(recipe.teachers, role)
        if spec is None or spec.recipe is not None:
            continue
        weights = checkpoint_paths(spec.checkpoint)[0] if Path(spec.checkpoint).suffix in ("", ".json") \
            else Path(spec.checkpoint)
        if not weights.is_file():
            raise ArtifactError(f"teachers.{role}.checkpoint: not found: {weights}")
        out[role] = {"sha256": sha256_file(weights)}
    return dict(sorted(out.items()))


def _pack_eps(recipe: "RecipeBase") -> float:
    d = recipe.deploy
    assert d is not None
    return float(d.pack.eps if d.pack.eps is not None else recipe.attack.eps)


def stage_inputs(stage: str, recipe: "RecipeBase", layout: Layout, teachers: Mapping[str, Any] | None = None,
                 state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The inputs a stage's skip decision compares: the recipe parts it reads, upstream files' sha256."""
    d = recipe.deploy
    assert d is not None
    if stage == "distill":
        return {"recipe_hash": recipe.hash, "teachers": dict(teachers or {})}
    if stage in ("export", "pack"):
        ckpt = _file_hashes(layout, _checkpoint_files(layout.run))
    # the deploy keys come from the option models' model_dump() (DeployConfig.stage_options, whose STAGE_KEYS
    # give every deploy field to a stage): a key added to a model cannot be left out of the skip decision
    if stage == "export":
        return {"checkpoint": ckpt, "options": d.stage_options("export")}
    if stage == "pack":
        return {"checkpoint": ckpt, "artifacts": _attacked_artifacts(state),
                "pack": {**d.stage_options("pack"), "eps": _pack_eps(recipe)}}  # eps resolved (null: attack.eps)
    if stage == "verify":
        exported = dict((state or {}).get("stages", {}).get("export", {}).get("outputs", {}))
        return {"artifacts": {k: v for k, v in exported.items() if not k.endswith("manifest.json")},
                "pack": _file_hashes(layout, [layout.pack]),
                "settings": d.stage_options("verify"), "gates": d.gates_mapping(), "policy": d.policy_mapping()}
    raise UsageError(f"unknown stage {stage!r}")


def _attacked_artifacts(state: Mapping[str, Any] | None) -> dict[str, Any]:
    """The exported files the pack stage attacks white-box (the ONNX ones), with their sha256 from the export stage."""
    from ciard_deploy.verify.pack_artifacts import TWIN_SUFFIXES

    exported = dict((state or {}).get("stages", {}).get("export", {}).get("outputs", {}))
    return {k: v for k, v in sorted(exported.items()) if Path(k).suffix.lower() in TWIN_SUFFIXES}


# --------------------------------------------------------------------------- the stages
@dataclass
class _Context:
    recipe: Any
    layout: Layout
    device: str | None
    threads: int | None
    train_callbacks: list[Any]
    progress: Progress | None
    state: Mapping[str, Any] = field(default_factory=dict)  # workflow.json's data, as the stages update it

    def progress_for(self, name: str) -> Progress | None:
        """A progress callback whose stage labels start with ``name`` (``export check onnx``)."""
        if self.progress is None:
            return None
        outer = self.progress

        def update(done: int, total: int | None = None, stage: str | None = None) -> None:
            label = name if not stage else stage if stage.startswith(name.split()[0]) else f"{name} {stage}"
            outer(done, total, stage=label)

        return update


def _run_distill(ctx: _Context, action: Action) -> list[Path]:
    from ciard_deploy.distill.trainer import run as train
    from ciard_deploy.plots import safe_training_curves

    run_dir = ctx.layout.run
    if action == "resume":
        summary = train(ctx.recipe, run_dir, resume=True, device=ctx.device, callbacks=ctx.train_callbacks)
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # the workflow's own earlier run (inputs changed or forced)
        summary = train(ctx.recipe, run_dir, device=ctx.device, callbacks=ctx.train_callbacks)
    if summary.get("status") != "complete":  # pragma: no cover - only with stop_after_epoch, never passed here
        raise CiardError(f"training stopped after epoch {summary.get('epochs_done')}; run again to resume")
    safe_training_curves(run_dir)
    return [*_checkpoint_files(run_dir), run_dir / "summary.json"]


def _run_export(ctx: _Context) -> list[Path]:
    from ciard_deploy import export
    from ciard_deploy.runtime.metadata import sidecar_path

    d = ctx.recipe.deploy
    data = ctx.recipe.data  # the recipe's own data: calibration and parity images come from there too
    options = export.ExportOptions(opset=d.opset, n=d.parity_n, seed=d.seed, calib=d.calib, calib_n=d.calib_n,
                                   calib_method=d.calib_method, provider=d.provider, threads=ctx.threads,
                                   dataset=data.dataset, data_root=data.data_root)
    result = export.run(ctx.layout.run, ctx.layout.export, d.formats, options, force=True,
                        progress=ctx.progress_for("export"), check=False)
    files = []
    for a in result.manifest.artifacts:
        files.append(ctx.layout.export / a.file)
        if a.format == "tensorrt":
            side = ctx.layout.export / sidecar_path(a.file).name
            if side.is_file():
                files.append(side)
    return files + [ctx.layout.export / "manifest.json"]


def pack_partial_path(layout: Layout) -> Path:
    """Where the pack stage keeps its finished attacks while it runs (``verify.pack_partial.partial_dir``)."""
    from ciard_deploy.verify.pack_partial import partial_dir

    return partial_dir(layout.pack)


def _run_pack(ctx: _Context) -> list[Path]:
    """Builds DIR/pack.npz; resumable: each finished attack is kept in DIR/pack.npz.partial/ meanwhile.

    An interrupted pack stage (Ctrl-C, a killed job) leaves that folder behind; the next call takes
    the finished attacks from it instead of running them again, provided it was made for the same
    checkpoint, sample, seeds, eps, batch size, device type and attack settings; any other is the
    workflow's own stale temp data and is discarded (a log line). The folder is removed once the
    pack is saved: the stage's output (hashed in ``workflow.json``) is the pack alone.
    """
    from ciard_deploy.verify.pack import save_pack
    from ciard_deploy.verify.pack_partial import discard_partial
    from ciard_deploy.verify.pack_build import build_pack

    r, d = ctx.recipe, ctx.recipe.deploy
    partial = pack_partial_path(ctx.layout)

    def on_state(ev: Any) -> None:
        if ev.kind == "reused":
            log.info("pack: reusing %s from %s (finished earlier in %.1f s)", ev.stage, ctx.layout.rel(partial),
                     ev.seconds)
        else:
            log.info("pack: %s in %s is damaged: it runs again", ev.stage, ctx.layout.rel(partial))

    artifacts = [ctx.layout.root / name for name in _attacked_artifacts(ctx.state)] \
        if d.pack.artifact_attacks else []
    pack = build_pack(ctx.layout.run, dataset=r.data.dataset, data_root=r.data.data_root, download=r.data.download,
                      n=d.pack.n, attacks=list(d.pack.attacks), eps=_pack_eps(r), seed=d.seed,
                      device=ctx.device or r.train.device, step_size=d.pack.step_size,
                      batch_size=r.data.eval_batch_size, progress=ctx.progress_for("pack"),
                      resume_dir=partial, on_mismatch="discard", on_state=on_state, artifacts=artifacts,
                      artifact_attacks=list(d.pack.artifact_attacks),
                      allow_untrusted_twin=d.pack.allow_untrusted_twin, threads=ctx.threads, on_plan=_warn_eps)
    save_pack(pack, ctx.layout.pack, force=True)
    discard_partial(partial)
    return [ctx.layout.pack]


def _warn_eps(plan: Any) -> None:
    """deploy.pack.eps other than the training eps: said now (verify then fails on V109 unless allow_mismatch)."""
    if plan.eps.warning:
        log.warning("pack: %s (deploy.pack.eps)", plan.eps.warning)


def report_paths(layout: Layout, name: str) -> dict[str, Path]:
    """The report files of one artifact (by export format name)."""
    base = layout.verify / name
    return {"json": base.with_suffix(".json"), "junit": base.with_suffix(".xml"), "markdown": base.with_suffix(".md")}


def _write_reports(layout: Layout, name: str, report: Any) -> list[Path]:
    paths = report_paths(layout, name)
    report.write_json(paths["json"])
    report.write_junit(paths["junit"])
    report.write_markdown(paths["markdown"])
    return list(paths.values())


def _gates(recipe: Any) -> Any:
    from ciard_deploy.verify.gates import gates_from_mapping

    return gates_from_mapping({"gates": recipe.deploy.gates_mapping()}, source="recipe deploy.gates")


def _policy(recipe: Any) -> Any:
    from ciard_deploy.verify.gates import Policy

    return Policy(**recipe.deploy.policy_mapping())


def state_path(layout: Layout, name: str) -> Path:
    """Where the verify stage keeps the resumable state of one artifact (by export format name) while it runs."""
    return layout.verify / f"{name}.state.json"


def _clear_verify_dir(layout: Layout, keep: set[Path]) -> None:
    """Empties DIR/verify (the workflow's own reports of an earlier run) except the state files in ``keep``.

    A kept state file that is not a readable verify state (it is the workflow's own file) is removed.
    """
    from ciard_deploy.verify.state import VerifyState

    if not layout.verify.exists():
        return
    for p in layout.verify.iterdir():
        if p in keep and p.is_file():
            try:
                VerifyState.load(p)
                continue
            except ArtifactError as e:
                log.info("discarding %s: %s", layout.rel(p), e)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _run_verify(ctx: _Context) -> list[Path]:
    """Verifies every artifact of the manifest; resumable: each keeps a state at DIR/verify/<name>.state.json.

    An interrupted verify stage (Ctrl-C, a killed job) leaves those states behind; the next call
    continues each artifact's live attacks where they stopped (finished ones are taken whole from
    its state), provided the state is for the same artifact, pack and settings; any
    other state is the workflow's own stale file and is started over. Once the stage is done the
    states are removed: the stage's outputs (hashed in ``workflow.json``) are the reports only.
    """
    from ciard_deploy.resume import StateMismatch
    from ciard_deploy.export.manifest import load_manifest
    from ciard_deploy.verify.verification import run as verify_run

    d = ctx.recipe.deploy
    manifest = load_manifest(ctx.layout.export)
    gates = _gates(ctx.recipe)
    states = {a.name: state_path(ctx.layout, a.name) for a in manifest.artifacts}
    _clear_verify_dir(ctx.layout, keep=set(states.values()))
    written: list[Path] = []
    for a in manifest.artifacts:
        def on_state(ev: Any, name: str = a.name) -> None:
            log.info("verify %s: %s %s at %d/%d from %s", name, ev.kind, ev.stage, ev.done, ev.total, ev.path)

        options = dict(gates=gates, policy=_policy(ctx.recipe), provider=d.provider if a.format == "onnx" else None,
                       live=list(d.live_attacks), live_n=d.live_n, seed=d.seed, threads=ctx.threads,
                       progress=ctx.progress_for(f"verify {a.name}"), state_path=states[a.name], on_state=on_state)
        try:
            report = verify_run(ctx.layout.export / a.file, ctx.layout.pack, **options)
        except StateMismatch as e:  # made for an earlier export, pack or settings: the workflow's own, start over
            log.info("verify %s: %s", a.name, e)
            report = verify_run(ctx.layout.export / a.file, ctx.layout.pack, fresh=True, **options)
        written += _write_reports(ctx.layout, a.name, report)
    _combined_chart(ctx.layout, manifest)
    for p in states.values():
        p.unlink(missing_ok=True)
    return written


def _rejudge_verify(ctx: _Context, record: Mapping[str, Any]) -> list[Path]:
    from ciard_deploy.verify.report import VerifyReport

    gates, policy = _gates(ctx.recipe), _policy(ctx.recipe)
    written: list[Path] = []
    for rel in record.get("outputs", {}):
        if rel.endswith(".json"):
            path = ctx.layout.root / rel
            report = VerifyReport.from_json(path).rejudge(gates, policy)
            written += _write_reports(ctx.layout, path.stem, report)
    return written


def _combined_chart(layout: Layout, manifest: Any) -> None:
    """``verify/accuracy.png``: PyTorch vs every artifact in one chart (a by-product: problems are logged)."""
    try:
        from ciard_deploy.plots import accuracy_chart, rows_from_reports

        reports = [json.loads(report_paths(layout, a.name)["json"].read_text()) for a in manifest.artifacts]
        accuracy_chart(rows_from_reports(reports), layout.verify / "accuracy.png",
                       title="clean and robust accuracy: PyTorch vs each artifact")
    except Exception as e:  # noqa: BLE001 - a missing matplotlib must not fail a verified run
        log.info("no combined accuracy chart: %s", e)


# --------------------------------------------------------------------------- the summary
def summarize(layout: Layout) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """Rows per artifact, the PyTorch reference and the failures, from the manifest and the reports on disk."""
    from ciard_deploy.export.manifest import load_manifest
    from ciard_deploy.checkpoints import checkpoint_paths, resolve_checkpoint
    from ciard_deploy.verify.report import VerifyReport

    manifest = load_manifest(layout.export)
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    pack: dict[str, Any] = {}
    for a in manifest.artifacts:
        paths = report_paths(layout, a.name)
        rep = VerifyReport.from_json(paths["json"])
        pack = rep.pack
        wc = rep.results.get("worst_case") or {}
        bad, warned = rep.failures(), rep.warning_failures()
        rows.append({
            "name": a.name, "file": f"export/{a.file}", "format": a.format, "precision": a.precision,
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
            failures.append(f"{a.name}: {rep.failure_summary()}")
        if not a.passed:
            p = a.parity.get("clean", {})
            failures.append(f"{a.name}: export check failed (top-1 agreement with PyTorch "
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


# --------------------------------------------------------------------------- the entry point
@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_environment(recipe: Any) -> None:
    """Exit 3 before any training when an export format needs what this machine lacks."""
    from ciard_deploy.export.base import FORMATS

    d = recipe.deploy
    if any(FORMATS.get(n).gpu for n in d.formats):
        from ciard_deploy.runtime.trt_backend import ensure_tensorrt, import_polygraphy_trt

        ensure_tensorrt()
        import_polygraphy_trt()
    if d.provider != "cpu":
        from ciard_deploy.errors import BackendUnavailable
        from ciard_deploy.runtime.ort_backend import provider_status

        status = provider_status(d.provider)
        if status != "ok":
            raise BackendUnavailable(f"deploy.provider {d.provider}: {status.removeprefix('unavailable: ')}")


def load_deploy_recipe(recipe: "RecipeBase | str | Path", overrides: Sequence[str] = ()) -> "RecipeBase":
    """A recipe with a ``deploy:`` section (a RecipeError names the fix when it has none)."""
    from ciard_deploy.config import RecipeBase, load_recipe

    if not isinstance(recipe, RecipeBase):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise UsageError("overrides apply to a recipe file; apply them before validating a Recipe object")
    if recipe.deploy is None:
        where = recipe.source or "the recipe"
        raise RecipeError(f"{where} has no deploy: section, which `ciard run` needs (formats, pack, gates); add "
                          f"one (see recipes/quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15.yaml) or pass "
                          f"--set deploy.formats=[onnx]")
    return recipe


def _undone_on_refusal(fn: Callable[..., WorkflowResult]) -> Callable[..., WorkflowResult]:
    """:func:`run` that, refused before any stage kept a file (a dataset not found in the first stage's
    setup, a disk full while writing its state), removes the bookkeeping it wrote into ``out_dir``
    (``workflow.json``, ``recipe.yaml``) when they are new: a refused call leaves the folder as it found it.
    Anything else new (a stage's files, kept for a resume) keeps them too; an interruption keeps all."""

    @functools.wraps(fn)
    def wrapper(recipe: Any, out_dir: str | Path, **kwargs: Any) -> WorkflowResult:
        root = Path(out_dir)
        before = {p.name for p in lock.entries(root)} if root.is_dir() else set()
        try:
            return fn(recipe, out_dir, **kwargs)
        except (CiardError, OSError) as e:
            from ciard_deploy.distill.events import TrainingInterrupted

            new = {p.name for p in lock.entries(root)} - before if root.is_dir() else set()
            if not isinstance(e, TrainingInterrupted) and new and new <= {STATE_NAME, Layout(root).recipe.name}:
                lock.remove_new_entries(root, before)
            raise

    return wrapper


@lock.holding("out_dir")
@_undone_on_refusal
def run(recipe: "RecipeBase | str | Path", out_dir: str | Path, *, overrides: Sequence[str] = (),
        from_stage: str | None = None, device: str | None = None, threads: int | None = None, entry: str = "run",
        on_event: Callable[[StageEvent], None] | None = None, train_callbacks: Sequence[Any] = (),
        progress: Progress | None = None) -> WorkflowResult:
    """Runs (or brings up to date) distill -> export -> pack -> verify in ``out_dir``.

    Args:
        recipe: a recipe file (``overrides`` apply) or a validated recipe; it needs a ``deploy:`` section.
        out_dir: the workflow dir: new, empty, or one this function made before.
        overrides: ``a.b=value`` strings, as ``--set``.
        from_stage: force this stage and every later one (``distill`` trains from scratch).
        device: training and pack device (default: the recipe's ``train.device``).
        threads: torch intra-op threads (and onnxruntime's) for this call; None leaves them as they are.
        entry: ``run`` or ``quickstart`` (recorded; a quickstart only reuses its own dirs).
        on_event: called with a StageEvent when a stage starts, is skipped or ends.
        train_callbacks: trainer callbacks (``distill.trainer.TrainEvent``).
        progress: ``callback(done, total, stage=...)`` for export, pack and verify.

    Returns:
        the WorkflowResult; ``result.status`` is ``passed`` (gates set and every one passed, no warning
        failed under the policy, every export check passed), ``failed`` or ``not_gated`` (no gates set:
        nothing failed, nothing was judged).

    Raises:
        UsageError / RecipeError: bad input (exit 2): an unknown stage, a recipe without ``deploy``,
            an ``out_dir`` that holds someone else's files. Nothing is written.
        InUse: another ``ciard run`` into ``out_dir`` is running (exit 2). Nothing is written.
        EnvironmentMissing: a format or provider this machine cannot run (exit 3), before any work.
        TrainingInterrupted: training was stopped (SIGINT/SIGTERM); calling ``run`` again resumes it.
    """
    if from_stage is not None and from_stage not in STAGES:
        import difflib

        close = difflib.get_close_matches(str(from_stage), STAGES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"--from {from_stage!r} is not a stage{hint}; stages: {', '.join(STAGES)}")
    rec = load_deploy_recipe(recipe, overrides)
    layout = Layout(Path(out_dir))
    state = check_out_dir(layout.root, entry)
    _check_environment(rec)
    teachers = _teacher_inputs(rec)

    layout.root.mkdir(parents=True, exist_ok=True)
    sf = _StateFile(layout, state or _new_state(entry))
    sf.data["status"] = "running"
    sf.data["recipe"] = {"path": str(rec.source) if rec.source else None, "overrides": list(overrides),
                         "hash": rec.hash, "deploy_hash": canonical_hash(rec.deploy.model_dump(mode="json")),
                         "kind": rec.kind, "method": rec.method.name, "arch": rec.model_spec.arch,
                         "dataset": rec.data.dataset}
    sf.save()
    from ciard_deploy.io import atomic_write_text

    src = f" from {rec.source}" if rec.source else ""
    atomic_write_text(layout.recipe, f"# the recipe of this workflow{src}, resolved (training hash {rec.short_hash})\n"
                                     f"# ciard run {layout.recipe} --out {layout.root}\n" + rec.to_yaml())

    ctx = _Context(rec, layout, device, threads, list(train_callbacks), progress, sf.data)
    emit = on_event or (lambda ev: None)
    outcomes: dict[str, StageOutcome] = {}
    forced = False
    with _torch_threads(threads):
        for stage in STAGES:
            forced = forced or stage == from_stage
            record = sf.stage(stage)
            inputs = stage_inputs(stage, rec, layout, teachers, sf.data)
            action, reason = plan(stage, record, inputs, layout.root, forced=forced, from_stage=from_stage)
            if action == "skip":
                outcomes[stage] = StageOutcome(stage, "skipped", reason)
                emit(StageEvent("skip", stage, "skip", reason))
                continue
            # a stage that runs again makes every later stage's recorded outputs suspect: its own
            # inputs (upstream hashes) decide, so nothing more is needed here
            emit(StageEvent("start", stage, action, reason))
            t0 = time.perf_counter()
            previous = dict(record)
            record.clear()
            record.update(status="running", action=action, reason=reason, inputs=inputs,
                          inputs_hash=canonical_hash(inputs), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            sf.save()
            try:
                if stage == "distill":
                    files = _run_distill(ctx, action)
                elif stage == "export":
                    files = _run_export(ctx)
                elif stage == "pack":
                    files = _run_pack(ctx)
                elif action == "rejudge":
                    files = _rejudge_verify(ctx, previous)
                else:
                    files = _run_verify(ctx)
            except BaseException as e:
                from ciard_deploy.distill.events import TrainingInterrupted

                interrupted = isinstance(e, (TrainingInterrupted, KeyboardInterrupt))
                record.update(status="interrupted" if interrupted else "failed", error=str(e) or type(e).__name__,
                              seconds=round(time.perf_counter() - t0, 3))
                sf.data["status"] = "interrupted" if interrupted else "error"
                sf.save()
                raise
            seconds = round(time.perf_counter() - t0, 3)
            record.update(status="done", outputs=_file_hashes(layout, files), seconds=seconds,
                          finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), runs=int(previous.get("runs", 0)) + 1)
            sf.save()
            done = {"run": "ran", "resume": "resumed", "rejudge": "rejudged"}[action]
            outcomes[stage] = StageOutcome(stage, done, reason, seconds)
            emit(StageEvent("end", stage, done, reason, seconds))

    rows, reference, failures = summarize(layout)
    result = WorkflowResult(layout.root, outcomes, rows, reference, failures, sf.data)
    sf.data.update(status=result.status, artifacts=rows, reference=reference, failures=failures,
                   last_call={k: asdict(v) for k, v in outcomes.items()})
    sf.save()
    return result


def quickstart_recipe() -> Path:
    """The shipped recipe ``ciard quickstart`` runs (the CIARD digits quick recipe)."""
    from ciard_deploy.config import find_recipe

    return find_recipe(QUICKSTART_RECIPE)


QUICKSTART_RECIPE = "quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15"


__all__ = ["Layout", "QUICKSTART_RECIPE", "STAGES", "STATE_FORMAT", "STATE_NAME", "StageEvent", "StageOutcome",
           "WorkflowResult", "canonical_hash", "changed_keys", "check_out_dir", "load_deploy_recipe", "load_state",
           "outputs_problem", "pack_partial_path", "paths_of", "plan", "quickstart_recipe", "report_paths", "run",
           "stage_inputs", "state_path", "summarize"]
