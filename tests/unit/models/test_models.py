import pytest
import torch

from ciard_deploy.errors import UsageError
from ciard_deploy.models import create_model, list_models

pytestmark = pytest.mark.unit

EXPECTED = {"resnet18", "resnet34", "preactresnet18", "resnet56", "wrn-34-10", "wrn-28-10", "mobilenetv2",
            "small_cnn", "tiny_cnn"}


def test_registry_has_the_paper_models():
    assert EXPECTED <= set(list_models())


@pytest.mark.parametrize("name", sorted(set(list_models())))
@pytest.mark.parametrize("size", [32, 64])
def test_forward_shapes(name, size):
    torch.manual_seed(0)
    m = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = m(torch.rand(2, 3, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["small_cnn", "small_cnn_wide", "tiny_cnn", "resnet18_tiny", "mobilenetv2_tiny", "resnet56"])
def test_digits_shape_one_channel(name):
    m = create_model(name, num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        assert m(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_normalization_lives_in_the_model():
    torch.manual_seed(0)
    m = create_model("tiny_cnn", 10, 3, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3]).eval()
    x = torch.rand(2, 3, 32, 32)
    manual = m.net((x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1))
    assert torch.allclose(m(x), manual, atol=1e-6)
    assert {"mean", "std"} <= set(m.state_dict())


def test_unknown_model_lists_valid_names():
    with pytest.raises(UsageError, match="unknown model 'resnet-18'.*resnet18"):
        create_model("resnet-18")


def test_wrong_normalization_length():
    with pytest.raises(ValueError):
        create_model("tiny_cnn", 10, 3, mean=[0.5], std=[0.2])
