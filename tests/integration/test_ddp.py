"""DistributedDataParallel on this CPU: torchrun, 2 processes, gloo. The run finishes, rank 0 alone
writes the run dir, and both ranks end with the same student and the same retrained robust teacher."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from ciard_deploy.data import get_dataset_info
from ciard_deploy.checkpoints import CheckpointMeta, save_checkpoint
from ciard_deploy.models import create_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(300)
def test_torchrun_two_processes_gloo(tmp_path):
    info = get_dataset_info("digits")
    teachers = {}
    for i, role in enumerate(("clean", "robust")):
        torch.manual_seed(i)
        m = create_model("tiny_cnn", 10, 1, info.mean, info.std)
        teachers[role] = str(save_checkpoint(tmp_path / role, m, CheckpointMeta("tiny_cnn", 10, info.input_shape,
                                                                                info.mean, info.std, "digits")))
    recipe = {
        "kind": "distill", "student": {"arch": "tiny_cnn"},
        "teachers": {r: {"checkpoint": p} for r, p in teachers.items()},
        "method": {"name": "ciard", "teacher_start_fraction": 0.0},
        "data": {"dataset": "digits", "train_subset": 200, "holdout": 40, "batch_size": 40},
        "attack": {"eps": 0.15, "steps": 2, "step_size": 0.08},
        "optim": {"lr": 0.05, "schedule": "cosine"},
        "train": {"epochs": 2, "device": "cpu", "eval_n": 40, "final_eval_n": 40, "eval_step_size": 0.04,
                  "sync_bn": True},
    }
    path = tmp_path / "ddp.yaml"
    path.write_text("# ciard distill ddp.yaml --out run\n" + yaml.safe_dump(recipe))
    out = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ciard_deploy", "distill", str(path), "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=280)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "complete" and s["world_size"] == 2
    digests = s["ranks"]["digests"]
    assert len(digests) == 2 and s["ranks"]["in_sync"], digests
    assert digests[0]["student"] == digests[1]["student"]
    assert digests[0]["teacher.robust"] == digests[1]["teacher.robust"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [1, 2]  # one writer
    # every image of the 160 training ones seen once per epoch, split over the ranks
    assert json.loads(lines[0])["images"] == 160
    assert res.stdout.count("(test, n=40)") == 1  # rank 0 alone reports
    assert (res.stdout + res.stderr).count("sync_bn ignored") == 1
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["teachers"]["robust"] and json.loads(lines[0])["teacher_lr"] > 0
