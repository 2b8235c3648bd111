"""Fuzzing reference files: every hostile reference.npz ends in checks or a one-line ArtifactError.

Seeds: the reference files of the tiny LSTM and GPT-2 artifacts (conftest.py) and of a tiny Qwen2
F32 GGUF (its top-k, held-out log-probs and budgeted full rows). Each example is
the file with its bytes mutated, a zip of hostile `.npy` members (object and structured dtypes,
shapes claiming far more than the bytes, names outside the schema), or the file with one array
replaced by another of a random type and shape. The reference is then loaded and run through the
runtime's checks, as `edgelm verify` does; anything but success or an ArtifactError fails.

Long profile: EDGELM_FUZZ=long nice -n 10 .venv/bin/python -m pytest tests/test_fuzz_reference.py -q
"""

from __future__ import annotations

import io
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import fuzz_examples  # noqa: E402
from edgelm.artifact import read_manifest  # noqa: E402
from edgelm.errors import ArtifactError  # noqa: E402
from edgelm.reference import reference_checks  # noqa: E402
from edgelm.reference.store import REFERENCE_NAME  # noqa: E402
from edgelm.runtime.device import RuntimeOptions  # noqa: E402

DESCRS = ["<f4", "<f8", ">f4", "<i8", "<i4", "|u1", "|b1", "<c8", "<U8", "|S4", "|O", "<M8[s]", "[('a', '<f4')]",
          "('<f4', (2,))", "<f2", "not a dtype"]
NAMES = ["logits", "ids", "chunks", "states", "held_out", "held_out_top1", "prompts", "prompt_lengths", "texts",
         "outputs", "held_out_perplexity_fp32", "top_ids", "top_logp", "held_out_logp", "logits_positions",
         "held_out_top_ids", "held_out_top_logp", "../evil", "x" * 80, "", "logits.npy"]


def npy_bytes(descr: str, fortran: bool, shape: tuple, body: bytes, version: int = 1) -> bytes:
    """A .npy member written by hand, so its header may claim anything."""
    header = f"{{'descr': {descr!r}, 'fortran_order': {fortran}, 'shape': {shape!r}, }}".encode("latin1")
    if descr.startswith(("[", "(")):  # structured and sub-array dtypes are written unquoted
        header = header.replace(repr(descr).encode(), descr.encode())
    length_format = "<H" if version == 1 else "<I"
    prefix = 10 if version == 1 else 12
    pad = (-(prefix + len(header) + 1)) % 64
    header += b" " * pad + b"\n"
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack(length_format, len(header)) + header + body


shapes = st.lists(st.integers(-2, 2**40).filter(lambda n: n < 5 or n > 2**20) | st.integers(0, 6), max_size=4)
hostile_members = st.lists(
    st.tuples(st.sampled_from(NAMES), st.sampled_from(DESCRS), st.booleans(), shapes.map(tuple),
              st.binary(max_size=96), st.sampled_from([1, 2, 3])),
    min_size=1, max_size=6)
random_arrays = st.tuples(
    st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.uint8, np.bool_, np.complex64, np.str_]),
    st.lists(st.integers(0, 5), max_size=4), st.integers(0, 2**32 - 1))


@pytest.fixture(scope="session")
def qwen2_f32(tmp_path_factory) -> Path:
    from gguf_fixtures import build_tiny_qwen2

    from conftest import export_to

    root = tmp_path_factory.mktemp("fuzz-qwen2")
    return export_to(build_tiny_qwen2(root / "source"), root / "f32", quant="f32")


@pytest.fixture(scope="session")
def seeds(lstm_artifact, gpt2_int8, qwen2_f32) -> list[tuple[Path, object, bytes]]:
    return [(folder, read_manifest(folder), (folder / REFERENCE_NAME).read_bytes())
            for folder in (lstm_artifact, gpt2_int8, qwen2_f32)]


SEEDS = 3


def checks_of(seed, data: bytes) -> list:
    """The seed's artifact with `data` as its reference file, run as verify runs it."""
    folder, manifest, _ = seed
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(shutil.copytree(folder, Path(scratch) / "artifact"))
        (copy / REFERENCE_NAME).write_bytes(data)
        return reference_checks(copy, manifest, RuntimeOptions(threads=1))


def checks_with(seed, arrays: dict[str, np.ndarray]) -> list:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return checks_of(seed, buffer.getvalue())


def run_reference(seed, data: bytes) -> None:
    """The reference set with `data` as its file: checks, or a one-line ArtifactError."""
    try:
        checks = checks_of(seed, data)
    except ArtifactError as err:
        assert "\n" not in str(err)
        return
    assert checks and all(isinstance(c.passed, bool) for c in checks)


def mutate(data: bytes, draw) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "zero"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "flip" and out:
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif out:
            out[at : at + 4] = b"\x00\x00\x00\x00"
    return bytes(out)


@settings(max_examples=fuzz_examples(ci=150))
@given(st.data())
def test_mutated_reference_bytes_are_checks_or_one_line_errors(seeds, data):
    seed = seeds[data.draw(st.integers(0, len(seeds) - 1))]
    run_reference(seed, mutate(seed[2], data.draw))


@settings(max_examples=fuzz_examples(ci=150))
@given(st.integers(0, SEEDS - 1), hostile_members)
def test_hostile_npy_members_are_one_line_errors(seeds, which, members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, descr, fortran, shape, body, version in members:
            archive.writestr(f"{name}.npy", npy_bytes(descr, fortran, shape, body, version))
    run_reference(seeds[which], buffer.getvalue())


@settings(max_examples=fuzz_examples(ci=100))
@given(st.integers(0, SEEDS - 1), st.data(), random_arrays)
def test_an_array_of_another_type_or_shape_is_one_line_error(seeds, which, data, spec):
    dtype, shape, seed_value = spec
    folder, manifest, original = seeds[which]
    with np.load(io.BytesIO(original), allow_pickle=False) as loaded:
        arrays = {key: loaded[key] for key in loaded.files}
    name = data.draw(st.sampled_from(sorted(arrays)))
    values = np.random.default_rng(seed_value).integers(-3, 1000, size=shape)
    arrays[name] = values.astype(dtype)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    run_reference(seeds[which], buffer.getvalue())


def test_a_huge_claimed_shape_is_refused_before_allocating(seeds):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("logits.npy", npy_bytes("<f4", False, (2**40, 2**20), b"\x00" * 16))
    with pytest.raises(ArtifactError, match="needs"):
        checks_of(seeds[0], buffer.getvalue())


def loaded(seed) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(seed[2]), allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _swap_first_two(ids):
    ids = ids.copy()
    ids[:, [0, 1]] = ids[:, [1, 0]]
    return ids


TOP_K_ATTACKS = [  # (array, change, words of the error): values a schema of kinds and ranks lets through
    ("top_ids", lambda a: np.where(a == a[0, 0], a[0, 1], a), "twice"),
    ("top_ids", lambda a: a + 10_000, "outside the vocabulary"),
    ("top_ids", lambda a: a[:, :1], "tokens per position"),
    ("top_ids", lambda a: a[:-1], "has shape"),
    ("top_logp", lambda a: a + np.float32(10.0), "not finite and <= 0"),
    ("top_logp", lambda a: np.where(a == a[0, 0], np.nan, a).astype(a.dtype), "not finite"),
    ("top_logp", lambda a: a[:, ::-1].copy(), "most-likely-first"),
    ("top_logp", lambda a: np.maximum(a, np.float32(-0.01)), "most-likely-first or holds more"),
    ("held_out_logp", lambda a: -a, "not finite and <= 0"),
    ("held_out_logp", lambda a: a[1:], "has shape"),
    ("logits_positions", lambda a: a[::-1].copy(), "increasing"),
    ("logits_positions", lambda a: a + 100_000, "increasing positions below"),
    ("logits_positions", lambda a: a[:-1], "has shape"),
    ("logits", None, "no array 'logits'"),
]


@pytest.mark.parametrize("name, change, words", TOP_K_ATTACKS)
def test_hostile_top_k_values_are_one_line_errors(seeds, name, change, words):
    arrays = loaded(seeds[2])
    if change is None:
        del arrays[name]
        arrays.pop("logits_positions")
    else:
        arrays[name] = change(arrays[name])
    with pytest.raises(ArtifactError, match=words) as caught:
        checks_with(seeds[2], arrays)
    assert "\n" not in str(caught.value)


BOUND_ATTACKS = [  # (seed, array, change, words): values that would divide by zero or run for hours
    (0, "held_out_perplexity_torch", lambda a: np.float64(np.nan), "finite perplexity"),
    (0, "held_out_perplexity_fp32", lambda a: np.float64(0.0), "finite perplexity"),  # the LSTM seed is fp32
    (1, "held_out_perplexity_fp32", lambda a: np.float64(0.0), "finite perplexity"),
    (1, "held_out_perplexity_fp32", lambda a: np.float64(np.inf), "finite perplexity"),
]


@pytest.mark.parametrize("which, name, change, words", BOUND_ATTACKS)
def test_hostile_scalars_and_lengths_are_one_line_errors(seeds, which, name, change, words):
    arrays = loaded(seeds[which])
    arrays[name] = change(arrays.get(name))
    with pytest.raises(ArtifactError, match=words) as caught:
        checks_with(seeds[which], arrays)
    assert "\n" not in str(caught.value)


def test_gguf_sequences_are_bounded_whatever_the_context(seeds, monkeypatch):
    """llama.cpp keeps n_ctx x vocab logits: a stored sequence is capped even where the context is not."""
    from edgelm.reference import gguf_decoder

    monkeypatch.setattr(gguf_decoder, "MAX_SEQUENCE", 8)
    with pytest.raises(ArtifactError, match="do not fit"):
        checks_of(seeds[2], seeds[2][2])


def test_deflated_members_cannot_expand_past_the_limit(seeds):
    """A 64 MiB file limit means nothing if its members may inflate: the members' total is bounded."""
    body = npy_bytes("<f4", False, ((40 << 20) // 4,), bytes(40 << 20))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("logits.npy", body)  # each under the limit, together over it
        archive.writestr("ids.npy", body)
    assert len(buffer.getvalue()) < 1 << 20
    with pytest.raises(ArtifactError, match="arrays hold"):
        checks_of(seeds[0], buffer.getvalue())


def test_gpt2_top1_comes_from_its_top_k(seeds):
    """The held-out top-1 is column 0 of the stored top-k: swapping the first two is a check's miss,
    or a refusal when it breaks most-likely-first order."""
    arrays = loaded(seeds[1])
    arrays["held_out_top_ids"] = _swap_first_two(arrays["held_out_top_ids"])
    checks = {c.name: c for c in checks_with(seeds[1], arrays)}
    assert not checks["top1_agreement_vs_torch"].passed
