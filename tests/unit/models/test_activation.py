"""MobileNetV2's activation choice (issue 15): ReLU6 by default, ReLU as the CIARD reference's CIFAR MobileNetV2;
a recipe field (left out of the hash while null), carried by the checkpoint card so a student rebuilds as trained."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ciard_deploy.checkpoints import CheckpointMeta, read_meta, save_checkpoint
from ciard_deploy.config import find_recipe, load_recipe, recipe_from_dict
from ciard_deploy.errors import RecipeError, UsageError
from ciard_deploy.model_loader import load_checkpoint
from ciard_deploy.models import create_model
from ciard_deploy.models.mobilenetv2 import ACTIVATION_FNS
from ciard_deploy.options.catalog import ACTIVATIONS

pytestmark = pytest.mark.unit


def test_catalog_and_models_agree_on_the_choices():
    assert all(set(choices) == set(ACTIVATION_FNS) and choices[0] == "relu6" for choices in ACTIVATIONS.values())


def test_relu_and_relu6_share_weights_and_differ_only_above_six():
    torch.manual_seed(0)
    relu6 = create_model("mobilenetv2_tiny", 10, 3).eval()
    relu = create_model("mobilenetv2_tiny", 10, 3, activation="relu").eval()
    relu.load_state_dict(relu6.state_dict())  # same parameters and buffers, key for key
    assert relu.net.act is F.relu and relu6.net.act is F.relu6 and relu.net.layers[0].act is F.relu
    x = torch.rand(2, 3, 32, 32)
    for m in relu.modules():  # BatchNorm running variance tiny: pre-activations far above 6
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.fill_(1e-4)
    relu6.load_state_dict(relu.state_dict())
    with torch.no_grad():
        assert not torch.allclose(relu(x), relu6(x))
    with pytest.raises(UsageError, match="activation 'relu'"):
        create_model("resnet18_tiny", 10, 3, activation="relu")


def recipe(**student):
    return {"kind": "train", "model": {"arch": "mobilenetv2_tiny", **student}, "method": {"name": "natural"}}


def test_recipe_field_is_checked_and_left_out_of_the_hash_while_null():
    plain = recipe_from_dict(recipe())
    assert "activation" not in plain.to_dict()["model"]
    assert recipe_from_dict(recipe(activation=None)).hash == plain.hash
    relu = recipe_from_dict(recipe(activation="relu"))
    assert relu.model_spec.activation == "relu" and relu.hash != plain.hash
    with pytest.raises(RecipeError, match="only mobilenetv2, mobilenetv2_tiny offer a choice of activation"):
        recipe_from_dict({**recipe(), "model": {"arch": "tiny_cnn", "activation": "relu"}})
    with pytest.raises(RecipeError, match="activation"):
        recipe_from_dict(recipe(activation="gelu"))
    for ds in ("cifar10", "cifar100", "tinyimagenet"):
        spec = load_recipe(find_recipe(f"{ds}/{ds}_ciard_wrn-34-10_to_mobilenetv2_linf8")).model_spec
        assert (spec.arch, spec.activation, spec.normalize) == ("mobilenetv2", "relu", False)


def test_the_checkpoint_card_carries_the_activation(tmp_path):
    torch.manual_seed(0)
    net = create_model("mobilenetv2_tiny", 10, 3, activation="relu")
    meta = CheckpointMeta("mobilenetv2_tiny", 10, (3, 32, 32), (0.0,) * 3, (1.0,) * 3, activation="relu")
    save_checkpoint(tmp_path / "relu", net, meta)
    assert read_meta(tmp_path / "relu").activation == "relu"
    loaded, _ = load_checkpoint(tmp_path / "relu.safetensors")
    assert loaded.net.act is F.relu
    save_checkpoint(tmp_path / "plain", create_model("mobilenetv2_tiny", 10, 3),
                    CheckpointMeta("mobilenetv2_tiny", 10, (3, 32, 32), (0.0,) * 3, (1.0,) * 3))
    assert "activation" not in (tmp_path / "plain.json").read_text()
    assert load_checkpoint(tmp_path / "plain.safetensors")[0].net.act is F.relu6
