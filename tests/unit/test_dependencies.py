"""The base install is the torch-free device install; torch and the training packages are the `train`
extra, and a verb that needs one of them says so in one line (``errors.missing_dependency``).

`tools/check_device_install.py` checks the same for real (a plain `pip install` of the built wheel in a
fresh venv); tests/integration/test_torch_free.py runs the CLI with torch hidden.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ciard_deploy.errors import EXIT_ENVIRONMENT, TRAIN_EXTRA_MODULES, missing_dependency

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

pytestmark = pytest.mark.unit

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
#: distributions of the training side; none may be a base dependency
TRAINING = {"torch", "torchvision", "onnx", "onnxscript", "safetensors", "scikit-learn", "pyautoattack", "matplotlib"}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def test_base_dependencies_are_the_torch_free_device_install(project):
    base = _names(project["dependencies"])
    assert base & TRAINING == set()
    assert {"numpy", "onnxruntime", "typer", "rich", "pyyaml", "pydantic"} <= base


def test_train_extra_holds_the_training_packages_and_dev_includes_it(project):
    extras = project["optional-dependencies"]
    assert _names(extras["train"]) == TRAINING
    assert "ciard-deploy[train]" in extras["dev"]  # the tests train, export and pack
    assert _names(extras["tensorrt"]) & TRAINING == set()  # an engine verifies on a device without torch


def test_a_missing_training_module_is_one_line_exit_3():
    e = missing_dependency(ModuleNotFoundError("No module named 'torch'", name="torch"), "ciard distill")
    assert e is not None and e.exit_code == EXIT_ENVIRONMENT and "\n" not in str(e)
    assert str(e).startswith("ciard distill needs PyTorch, which is not installed here: pip install 'ciard-deploy[train]'")
    assert "--index-url https://download.pytorch.org/whl/cpu" in str(e)
    e = missing_dependency(ModuleNotFoundError("No module named 'sklearn.datasets'", name="sklearn.datasets"), "x")
    assert e is not None and "scikit-learn" in str(e)
    # anything else stays a bug with its traceback: another module, or an ImportError that is not "not installed"
    assert missing_dependency(ModuleNotFoundError("No module named 'foo'", name="foo"), "x") is None
    assert missing_dependency(ImportError("cannot import name 'x' from 'torch'", name="torch"), "x") is None
    assert missing_dependency(ValueError("torch"), "x") is None


def test_every_training_distribution_has_its_module_named(project):
    """A package added to the `train` extra is also a module the CLI recognises as missing."""
    module_of = {"scikit-learn": "sklearn"}
    assert {module_of.get(d, d) for d in _names(project["optional-dependencies"]["train"])} <= set(TRAIN_EXTRA_MODULES)
