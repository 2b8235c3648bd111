"""Fuzzing manifests: every mutated edgelm.json ends in a working load or a one-line EdgelmError.

The seed is the tiny LSTM artifact of conftest.py (its manifest in schema 2, and rewritten in
schema 1's shape). Each example applies a few mutations, field by field: a value replaced by
another type, range or nesting; a key deleted or added; a file name turned into a path that
leaves the folder; a listed file replaced by a link out of the folder or a link loop. The
artifact is then loaded and, when that works, generates a few tokens. Anything but success or
an EdgelmError fails the test, and so does a file opened outside the artifact folder (the
runtime's openers are watched) or a file outside the example's folder that changed.

Short profile (the default, for CI): `pytest tests/test_fuzz_manifest.py`.
Long profile, >= 2000 examples per test (a few minutes, niced):
    EDGELM_FUZZ=long nice -n 10 .venv/bin/python -m pytest tests/test_fuzz_manifest.py -q
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_contract import v1_recurrent  # noqa: E402

import edgelm  # noqa: E402
from conftest import fuzz_examples  # noqa: E402
from edgelm.artifact import MANIFEST_NAME, Manifest  # noqa: E402
from edgelm.errors import ArtifactError, EdgelmError  # noqa: E402
from edgelm.runtime import loading  # noqa: E402

EXAMPLE_DEADLINE_S = 20.0  # a tiny model loads in well under a second; far more is a runaway
HOSTILE_NAMES = ["../../etc/passwd", "/etc/passwd", "../outside.json", "..", ".", "", "model.onnx", "tokenizer.json",
                 MANIFEST_NAME, "sub/model.onnx", "C:\\outside.json", "a\x00b", "\x1b[2J", "link.json", "loop.json"]
WORDS = ["rnn", "lstm", "gpt2", "bert", "llama", "onnx", "gguf", "text-generation", "embed", "fill-mask", "classify",
         "mean", "cls", "input_ids", "logits", "h0", "hn", "c0", "cn"]  # values the code branches on
INTERESTING_INTS = [0, 1, 2, 3, 31, 32, 33, 64, 127, 128, 4096, -1, 2**31, 2**63, 2**64, 2**80, -(2**63)]
leaves = st.one_of(
    st.none(), st.booleans(), st.sampled_from(INTERESTING_INTS), st.integers(),
    st.sampled_from([0.0, -0.0, 1.5, math.nan, math.inf, -math.inf, 5e-324]), st.floats(),
    st.sampled_from(HOSTILE_NAMES), st.sampled_from(WORDS), st.text(max_size=12),
)
json_values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def _paths(value, prefix=()):
    """Every path (a tuple of keys and indices) into a JSON value, containers included."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _container(data, path):
    for key in path[:-1]:
        data = data[key]
    return data


@st.composite
def mutations(draw, data: dict):
    """One change to a manifest dict (in place) or to the folder; returns a description for shrinking."""
    kind = draw(st.sampled_from(["set", "set", "set", "delete", "add", "wrap", "rename_file", "link", "version"]))
    paths = [p for p in _paths(data) if p]
    path = draw(st.sampled_from(paths))
    parent = _container(data, path)
    if kind == "set":
        parent[path[-1]] = draw(json_values)
    elif kind == "delete":
        del parent[path[-1]]
    elif kind == "add":
        target = draw(st.sampled_from([p for p in _paths(data) if isinstance(_container(data, (*p, 0)), dict)]
                                      or [()]))
        container = _container(data, (*target, 0))
        container[draw(st.text(max_size=12) | st.sampled_from(HOSTILE_NAMES))] = draw(json_values)
    elif kind == "wrap":
        value = parent[path[-1]]
        parent[path[-1]] = draw(st.sampled_from([[value], {"value": value}, [[value]]]))
    elif kind == "rename_file":  # a manifest-listed file moved to a hostile name, or a model/tokenizer field
        name = draw(st.sampled_from(HOSTILE_NAMES))
        files = data.get("files") if isinstance(data.get("files"), dict) else {}
        if files and draw(st.booleans()):
            files[name] = files.pop(draw(st.sampled_from(sorted(files))))
        section = draw(st.sampled_from(["model", "tokenizer"]))
        if isinstance(data.get(section), dict):
            data[section]["file"] = name
    elif kind == "link":
        return ("link", draw(st.sampled_from(["model.onnx", "tokenizer.json", "link.json", "loop.json"])),
                draw(st.sampled_from(["outside", "loop", "inside", "dangling"])))
    elif kind == "version":
        data["schema_version"] = draw(st.sampled_from([1, 2, 3, 0, "2", 2.0, None, True]))
    return (kind, path)


def _link(folder: Path, name: str, target: str) -> None:
    path = folder / name
    if path.exists() or path.is_symlink():
        path.unlink()
    destination = {"outside": folder.parent / "outside.json", "loop": folder / name,
                   "inside": folder / "tokenizer.json", "dangling": folder / "gone"}[target]
    path.symlink_to(destination)


class OpenWatch:
    """Records every model and tokenizer file the runtime opens; each must lie inside the artifact."""

    def __init__(self, monkeypatch, folder: Path):
        self.root = folder.resolve()
        self.opened: list[Path] = []
        for name in ("onnx_session", "load_tokenizer"):
            original = getattr(loading, name)
            monkeypatch.setattr(loading, name, self._watch(original))

    def _watch(self, original):
        def opener(path, *args, **kwargs):
            resolved = Path(path).resolve()
            assert resolved == self.root or self.root in resolved.parents, f"opened {path} -> {resolved}"
            self.opened.append(resolved)
            return original(path, *args, **kwargs)
        return opener


@pytest.fixture(scope="module")
def seed(lstm_artifact):
    files = {p.name: p.read_bytes() for p in lstm_artifact.iterdir() if p.name != MANIFEST_NAME}
    return json.loads((lstm_artifact / MANIFEST_NAME).read_text()), files


def _run_example(seed, data: dict, changes: list) -> None:
    manifest, files = seed
    with tempfile.TemporaryDirectory() as work, pytest.MonkeyPatch.context() as monkeypatch:
        work = Path(work)
        folder = work / "art"
        folder.mkdir()
        for name, content in files.items():
            (folder / name).write_bytes(content)
        outside = work / "outside.json"  # a valid tokenizer: a runtime that followed a path here would load it
        outside.write_bytes(files["tokenizer.json"])
        for change in changes:
            if change[0] == "link":
                _link(folder, change[1], change[2])
        (folder / MANIFEST_NAME).write_text(json.dumps(data))
        watch = OpenWatch(monkeypatch, folder)
        started = time.monotonic()
        try:
            with edgelm.load(folder, threads=1) as model:
                model.generate("The ", max_tokens=3, temperature=0)
        except EdgelmError as err:
            message = str(err)
            assert message and "\n" not in message, message  # one line
        assert time.monotonic() - started < EXAMPLE_DEADLINE_S
        assert outside.read_bytes() == files["tokenizer.json"]
        assert sorted(p.name for p in work.iterdir()) == ["art", "outside.json"]
        assert all(p.parent == folder.resolve() for p in watch.opened)


@settings(max_examples=fuzz_examples(ci=200))
@given(st.data())
def test_mutated_manifests_load_or_fail_in_one_line(seed, data):
    manifest = json.loads(json.dumps(seed[0]))
    if data.draw(st.booleans(), label="schema 1 shape"):
        manifest = v1_recurrent(manifest)
    changes = [data.draw(mutations(manifest), label="mutation") for _ in range(data.draw(st.integers(1, 4)))]
    _run_example(seed, manifest, changes)


@settings(max_examples=fuzz_examples(ci=300))
@given(json_values, st.sampled_from(["tokenizer", "generation", "model", "source", "files", "validation", None]),
       st.sampled_from([1, 2]), st.sampled_from(["lstm", "gpt2", "bert", "llama", "other"]),
       st.sampled_from(["onnx", "gguf"]), st.sampled_from(["text-generation", "embed", "fill-mask", "classify"]))
def test_any_json_in_any_section_parses_or_is_an_artifact_error(seed, value, section, version, family, fmt, task):
    # every model kind's section class and every task's requirements, on the same real sections
    data = {**json.loads(json.dumps(seed[0])), "schema_version": version, "family": family, "format": fmt,
            "task": task}
    if section is None:
        data = value if not isinstance(value, dict) else {**value, "schema_version": version}
    else:
        data[section] = value
    if not isinstance(data, dict):
        return  # read_manifest refuses a non-object before Manifest sees it
    try:
        manifest = Manifest.from_dict(data, where="edgelm.json")
    except ArtifactError as err:
        assert str(err).startswith("edgelm.json: ") and "\n" not in str(err)
    else:
        again = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))  # what edgelm writes, it reads
        assert json.dumps(again.to_dict()) == json.dumps(manifest.to_dict())
