"""The family registry: every entry resolves, is recognised from its config, and has tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgelm.errors import UnsupportedModelError
from edgelm.families import FAMILIES, family_for_config

TESTS = Path(__file__).parent


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_registered_family_has_a_test_file(name):
    assert list(TESTS.glob(f"test_*{name}*.py")), f"family {name!r} has no tests/test_*{name}*.py"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_exporter_and_runtimes_resolve_to_functions(name):
    family = FAMILIES[name]
    assert callable(family.export_fn())
    for fmt in family.runtimes:
        assert callable(family.runtime_fn(fmt))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_model_types_map_back_to_their_family(name):
    for model_type in FAMILIES[name].model_types:
        assert family_for_config({"model_type": model_type}, "x").name == name


def test_unknown_model_type_names_every_family():
    with pytest.raises(UnsupportedModelError) as err:
        family_for_config({"model_type": "t5"}, "folder")
    for name in FAMILIES:
        assert name in str(err.value)
