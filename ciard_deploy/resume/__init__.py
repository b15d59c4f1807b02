"""Resumable evaluations: the state files behind ``ciard eval --state``, ``ciard verify --state`` and a
pack build's partial results (``ciard pack``, ``ciard run``).

A state file says what is evaluated (a key: model sha256, data, seeds, eps, ...), holds the
clean flags, and one ``AttackRecord`` per attack with its settings, per-sample robust flags,
seconds and how far it got. The evaluation fills it in and saves it (atomically) as it goes;
a later call with an equal key reuses the finished attacks, continues a partial one and runs
only what is missing. A file of another kind is never overwritten; a different evaluation is
refused, naming every difference.

The machinery (``resume.state_file``: ``ResumableState``, ``StateKey``, ``StateMismatch``; and
``resume.records``: ``AttackRecord``, ``StateEvent``) has three kinds of file built on it:

- ``EvaluationState`` (``kind: ciard.eval_state``, key ``EvaluationKey``; ``resume.evaluation``):
  ``ciard eval`` of a PyTorch checkpoint, filled in by ``attacks.cascade.run_cascade``;
- ``verify.state.VerifyState`` (``kind: ciard.verify_state``): ``ciard verify`` on a runtime,
  filled in by ``verify.measure.evaluate_runtime``;
- ``verify.pack_partial.PackPartial`` (``kind: ciard.pack_partial``, key ``PackKey``, an
  ``EvaluationKey`` with more fields): the finished attacks of a pack build.

The file is JSON; per-sample flags are strings of ``0``/``1``, one character per sample in
evaluation order, so a 10 000-sample evaluation stays a few kB per attack::

    {"kind": "ciard.eval_state", "schema_version": 1,
     "key": {"model_sha256": "...", "arch": "tiny_cnn", "dataset": "digits", "split": "test",
             "n": 360, "seed": 0, "eps": 0.15, "indices_sha256": "...", "data_sha256": "..."},
     "info": {"model_source": "...", "created": "...", "updated": "...", "versions": {...}},
     "clean_correct": "1101...",
     "attacks": [{"label": "pgd20@0.15", "name": "pgd20", "eps": 0.15, "settings": {...},
                  "total": 352, "done": 352, "seconds": 3.2, "per_sample": "0100...",
                  "device": "cpu", "batch_size": 256}]}

numpy only (no torch): ``ciard verify`` resumes on a device without torch.
"""

from ciard_deploy.resume.evaluation import STATE_KIND, STATE_SCHEMA_VERSION, EvaluationKey, EvaluationState, open_state
from ciard_deploy.resume.records import (Announce, AttackRecord, StateEvent, StateEventKind, flags_from_str,
                                         flags_to_str, settings_differences)
from ciard_deploy.resume.state_file import (FRESH_HINT, SAVE_EVERY_S, ResumableState, StateKey, StateMismatch,
                                            read_state_json, state_hooks)

__all__ = [
    "Announce", "AttackRecord", "EvaluationKey", "EvaluationState", "FRESH_HINT", "ResumableState", "SAVE_EVERY_S",
    "STATE_KIND", "STATE_SCHEMA_VERSION", "StateEvent", "StateEventKind", "StateKey", "StateMismatch",
    "flags_from_str", "flags_to_str", "open_state", "read_state_json", "settings_differences", "state_hooks",
]
