import pytest

from polycom_lm.errors import ConfigError
from polycom_lm.registry import Registry


def test_unknown_name_lists_registered_names_and_suggests():
    things = Registry("thing")

    @things.register("alpha")
    class Alpha:
        pass

    things.register("beta")(object)
    assert things.get("alpha") is Alpha
    with pytest.raises(ConfigError, match=r"unknown thing 'alpah' \(did you mean 'alpha'\?\); registered: alpha, beta"):
        things.get("alpah")


def test_duplicate_registration_is_refused():
    things = Registry("thing")
    things.register("a")(int)
    with pytest.raises(ValueError, match="twice"):
        things.register("a")(float)
