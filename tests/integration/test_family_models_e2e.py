"""A timm and a torchvision architecture named in a recipe, end to end on digits: trained by the real
trainer, exported to ONNX (FP32, and INT8 for the timm one) by ``export.run``, and each artifact run in a
fresh onnxruntime session against the PyTorch model that ``model_loader`` rebuilds from the checkpoint
card (name and stem). timm's ``test_efficientnet`` (0.1M parameters) trains for real; torchvision's
resnet18 with the CIFAR-style stem (11M) takes one step (its export is what is checked; marked slow: the
fast suite builds it, checks its stem and rebuilds it from its card in tests/unit/models)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ciard_deploy import export
from ciard_deploy.config import find_recipe
from ciard_deploy.data.digits import load_digits_split
from ciard_deploy.distill.trainer import run
from ciard_deploy.model_loader import load_checkpoint

pytestmark = pytest.mark.integration
RECIPE = "quick/digits_natural_none_to_tiny_cnn"
COMMON = ["train.eval_attack=null", "train.select_by=clean", "train.final_attacks=[]", "train.eval_n=64",
          "train.final_eval_n=64"]
CASES = {  # arch -> (overrides, export formats)
    "timm:test_efficientnet": (["train.epochs=4", "data.train_subset=512", "optim.lr=0.05"], ["onnx", "onnx-int8"]),
    "torchvision:resnet18": (["model.stem=cifar", "train.epochs=1", "data.train_subset=64"],
                             ["onnx"]),
}


@pytest.fixture(scope="module", params=[
    "timm:test_efficientnet", pytest.param("torchvision:resnet18", marks=pytest.mark.slow)])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    arch = request.param
    overrides, formats = CASES[arch]
    out = tmp_path_factory.mktemp(arch.replace(":", "_"))
    run(find_recipe(RECIPE), out / "run", handle_signals=False, overrides=[f"model.arch={arch}", *overrides, *COMMON])
    export.run(out / "run", out / "export", formats, n=64, calib="clean", calib_n=64, threads=1,
               reference_attack=None, check=False)
    return arch, out / "run", out / "export"


def test_trained_exported_and_agreeing_in_onnxruntime(exported):
    arch, run_dir, export_dir = exported
    model, meta = load_checkpoint(run_dir / "student_best.safetensors")
    assert meta.arch == arch and meta.stem == ("cifar" if arch.startswith("torchvision") else None)
    card = json.loads((run_dir / "student_best.json").read_text())
    assert card["arch"] == arch and card.get("stem") == meta.stem
    if meta.stem:
        assert model.net.conv1.stride == (1, 1) and isinstance(model.net.maxpool, torch.nn.Identity)
    summary = json.loads((run_dir / "summary.json").read_text())
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert manifest["model"]["arch"] == arch
    x, y = load_digits_split("test").tensors()
    x, y = x[:128], y[:128]
    with torch.no_grad():
        ref = model(x).numpy()
    if arch.startswith("timm"):  # trained for real: it learned the digits
        assert summary["best"]["clean"] >= 0.8 and (ref.argmax(1) == y.numpy()).mean() >= 0.8
    for art in manifest["artifacts"]:
        assert art["parity"]["clean"]["passed"], art["parity"]["clean"]["summary"]
        sess = ort.InferenceSession(str(export_dir / art["file"]), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input": x.numpy()})[0]
        agree = (got.argmax(1) == ref.argmax(1)).mean()
        if art["precision"] == "fp32":
            assert agree == 1.0 and np.abs(got - ref).max() < 1e-4
        else:  # INT8 (timm model): measured 98.4 % on the exporter's 64 parity images
            assert agree >= 0.95, (art["file"], agree)
