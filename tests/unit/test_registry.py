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
