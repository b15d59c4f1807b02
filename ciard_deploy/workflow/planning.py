"""Planning ``ciard run``: what each stage consumes (its inputs record: the recipe parts it reads and the
sha256 of the upstream files) and, from that record and the stage's last one in ``workflow.json``,
what it does this time: run, resume, re-judge or skip (``plan``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from ciard_deploy.config import TEACHER_ROLES, DistillRecipe, RecipeBase
from ciard_deploy.errors import ArtifactError, UsageError
from ciard_deploy.checkpoints import checkpoint_paths, resolve_checkpoint
from ciard_deploy.distill import robustbench_teachers
from ciard_deploy.fingerprint import sha256_file
from ciard_deploy.verify.pack_artifacts import TWIN_SUFFIXES
from ciard_deploy.fingerprint import canonical_json_hash, flatten
from ciard_deploy.workflow.state import Action, Layout


# --------------------------------------------------------------------------- the inputs of each stage
def file_hashes(layout: Layout, paths: Sequence[Path]) -> dict[str, str]:
    """sha256 of each of ``paths`` that is a file, by its path in the workflow dir."""
    return {layout.rel(p): sha256_file(p) for p in paths if p.is_file()}


def checkpoint_files(run_dir: Path) -> list[Path]:
    """The files of the best checkpoint of a training run dir (weights and metadata)."""
    ckpt = resolve_checkpoint(run_dir)
    return [p for p in checkpoint_paths(ckpt) if p.is_file()]


def teacher_inputs(recipe: "RecipeBase") -> dict[str, Any]:
    """What the teachers of a distill recipe are: their recipe's hash, their checkpoint's sha256, or their
    RobustBench ID with its weights' sha256 (a changed weights file runs the distill stage again)."""
    if not isinstance(recipe, DistillRecipe):
        return {}
    out: dict[str, Any] = {role: {"recipe_hash": h} for role, h in recipe.teacher_hashes().items()}
    for role in TEACHER_ROLES:
        spec = getattr(recipe.teachers, role)
        if spec is None or spec.recipe is not None:
            continue
        if spec.robustbench is not None:
            out[role] = robustbench_teachers.teacher_input(spec, role, recipe.data.dataset)
            continue
        weights = checkpoint_paths(spec.checkpoint)[0] if Path(spec.checkpoint).suffix in ("", ".json") \
            else Path(spec.checkpoint)
        if not weights.is_file():
            raise ArtifactError(f"teachers.{role}.checkpoint: not found: {weights}")
        out[role] = {"sha256": sha256_file(weights)}
    return dict(sorted(out.items()))


def pack_eps(recipe: "RecipeBase") -> float:
    """The pack's L-inf budget: ``deploy.pack.eps``, else the training eps (``attack.eps``)."""
    d = recipe.deploy
    assert d is not None
    return float(d.pack.eps if d.pack.eps is not None else recipe.attack.eps)


def stage_outputs(state: Mapping[str, Any] | None, stage: str) -> dict[str, str]:
    """The files a stage recorded in ``workflow.json`` (path in the workflow dir -> sha256)."""
    return dict((state or {}).get("stages", {}).get(stage, {}).get("outputs", {}))


def exported_outputs(state: Mapping[str, Any] | None, qat: bool = False) -> dict[str, str]:
    """The export stage's files, and the quantize stage's when ``qat`` (a recipe with ``quantize:``)."""
    out = stage_outputs(state, "export")
    if qat:
        out.update(stage_outputs(state, "quantize"))
    return out


def attacked_artifacts(state: Mapping[str, Any] | None, qat: bool = False) -> dict[str, Any]:
    """The exported files the pack stage attacks white-box (those a torch twin reads: ``TWIN_SUFFIXES``),
    with their sha256 from the export stage (and the quantize stage's QAT artifact when ``qat``)."""
    exported = exported_outputs(state, qat)
    return {k: v for k, v in sorted(exported.items()) if Path(k).suffix.lower() in TWIN_SUFFIXES}


# the names stage_inputs' body reads (its body is rewritten concurrently, issue 13 item 1, and re-applied as is)


def stage_inputs(stage: str, recipe: "RecipeBase", layout: Layout, teachers: Mapping[str, Any] | None = None,
                 state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The inputs a stage's skip decision compares: the recipe parts it reads, upstream files' sha256."""
    d = recipe.deploy
    assert d is not None
    if stage == "distill":
        return {"recipe_hash": recipe.hash, "teachers": dict(teachers or {})}
    qat = recipe.quantize is not None
    if stage in ("export", "quantize", "pack"):
        ckpt = file_hashes(layout, checkpoint_files(layout.run))
    # the deploy keys come from the option models' model_dump() (DeployConfig.stage_options, whose STAGE_KEYS
    # give every deploy field to a stage): a key added to a model cannot be left out of the skip decision
    if stage == "export":
        return {"checkpoint": ckpt, "options": d.stage_options("export")}
    if stage == "quantize":  # the seed and threads of the fine-tuning are the recipe's own (train.seed)
        return {"checkpoint": ckpt, "quantize": recipe.quantize.model_dump(mode="json"),
                "options": {"parity_n": d.parity_n, "seed": d.seed}}
    if stage == "pack":
        return {"checkpoint": ckpt, "artifacts": attacked_artifacts(state, qat),
                "pack": {**d.stage_options("pack"), "eps": pack_eps(recipe)}}  # eps resolved (null: attack.eps)
    if stage == "verify":
        exported = exported_outputs(state, qat)
        return {"artifacts": {k: v for k, v in exported.items() if not k.endswith("manifest.json")},
                "pack": file_hashes(layout, [layout.pack]),
                "settings": d.stage_options("verify"), "gates": d.gates_mapping(), "policy": d.policy_mapping()}
    raise UsageError(f"unknown stage {stage!r}")


# --------------------------------------------------------------------------- the decision
def changed_keys(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two input records."""
    fo, fn = flatten(old or {}, keep_empty=True), flatten(new, keep_empty=True)
    return sorted(k for k in set(fo) | set(fn) if fo.get(k) != fn.get(k))


def outputs_problem(root: Path, outputs: Mapping[str, str]) -> str | None:
    """None when every recorded output exists with its recorded sha256, else what is wrong."""
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
    same = record.get("inputs_hash") == canonical_json_hash(inputs)
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


__all__ = ["attacked_artifacts", "changed_keys", "checkpoint_files", "exported_outputs", "file_hashes",
           "outputs_problem", "pack_eps", "plan", "stage_inputs", "stage_outputs", "teacher_inputs"]
