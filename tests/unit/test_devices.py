import pytest
import torch

from ciard_deploy.devices import resolve_device
from ciard_deploy.errors import EnvironmentMissing, UsageError

pytestmark = pytest.mark.unit


def test_auto_and_cpu():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error; this machine has CUDA")
def test_cuda_missing_is_environment_error():
    with pytest.raises(EnvironmentMissing) as e:
        resolve_device("cuda:0")
    assert e.value.exit_code == 3


def test_unknown_device():
    with pytest.raises(UsageError):
        resolve_device("tpu")
