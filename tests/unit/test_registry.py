import pytest

from ciard_deploy.errors import UsageError
from ciard_deploy.registry import Registry

pytestmark = pytest.mark.unit


def test_register_get_and_list():
    r: Registry[int] = Registry("widget")
    r.add("alpha", 1)

    @r.register("beta")
    def beta():
        return 2

    assert r.names() == ["alpha", "beta"]
    assert r.get("beta")() == 2
    assert "alpha" in r and "gamma" not in r


def test_unknown_name_lists_valid_names_and_suggests():
    r: Registry[int] = Registry("widget")
    r.add("resnet18", 1)
    r.add("resnet56", 2)
    with pytest.raises(UsageError) as e:
        r.get("resnet19")
    msg = str(e.value)
    assert "unknown widget 'resnet19'" in msg and "resnet18, resnet56" in msg and "Did you mean" in msg
    assert "\n" not in msg


def test_duplicate_registration_is_a_bug():
    r: Registry[int] = Registry("widget")
    r.add("a", 1)
    with pytest.raises(ValueError):
        r.add("a", 2)


def test_lazy_package_attributes_are_the_functions_even_after_their_modules_load():
    """attacks.run_cascade (the cascade function) lives in attacks/cascade.py: a submodule of the same
    name would replace the lazy attribute once imported (the trainer then got a module, not a function)."""
    import importlib

    import ciard_deploy.attacks as attacks
    import ciard_deploy.distill as distill

    importlib.import_module("ciard_deploy.attacks.cascade")
    importlib.import_module("ciard_deploy.distill.trainer")
    assert callable(attacks.run_cascade) and attacks.run_cascade.__module__ == "ciard_deploy.attacks.cascade"
    assert callable(distill.run) and distill.run.__module__ == "ciard_deploy.distill.trainer"
    for name in ("attacks", "distill"):
        pkg = importlib.import_module(f"ciard_deploy.{name}")
        for attr in pkg.__all__:
            assert not isinstance(getattr(pkg, attr), type(importlib)), f"ciard_deploy.{name}.{attr} is a module"
