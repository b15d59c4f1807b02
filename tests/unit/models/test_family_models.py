"""Architectures of model families by name (``timm:NAME``, ``torchvision:NAME``): recipe keys checked by
form without torch, models built by the real timm/torchvision with fresh weights, the CIFAR-style stem,
the input-size check, and the one-line refusals (unknown name with near matches, a stem the model cannot
take, a model that cannot take the data, timm not installed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from ciard_deploy.checkpoints import CheckpointMeta, read_meta, save_checkpoint
from ciard_deploy.config.sections import ModelSpec, TeacherSpec
from ciard_deploy.data import get_dataset_info
from ciard_deploy.distill.teachers import load_teacher
from ciard_deploy.errors import EXIT_ENVIRONMENT, ArtifactError, EnvironmentMissing, UsageError
from ciard_deploy.model_loader import load_checkpoint, load_model
from ciard_deploy.models import create_model

pytestmark = pytest.mark.unit
DIGITS = get_dataset_info("digits")
RECIPE = Path(__file__).parents[3] / "recipes/quick/digits_natural_none_to_tiny_cnn.yaml"


# --------------------------------------------------------------------------- recipe keys (torch-free checks)
def test_recipe_accepts_family_names_and_keeps_the_hash_of_recipes_without_a_stem():
    spec = ModelSpec(arch="timm:resnet18")
    assert spec.model_dump() == {"arch": "timm:resnet18", "normalize": True}  # no stem key: hashes unchanged
    cifar = ModelSpec(arch="torchvision:resnet18", stem="cifar")
    assert cifar.model_dump(mode="json") == {"arch": "torchvision:resnet18", "normalize": True, "stem": "cifar"}
    assert ModelSpec(arch="small_cnn").model_dump() == {"arch": "small_cnn", "normalize": True}


@pytest.mark.parametrize("arch, words", [
    ("timn:resnet18", ["unknown model family 'timn'", "Did you mean 'timm'"]),
    ("timm:resnet18.a1_in1k", ["names pretrained weights", "nothing downloads", "use timm:resnet18"]),
    ("timm:", ["give a timm model name"]),
    ("resnet-18", ["unknown model 'resnet-18'", "resnet18", "timm:NAME"]),
])
def test_recipe_refuses_malformed_names(arch, words):
    with pytest.raises(ValidationError) as e:
        ModelSpec(arch=arch)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_validating_a_family_recipe_imports_neither_torch_nor_the_family():
    code = ("import sys; from ciard_deploy.config import load_recipe; "
            f"r = load_recipe({str(RECIPE)!r}, ['model.arch=torchvision:resnet18', 'model.stem=cifar']); "
            "assert r.model_spec.stem == 'cifar' and len(r.hash) == 64; "
            "bad = [m for m in ('torch', 'timm', 'torchvision') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_stem_needs_a_family_architecture():
    with pytest.raises(ValidationError, match="the built-in 'resnet18' has its own stem"):
        ModelSpec(arch="resnet18", stem="cifar")
    with pytest.raises(ValidationError, match="stem"):
        ModelSpec(arch="timm:resnet18", stem="imagenet")
    with pytest.raises(ValidationError, match="the built-in 'small_cnn' has its own stem"):
        TeacherSpec(checkpoint="t.pt", arch="small_cnn", stem="cifar")


# --------------------------------------------------------------------------- building
def test_timm_model_built_with_classes_channels_and_fresh_weights():
    torch.manual_seed(0)
    m = create_model("timm:test_efficientnet", 7, 1, DIGITS.mean, DIGITS.std, input_shape=(1, 8, 8)).eval()
    with torch.no_grad():
        out = m(torch.rand(3, 1, 8, 8))
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    import timm

    own = timm.create_model("test_efficientnet", num_classes=7, in_chans=1)
    assert sum(p.numel() for p in m.net.parameters()) == sum(p.numel() for p in own.parameters()) == 100_563
    assert {"mean", "std"} <= set(m.state_dict())  # normalization inside, as for the built-in models


def test_cifar_stem_keeps_small_images_large():
    """torchvision resnet18 on 8x8 digits: its own stem leaves 2x2 maps for layer1, the CIFAR stem 8x8."""
    sizes = {}
    for stem in (None, "cifar"):
        torch.manual_seed(0)
        m = create_model("torchvision:resnet18", 10, 1, stem=stem, input_shape=(1, 8, 8)).eval()
        seen = []
        m.net.layer1.register_forward_hook(lambda mod, i, o: seen.append(tuple(o.shape[-2:])))
        with torch.no_grad():
            m(torch.zeros(1, 1, 8, 8))
        sizes[stem] = seen[0]
        if stem:
            assert m.net.conv1.kernel_size == (3, 3) and m.net.conv1.stride == (1, 1) and m.net.conv1.in_channels == 1
            assert isinstance(m.net.maxpool, nn.Identity)
    assert sizes == {None: (2, 2), "cifar": (8, 8)}


def test_cifar_stem_on_a_timm_deep_stem():
    m = create_model("timm:resnet10t", 10, 3, stem="cifar", input_shape=(3, 16, 16))
    assert m.net.conv1[0].stride == (1, 1) and m.net.conv1[0].kernel_size == (3, 3)
    assert isinstance(m.net.maxpool, nn.Identity)


@pytest.mark.parametrize("arch, kwargs, words", [
    ("timm:resnet_18", {}, ["unknown model 'timm:resnet_18'", "Did you mean timm:resnet18"]),
    ("torchvision:resnet19", {}, ["unknown model 'torchvision:resnet19'", "torchvision:resnet18"]),
    ("timm:test_vit", {"input_shape": (1, 8, 8)}, ["timm:test_vit cannot take this dataset's 1x8x8 inputs",
                                                    "doesn't match model (160)"]),
    ("timm:test_efficientnet", {"stem": "cifar"}, ["stem 'cifar' adapts ResNets", "EfficientNet"]),
    ("small_cnn", {"stem": "cifar"}, ["the built-in 'small_cnn' has its own stem"]),
])
def test_one_line_refusals(arch, kwargs, words):
    with pytest.raises(UsageError) as e:
        create_model(arch, 10, 1, **kwargs)
    text = str(e.value)
    assert "\n" not in text and e.value.exit_code == 2
    for w in words:
        assert w in text, text


def test_timm_not_installed_is_exit_3_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError, as where it is absent
    with pytest.raises(EnvironmentMissing) as e:
        create_model("timm:resnet18", 10, 3)
    assert e.value.exit_code == EXIT_ENVIRONMENT and "pip install 'ciard-deploy[timm]'" in str(e.value)


# --------------------------------------------------------------------------- checkpoints and teachers
def test_card_records_name_and_stem_and_rebuilds_the_same_model(tmp_path):
    torch.manual_seed(0)
    m = create_model("torchvision:resnet18", 10, 1, DIGITS.mean, DIGITS.std, stem="cifar").eval()
    save_checkpoint(tmp_path / "m", m, CheckpointMeta("torchvision:resnet18", 10, DIGITS.input_shape, DIGITS.mean,
                                                      DIGITS.std, "digits", DIGITS.classes, stem="cifar"))
    meta = read_meta(tmp_path / "m.safetensors")
    assert (meta.arch, meta.stem) == ("torchvision:resnet18", "cifar")
    back, _ = load_checkpoint(tmp_path / "m.safetensors")
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    assert "stem" not in CheckpointMeta("small_cnn", 10, (1, 8, 8), (0.0,), (1.0,)).to_dict()  # old cards unchanged


def test_plain_state_dict_of_a_family_model_as_teacher_and_export_source(tmp_path):
    torch.manual_seed(0)
    net = create_model("timm:test_efficientnet", 10, 1, DIGITS.mean, DIGITS.std).eval()
    torch.save(net.state_dict(), tmp_path / "teacher.pt")
    spec = TeacherSpec(checkpoint=str(tmp_path / "teacher.pt"), arch="timm:test_efficientnet", normalize=True)
    teacher, ref = load_teacher(spec, "clean", DIGITS, torch.device("cpu"))
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(teacher.eval()(x), net(x))
    assert ref["arch"] == "timm:test_efficientnet"
    model, meta = load_model(tmp_path / "teacher.pt", arch="timm:test_efficientnet", dataset="digits")
    assert meta.arch == "timm:test_efficientnet" and meta.stem is None
    with pytest.raises(UsageError, match="timm:test_vit cannot take this dataset's 1x8x8 inputs"):
        load_model(tmp_path / "teacher.pt", arch="timm:test_vit", dataset="digits")


def test_teacher_stem_must_match_its_card(tmp_path):
    m = create_model("timm:resnet10t", 10, 1, DIGITS.mean, DIGITS.std)
    save_checkpoint(tmp_path / "t", m, CheckpointMeta("timm:resnet10t", 10, DIGITS.input_shape, DIGITS.mean,
                                                      DIGITS.std, "digits", DIGITS.classes))
    spec = TeacherSpec(checkpoint=str(tmp_path / "t.safetensors"), arch="timm:resnet10t", stem="cifar")
    with pytest.raises(ArtifactError, match="has stem none, the recipe says stem cifar"):
        load_teacher(spec, "robust", DIGITS, torch.device("cpu"))


# --------------------------------------------------------------------------- the CLI: one line, nothing written


@pytest.mark.parametrize("override, code, words", [
    ("model.arch=timm:resnet_18", 2, ["unknown model 'timm:resnet_18'", "Did you mean timm:resnet18"]),
    ("model.arch=torchvision:resnet_18", 2, ["unknown model 'torchvision:resnet_18'", "torchvision:resnet18"]),
    ("model.arch=timm:test_vit", 2, ["timm:test_vit cannot take this dataset's 1x8x8 inputs"]),
    ("model.arch=timn:resnet18", 2, ["model.arch", "unknown model family 'timn'", "Did you mean 'timm'"]),
    ("model.stem=cifar", 2, ["stem 'cifar' adapts", "'tiny_cnn' has its own stem"]),
])
def test_train_refuses_in_one_line_and_writes_nothing(invoke, assert_one_line_error, tmp_path, override, code, words):
    out = tmp_path / "run"
    res = invoke("train", RECIPE, "--out", out, "--set", override, "-q")
    assert_one_line_error(res, code, *words)
    assert not out.exists()


def test_train_without_timm_is_exit_3(invoke, assert_one_line_error, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    res = invoke("train", RECIPE, "--out", tmp_path / "run", "--set",
                 "model.arch=timm:resnet18", "-q")
    assert_one_line_error(res, 3, "timm:resnet18 needs timm", "pip install 'ciard-deploy[timm]'")
    assert not (tmp_path / "run").exists()


def test_models_lists_the_families(invoke):
    res = invoke("models")
    assert res.exit_code == 0 and "timm:<name>" in res.output and "torchvision:<name>" in res.output
