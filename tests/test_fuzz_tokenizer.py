"""Fuzzing tokenizer.json: every mutated file loads or fails with one ArtifactError line.

The seed is a small byte-level BPE tokenizer (a llama3-style split regex, added special tokens),
trained here in a fraction of a second. Mutations replace any node of its JSON with a value of
another type, give the vocabulary and added tokens hostile ids, break merges, put invalid or
pathological regexes in the pre-tokenizer, nest sequences deeply, truncate the text or make it
invalid UTF-8, and set padding and truncation. A file that loads must then encode and decode
through edgelm's detokeniser without anything but an EdgelmError (the tokenizers library panics
with a BaseException that `except Exception` misses; edgelm catches it where it loads the file).

Short profile: `pytest tests/test_fuzz_tokenizer.py`; long profile (2000 examples):
    EDGELM_FUZZ=long nice -n 10 .venv/bin/python -m pytest tests/test_fuzz_tokenizer.py -q -s
"""

from __future__ import annotations

import copy
import json
import time

import pytest

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import fuzz_examples  # noqa: E402
from edgelm.errors import ArtifactError, EdgelmError  # noqa: E402
from edgelm.runtime.core.text import IncrementalDetokenizer  # noqa: E402
from edgelm.runtime.ort.tokenizer import load_tokenizer  # noqa: E402
from llama_fixtures import LLAMA3_PATTERN  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog. It's 2024: caf\u00e9 \u4f60\u597d!\n" * 20
SPECIALS = ["<|begin|>", "<|end|>"]
HOSTILE_REGEXES = ["(", "[", "\\", "a{99999999}", "(?<=a+)b", "(?P<x>a)(?P<x>b)", "\\p{Nonsense}", "", "(a*)*$",
                   "[^\\s\\S]", "(?i:", "\\u{110000}", "x" * 5000]
DEADLINE_S = 10.0  # per example: a tiny tokenizer loads in milliseconds; seconds would mean a runaway
HOSTILE_IDS = [-1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 10**30, 1.5, "7", None, True]


@pytest.fixture(scope="module")
def seed() -> dict:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(SPECIALS)
    return json.loads(tok.to_str())


def paths_of(node, prefix=()):
    """Every (path, value) in a JSON tree, to a depth of 40 (a deeply nested mutation goes deeper)."""
    yield prefix, node
    if len(prefix) >= 40:
        return
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths_of(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node[:50]):  # the vocabulary's length is not interesting here
            yield from paths_of(value, (*prefix, i))


def set_at(tree, path, value):
    node = tree
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)


def mutate(draw, tree: dict) -> None:
    kind = draw(st.sampled_from(["node", "node", "vocab_id", "added", "merges", "regex", "nesting", "padding"]))
    if kind == "node":
        paths = [p for p, _ in paths_of(tree) if p]
        set_at(tree, draw(st.sampled_from(paths)), draw(json_values))
    elif kind == "vocab_id" and isinstance(tree.get("model", {}).get("vocab"), dict) and tree["model"]["vocab"]:
        token = draw(st.sampled_from(sorted(tree["model"]["vocab"])[:100]))
        tree["model"]["vocab"][token] = draw(st.sampled_from(HOSTILE_IDS))
    elif kind == "added" and tree.get("added_tokens"):
        entry = draw(st.sampled_from(tree["added_tokens"]))
        entry[draw(st.sampled_from(["id", "content", "special", "normalized"]))] = draw(
            st.one_of(st.sampled_from(HOSTILE_IDS), json_values))
    elif kind == "merges" and tree.get("model", {}).get("merges"):
        merges = tree["model"]["merges"]
        i = draw(st.integers(0, len(merges) - 1))
        merges[i] = draw(st.sampled_from([["zzz", "qqq"], "a", ["a"], "a b c", ["", ""], 7, ["Ġ", "Ġ"], merges[0]]))
    elif kind == "regex":
        tree["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {"Regex": draw(st.sampled_from(HOSTILE_REGEXES))}
    elif kind == "nesting":
        node = tree["pre_tokenizer"]
        for _ in range(draw(st.sampled_from([2, 50, 200, 2000]))):
            node = {"type": "Sequence", "pretokenizers": [node]}
        tree["pre_tokenizer"] = node
    else:
        tree["padding"] = {"strategy": {"Fixed": draw(st.integers(0, 64))}, "direction": "Left",
                           "pad_to_multiple_of": None, "pad_id": draw(st.sampled_from(HOSTILE_IDS[:6])),
                           "pad_type_id": 0, "pad_token": "<|end|>"}
        tree["truncation"] = {"direction": "Right", "max_length": draw(st.integers(0, 4)), "strategy": "LongestFirst",
                              "stride": 0}


def encode_text(tree: dict, draw) -> bytes:
    try:
        text = json.dumps(tree).encode()
    except (RecursionError, ValueError):
        text = b"{"
    form = draw(st.sampled_from(["as is", "as is", "as is", "truncated", "not utf-8"]))
    if form == "truncated":
        return text[: draw(st.integers(0, len(text)))]
    if form == "not utf-8":
        at = draw(st.integers(0, len(text)))
        return text[:at] + b"\xff\xfe\xc3" + text[at:]
    return text


def use(tokenizer) -> None:
    """What a generator does with a loaded tokenizer: encode a prompt, detokenise ids."""
    ids = tokenizer.encode("hello world, caf\u00e9!", add_special_tokens=False).ids
    detok = IncrementalDetokenizer(tokenizer, ids)
    for token in ids[:5]:
        detok.push(token)
    detok.flush()


def test_mutated_tokenizer_files_load_or_fail_in_one_line(seed, tmp_path):
    counts = {"loaded": 0, "refused": 0}

    @settings(max_examples=fuzz_examples(ci=150))
    @given(st.data())
    def run(data):
        tree = copy.deepcopy(seed)
        for _ in range(data.draw(st.integers(1, 2))):
            mutate(data.draw, tree)
        path = tmp_path / "tokenizer.json"
        path.write_bytes(encode_text(tree, data.draw))
        started = time.monotonic()
        try:
            tokenizer = load_tokenizer(path)
        except ArtifactError as err:
            assert "\n" not in str(err)
            counts["refused"] += 1
            return
        finally:
            assert time.monotonic() - started < DEADLINE_S, "loading ran past its deadline"
        try:
            use(tokenizer)
        except EdgelmError as err:
            assert "\n" not in str(err)
        assert time.monotonic() - started < DEADLINE_S, "loading and using ran past their deadline"
        counts["loaded"] += 1

    run()
    print(f"tokenizer.json: {counts}")
    assert counts["loaded"] and counts["refused"]


@pytest.mark.parametrize("pad_id", [0, 2**32 - 1])
def test_padding_and_truncation_in_the_file_never_change_ids(seed, tmp_path, pad_id):
    plain, padded = tmp_path / "plain.json", tmp_path / "padded.json"
    plain.write_text(json.dumps(seed))
    tree = copy.deepcopy(seed)
    tree["padding"] = {"strategy": {"Fixed": 64}, "direction": "Left", "pad_to_multiple_of": None,
                       "pad_id": pad_id, "pad_type_id": 0, "pad_token": "<|end|>"}
    tree["truncation"] = {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0}
    padded.write_text(json.dumps(tree))
    text = "The quick brown fox jumps over the lazy dog, " * 3
    want = load_tokenizer(plain).encode(text, add_special_tokens=False).ids
    assert len(want) > 2
    got = load_tokenizer(padded)
    assert got.encode(text, add_special_tokens=False).ids == want
    assert got.padding is None and got.truncation is None
