"""The library's index file and its names are untrusted input: properties over generated inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import fuzz_examples  # noqa: E402
from edgelm.errors import ArtifactError, UsageError  # noqa: E402
from edgelm.library import (  # noqa: E402
    MAX_NAME,
    Entry,
    Verification,
    check_name,
    dump_index,
    is_valid_name,
    name_from_path,
    parse_index,
)

WHERE = Path("/home/someone/.local/share/edgelm/library.json")
NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
valid_names = st.text(NAME_CHARS, min_size=1, max_size=MAX_NAME).filter(is_valid_name)
short_text = st.text(max_size=30)
# what os can hand edgelm as a path or a manifest field: undecodable bytes arrive as lone surrogates
any_text = st.text(st.characters(blacklist_characters="\x00"), max_size=30)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | short_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(short_text, inner, max_size=4),
    max_leaves=20,
)
entries = st.builds(
    Entry, name=valid_names, path=any_text.map(lambda t: "/" + t),
    copied=st.booleans(), family=any_text, format=any_text, quant=any_text, task=any_text,
    added=short_text,
    verified=st.none() | st.builds(Verification, passed=st.booleans(), at=short_text, cpu=short_text),
)


def assert_one_line_naming_the_file(err: ArtifactError) -> None:
    message = str(err)
    assert message.startswith(f"{WHERE}: ") and "\n" not in message and len(message) < 600, message


@settings(max_examples=fuzz_examples(300))
@given(st.binary(max_size=400))
def test_any_bytes_are_an_index_or_one_line_naming_the_file(data):
    try:
        parse_index(data, WHERE)
    except ArtifactError as err:
        assert_one_line_naming_the_file(err)


@settings(max_examples=fuzz_examples(300))
@given(st.fixed_dictionaries({"version": st.sampled_from([1, 1, 2, "1", None])},
                             optional={"models": st.dictionaries(short_text, json_values, max_size=4)
                                       | json_values}))
def test_any_json_shape_is_an_index_or_one_line_naming_the_file(document):
    try:
        parsed = parse_index(json.dumps(document).encode(), WHERE)
    except ArtifactError as err:
        assert_one_line_naming_the_file(err)
        return
    for name, entry in parsed.items():  # what is accepted is typed and checked
        assert is_valid_name(name) and entry.name == name and entry.path.startswith("/")
        assert isinstance(entry.copied, bool) and len(entry.family) <= 200


@settings(max_examples=fuzz_examples(200))
@given(st.dictionaries(valid_names, entries, max_size=5))
def test_an_index_written_reads_back_the_same(generated):
    generated = {name: Entry(**{**entry.__dict__, "name": name}) for name, entry in generated.items()}
    folded = {}
    for name, entry in generated.items():  # names are unique without case
        folded.setdefault(name.lower(), (name, entry))
    unique = dict(folded.values())
    assert parse_index(dump_index(unique), WHERE) == unique


def test_a_deeply_nested_or_oversized_index_is_refused_in_one_line():
    for data in (b"[" * 100_000, b'{"version": 1, "models": {}}' + b" " * (5 << 20), b"\xff\xfe",
                 b'{"version": 1, "version": 1, "models": {}}',
                 b'{"version": 1, "models": {"a": {"path": "/a"}, "A": {"path": "/b"}}}',
                 b'{"version": 1, "models": {"a": {"path": "relative"}}}',
                 b'{"version": 1, "models": {"a": {"path": "/a", "copied": "yes"}}}',
                 b'{"version": 1, "models": {"a": {"path": "/a", "verified": {"passed": 1}}}}'):
        with pytest.raises(ArtifactError) as caught:
            parse_index(data, WHERE)
        assert_one_line_naming_the_file(caught.value)


@settings(max_examples=fuzz_examples(500))
@given(st.text(max_size=80))
def test_a_name_is_accepted_only_when_it_cannot_be_a_path_or_a_terminal_trick(text):
    try:
        assert check_name(text) == text
    except UsageError as err:
        assert "\n" not in str(err) and len(str(err)) < 400
        return
    assert 1 <= len(text) <= MAX_NAME and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text)
    assert "/" not in text and "\\" not in text and text not in (".", "..")
    assert all(ch.isprintable() and not ch.isspace() for ch in text)


@settings(max_examples=fuzz_examples(300))
@given(st.text(min_size=1, max_size=120))
def test_a_default_name_from_any_file_name_is_valid(stem):
    name = name_from_path(Path("/models") / stem.replace("/", "_").replace("\x00", "_"))
    assert is_valid_name(name)
