"""The family registry: every (family, format) pair resolves, has a well-formed quant table and tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgelm.errors import UnsupportedModelError, UsageError
from edgelm.families import FAMILIES, LLAMA_FTYPES, all_quant_names, family_for_config, family_for_gguf_arch

TESTS = Path(__file__).parent


PAIRS = sorted((name, spec.format) for name, family in FAMILIES.items() for spec in family.exports)


@pytest.mark.parametrize("name, fmt", PAIRS)
def test_every_registered_family_and_format_has_a_test_file(name, fmt):
    """The default format's tests may be named by family alone; any other format names both."""
    files = {p.name for p in TESTS.glob(f"test_*{name}*.py")}
    if fmt != FAMILIES[name].formats[0]:
        files = {f for f in files if fmt in f}
    assert files, f"({name}, {fmt}) has no tests/test_*{name}*.py naming {fmt}"


@pytest.mark.parametrize("name, fmt", PAIRS)
def test_exporter_and_runtime_of_each_pair_resolve_to_functions(name, fmt):
    family = FAMILIES[name]
    assert callable(family.export_fn(fmt))
    assert callable(family.runtime_fn(fmt))


@pytest.mark.parametrize("name, fmt", PAIRS)
def test_each_quant_table_is_well_formed(name, fmt):
    spec = FAMILIES[name].spec(fmt)
    names = spec.quant_names
    assert len(set(names)) == len(names) and spec.quant(None) is spec.quants[0]
    for quant in spec.quants:
        assert quant.bounds, f"{name}/{fmt}/{quant.name} declares no validation threshold"
        if fmt == "gguf":
            assert quant.ftype is not None and quant.method in ("float", "llama.cpp")
        else:
            assert quant.ftype is None and quant.method and quant.method not in ("float", "llama.cpp")
    with pytest.raises(UsageError, match=f"not available for {fmt}; choose one of: {names[0]}"):
        spec.quant("no-such-type")


def test_llama_cpp_file_types_are_pinned_to_the_gguf_package():
    gguf = pytest.importorskip("gguf")
    for name, value in LLAMA_FTYPES.items():
        member = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}.get(name, f"MOSTLY_{name.upper()}")
        assert gguf.LlamaFileType[member] == value, name


def test_every_gguf_pair_has_an_architecture_spec():
    from edgelm.export.gguf_arch import ARCHS

    for family in FAMILIES.values():
        for spec in family.exports:
            if spec.format == "gguf":
                assert spec.gguf_arch in ARCHS and ARCHS[spec.gguf_arch].family == family.name
                assert family_for_gguf_arch(spec.gguf_arch) is family


def test_export_help_lists_the_quant_tables():
    from click.testing import CliRunner

    from edgelm.cli import main

    text = CliRunner().invoke(main, ["export", "--help"]).output
    for quant in all_quant_names():
        assert quant in text


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_model_types_map_back_to_their_family(name):
    for model_type in FAMILIES[name].model_types:
        assert family_for_config({"model_type": model_type}, "x").name == name


def test_unknown_model_type_names_every_family():
    with pytest.raises(UnsupportedModelError) as err:
        family_for_config({"model_type": "t5"}, "folder")
    for name in FAMILIES:
        assert name in str(err.value)
