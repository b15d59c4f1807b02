"""``ciard run``: one recipe from training to a verified artifact, in stages that know when to skip.

    from ciard_deploy import workflow
    result = workflow.run("recipes/quick/digits_ciard_small_cnn_to_tiny_cnn_linf0.15.yaml", "runs/digits")
    result.status                      # passed (gates set, all passed), failed, or not_gated (no gates set)
    result.rows                        # one row per artifact: precision, size, clean, worst case, agreement, gates

The stages, in order, each a plain library call: distill (or train) -> DIR/run/, export ->
DIR/export/, (with a recipe ``quantize:`` section) quantize -> DIR/qat/, pack -> DIR/pack.npz,
verify -> DIR/verify/ (``stages`` says which call and what files each makes).

The recipe's ``deploy:`` section (``config.DeployConfig``) says what export, pack and verify do.
``DIR/workflow.json`` records, per stage, its inputs (the recipe parts it reads and the sha256 of
the upstream files it consumes), the sha256 of its outputs, its status and its timings. A second
run skips every stage whose inputs are unchanged and whose outputs are still there with the
recorded hashes; an interrupted distill stage resumes from its last checkpoint (the trainer's own
resume); an interrupted quantize stage leaves no DIR/qat/ (it writes DIR/qat.partial/ and renames it
once complete) and runs again whole; an interrupted pack stage reuses the attacks it finished (``write_pack``);
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

The package, one role per module: ``state`` (the dir's layout and ``workflow.json``), ``planning``
(each stage's inputs and the run/resume/rejudge/skip decision), ``stages`` (the four adapters over
the library), ``summary`` (events and the result) and ``runner`` (``run``, the entry point).
"""


from __future__ import annotations

from ciard_deploy.workflow.planning import changed_keys, outputs_problem, plan, stage_inputs
from ciard_deploy.workflow.runner import QUICKSTART_RECIPE, load_deploy_recipe, quickstart_recipe, run
from ciard_deploy.workflow.stages import pack_partial_path
from ciard_deploy.workflow.state import (STAGES, STATE_FORMAT, STATE_NAME, Layout, check_out_dir,
                                         load_state, paths_of, report_paths, state_path)
from ciard_deploy.workflow.summary import StageEvent, StageOutcome, WorkflowResult, summarize

__all__ = ["Layout", "QUICKSTART_RECIPE", "STAGES", "STATE_FORMAT", "STATE_NAME", "StageEvent", "StageOutcome",
           "WorkflowResult", "changed_keys", "check_out_dir", "load_deploy_recipe", "load_state",
           "outputs_problem", "pack_partial_path", "paths_of", "plan", "quickstart_recipe", "report_paths", "run",
           "stage_inputs", "state_path", "summarize"]
