"""tools/gpu_check.py and tools/bench_step.py on CPU: the check refuses in one line with exit 3 without
CUDA, its training worker proves resume equality on CPU, and the benchmark's FLOP count of a CIARD
step (per-model counts times the step's passes) equals a count of a real step."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.unit
TOOLS = Path(__file__).resolve().parents[3] / "tools"


def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_3(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(TOOLS.parent)}
    p = subprocess.run([sys.executable, str(TOOLS / "gpu_check.py"), "--out", str(out)], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 3
    assert p.stdout.strip().startswith("gpu_check: no CUDA device here") and len(p.stdout.strip().splitlines()) == 1
    assert not out.exists()


def test_gpu_check_training_worker_resumes_to_the_same_weights_on_cpu(load_tool, tmp_path):
    gc = load_tool("gpu_check")
    res = gc.train_worker("natural", "cpu", tmp_path, ["fp32"])["fp32"]
    assert res["finite"] and res["interrupted"] and len(res["losses"]) == 2
    assert res["resume_equal"] and res["resume_max_abs_diff"] == 0.0
    assert res["resumed_losses"] == res["losses"]


def test_gpu_check_recipes_cover_every_method_and_validate(load_tool):
    from ciard_deploy.config import recipe_from_dict
    from ciard_deploy.distill.methods import list_methods

    gc = load_tool("gpu_check")
    assert sorted(gc.METHODS) == sorted(list_methods())
    teachers = {"clean": "c.safetensors", "robust": "r.safetensors"}
    for m in gc.METHODS:
        for cfg in gc.CONFIGS.values():
            r = recipe_from_dict(gc.tiny_recipe(m, teachers, "cuda", deterministic=True, **cfg))
            assert r.method.name == m and r.train.device == "cuda"


def test_step_flops_equal_a_count_of_a_real_ciard_step(load_tool):
    bs = load_tool("bench_step")
    device = torch.device("cpu")
    models = [bs.build(a, device, i) for i, a in enumerate(("tiny_cnn", "tiny_cnn", "small_cnn"))]
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    total, detail = bs.step_flops(dict(zip(("student", "clean", "robust"), models)), x)
    counted = bs.counted_step_flops(bs.OurStep(*(copy.deepcopy(m) for m in models), device, "off", False), x, y)
    assert total == counted > 0
    s = detail["student"]
    assert s["passes"] == {"forward": 12, "weight_backward": 2, "input_backward": 10}
    assert s["per_pass"]["weight_backward"] > s["per_pass"]["input_backward"] > 0


def test_peak_table_matches_device_names_and_a_given_peak_wins(load_tool):
    bs = load_tool("bench_step")
    assert bs.peak_tflops("NVIDIA H100 80GB HBM3", "bf16", None) == 989.4
    assert bs.peak_tflops("NVIDIA H100 PCIe", "fp16", None) == 756.0
    assert bs.peak_tflops("NVIDIA H200", "off", None) == 494.7  # fp32 rows: the TF32 peak
    assert bs.peak_tflops("NVIDIA A100-SXM4-40GB", "bf16", None) == 312.0
    assert bs.peak_tflops("NVIDIA L4", "bf16", None) is None
    assert bs.peak_tflops("NVIDIA L4", "bf16", 121.0) == 121.0
