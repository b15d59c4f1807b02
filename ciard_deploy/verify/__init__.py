"""Verify robustness on the runtime that serves the model: packs, the runtime cascade, parity, gates, reports.

    from ciard_deploy import verify
    pack = verify.build_pack("runs/digits", n=1000, attacks=["pgd20", "fgsm"], eps=0.1)   # needs torch
    verify.save_pack(pack, "pack.npz")
    report = verify.run("exports/digits/model.int8.onnx", "pack.npz",                     # numpy + runtime
                        gates=verify.Gates.create(min_clean=0.9, max_robust_drop=0.02))
    report.status, report.metrics["worst_case_acc"]   # passed | failed | not_gated (no gates: nothing judged)
    report.write_json("verify.json"); report.write_junit("verify.xml"); report.write_markdown("verify.md")
    report = verify.run("model.onnx", "pack.npz", state_path="verify.state.json")       # resumable (Ctrl-C, CI kill)
    report = verify.run("model.onnx", "pack.npz", live=["square1000", "square5000"], live_n=500)  # query-only, live

Nothing in this package imports torch at module level: ``build_pack`` imports it when called;
everything else runs on a device that has only numpy, onnxruntime (or TensorRT).
"""

from __future__ import annotations

from ciard_deploy._lazy import callable_package
from ciard_deploy.runtime.parity_metrics import Parity, compare
from ciard_deploy.verify.checks import CHECKS, Finding
from ciard_deploy.verify.measure import AttackOutcome, RuntimeEvaluation, evaluate_runtime, stratified_subset
from ciard_deploy.options.gates import Gates
from ciard_deploy.verify.gates import GateResult, Policy, gates_from_mapping, gates_from_recipe, judge, load_gates
from ciard_deploy.verify.pack import RobustnessPack, save_pack
from ciard_deploy.verify.pack_load import load_pack
from ciard_deploy.verify.pack_build import build_pack
from ciard_deploy.verify.parity_report import ParityReport
from ciard_deploy.verify.report import VerifyReport, check_report_paths, check_writable
from ciard_deploy.verify.state import VerifyKey, VerifyState
from ciard_deploy.verify.verification import run

__all__ = ["AttackOutcome", "CHECKS", "Finding", "GateResult", "Gates", "Parity", "ParityReport", "Policy",
           "RobustnessPack", "RuntimeEvaluation", "VerifyKey", "VerifyReport", "VerifyState", "build_pack",
           "check_report_paths", "check_writable", "compare", "evaluate_runtime", "gates_from_mapping", "gates_from_recipe", "judge",
           "load_gates", "load_pack", "run", "save_pack", "stratified_subset"]

# `ciard_deploy.verify(...)` runs the Python API verb `ciard_deploy.api.verify` (loaded on the first call)
callable_package(__name__, "ciard_deploy.api:verify")
