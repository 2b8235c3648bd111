"""The typed manifest (schema 2): field checks, schema 1 migration, and load-time cross-checks."""

from __future__ import annotations

import json
import re
import shutil

import pytest

import edgelm
from edgelm.artifact import MANIFEST_NAME, Manifest, read_manifest, sha256_of
from edgelm.contract import EncoderModel, GgufModel, KvDecoderModel, RecurrentModel, TokenizerSection
from edgelm.errors import ArtifactError


@pytest.fixture
def art(lstm_artifact, tmp_path):
    """A private copy of the tiny LSTM artifact, free to edit."""
    return shutil.copytree(lstm_artifact, tmp_path / "art")


def edit(folder, change):
    data = json.loads((folder / MANIFEST_NAME).read_text())
    change(data)
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    return data


def test_exporters_write_schema_2_with_typed_sections(lstm_artifact):
    manifest = read_manifest(lstm_artifact, verify=True)
    assert manifest.schema_version == 2
    assert isinstance(manifest.model, RecurrentModel) and manifest.model.inputs == ("input_ids", "h0", "c0")
    assert manifest.model.context_length is None  # the state carries any length
    assert set(manifest.source.sha256) == {"model.safetensors"}  # always {file: digest}
    assert manifest.tokenizer.file == "tokenizer.json" and manifest.tokenizer.vocab_size > 10


@pytest.mark.parametrize(("section", "field", "value", "message"), [
    ("tokenizer", "eos_id", "x", "tokenizer.eos_id must be an integer >= 0, got 'x'"),
    ("tokenizer", "eos_id", True, "tokenizer.eos_id must be an integer >= 0, got True"),  # a bool is not an id
    ("tokenizer", "bos_id", -1, "tokenizer.bos_id must be an integer >= 0, got -1"),
    ("tokenizer", "lowercase", 1, "tokenizer.lowercase must be true or false, got 1"),
    ("generation", "stop", "\n", r"generation.stop must be a list, got '\\n'"),
    ("generation", "stop", ["ok", 3], r"generation.stop\[1\] must be a string, got 3"),
    ("generation", "add_bos", None, "generation.add_bos must be true or false, got None"),
    ("model", "num_layers", 0, "model.num_layers must be an integer >= 1, got 0"),
    ("model", "num_layers", 2.0, "model.num_layers must be an integer >= 1, got 2.0"),
    ("model", "inputs", {"a": 1}, "model.inputs must be a list"),
    ("source", "sha256", ["abc"], "source.sha256 must be an object"),
    ("source", "training", "long", "source.training must be an object"),
])
def test_a_wrong_field_is_named(art, section, field, value, message):
    edit(art, lambda d: d[section].__setitem__(field, value))
    with pytest.raises(ArtifactError, match=rf"edgelm.json: {message}"):
        read_manifest(art)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.__setitem__("model", [1, 2]), "model must be an object"),
    (lambda d: d["model"].pop("file"), "model.file is missing"),
    (lambda d: d["model"].__setitem__("inputs", None), "model.inputs is missing"),
    (lambda d: d.__setitem__("family", 3), "family must be a string"),
    (lambda d: d.__setitem__("validation", [{"name": "x"}]), r"validation\[0\].value is missing"),
    (lambda d: d["files"]["model.onnx"].__setitem__("size", "12"), "files.model.onnx.size must be an integer"),
    (lambda d: d.__setitem__("schema_version", True), "unknown schema_version True"),
])
def test_wrong_shapes_and_missing_fields_are_named(art, change, message):
    edit(art, change)
    with pytest.raises(ArtifactError, match=message):
        read_manifest(art)


def test_unknown_keys_are_ignored(art):
    edit(art, lambda d: d["model"].__setitem__("added_by_a_newer_edgelm", [1]))
    assert read_manifest(art).model.num_layers == 2


def test_sections_are_frozen_and_checked_when_built():
    section = TokenizerSection(file="tokenizer.json", notes=["a"])
    assert section.notes == ("a",)  # lists become tuples
    with pytest.raises(AttributeError):
        section.eos_id = 3
    with pytest.raises(ArtifactError, match="tokenizer.vocab_size must be an integer >= 1"):
        TokenizerSection(file="t.json", vocab_size=0)


# -- schema 1 ------------------------------------------------------------------------------------
def v1_recurrent(data: dict) -> dict:
    """The manifest the schema 1 recurrent exporter wrote for the same artifact."""
    tok, model = data["tokenizer"], data["model"]
    return {**data, "schema_version": 1,
            "tokenizer": {"kind": tok["kind"], "file": tok["file"], "vocab_size": tok["vocab_size"],
                          "unk_id": tok["unk_id"]},
            "generation": {"bos_id": None, "eos_id": None, "pad_id": None, "context_length": None,
                           "chat_template": None, "stop": []},
            "model": {k: model[k] for k in ("file", "inputs", "outputs", "num_layers", "hidden_size", "vocab_size")},
            "source": {"path": data["source"]["path"], "revision": None,
                       "sha256": data["source"]["sha256"]["model.safetensors"], "training": data["source"]["training"]}}


def test_a_schema_1_artifact_still_loads_and_generates_the_same(art, lstm_artifact):
    edit(art, lambda d: d.update(v1_recurrent(d)))
    manifest = read_manifest(art, verify=True)
    assert manifest.schema_version == 2 and manifest.source.sha256["model.safetensors"]
    with edgelm.load(art) as old, edgelm.load(lstm_artifact) as new:
        assert old.generate("The ", max_tokens=12, temperature=0) == new.generate("The ", max_tokens=12, temperature=0)


def test_schema_1_gpt2_bert_and_gguf_sections_migrate():
    common = {"schema_version": 1, "task": "text-generation", "format": "onnx", "quant": "none", "files": {}}
    gpt2 = Manifest.from_dict({**common, "family": "gpt2",
                               "tokenizer": {"kind": "byte-level-bpe", "file": "tokenizer.json", "vocab_size": 50},
                               "generation": {"context_length": 128, "add_bos": False, "chat_template": None,
                                              "stop": [], "eos_id": 7, "bos_id": 7, "pad_id": 7},
                               "model": {"file": "model.onnx", "inputs": ["input_ids"], "outputs": ["logits"],
                                         "num_layers": 2, "num_heads": 2, "head_dim": 32, "hidden_size": 64,
                                         "vocab_size": 50},
                               "source": {"path": "/x", "revision": None, "sha256": {"model.safetensors": "ab"},
                                          "architecture": "GPT2LMHeadModel"}})
    assert isinstance(gpt2.model, KvDecoderModel) and gpt2.model.context_length == 128
    assert gpt2.tokenizer.pad_id == 7 and gpt2.model.past_names[1] == "past_key_values.0.value"
    assert gpt2.source.architectures == ("GPT2LMHeadModel",)
    bert = Manifest.from_dict({**common, "family": "bert", "task": "embed",
                               "tokenizer": {"file": "tokenizer.json", "max_length": 256, "lowercase": False,
                                             "mask_token": "[MASK]", "mask_id": 4, "pad_token": "[PAD]",
                                             "pad_id": 0, "vocab_size": 30},
                               "model": {"file": "model.onnx", "hidden_size": 32, "num_layers": 2, "vocab_size": 30,
                                         "pooling": ["mean"], "normalize": True, "dim": 32,
                                         "sentence_transformers": True},
                               "source": {"path": "/x", "revision": None, "sha256": "cd", "architectures": None}})
    assert isinstance(bert.model, EncoderModel) and bert.model.context_length == 256 and bert.tokenizer.pad_id == 0
    assert bert.source.sha256 == {"model.safetensors": "cd"} and bert.source.architectures == ()
    llama = Manifest.from_dict({**common, "family": "llama", "format": "gguf", "quant": "q8_0",
                                "tokenizer": {"kind": "spm", "file": "model.gguf", "pre": None, "vocab_size": 99,
                                              "notes": []},
                                "generation": {"bos_id": 1, "eos_id": 2, "pad_id": None, "add_bos": True,
                                               "context_length": 256, "chat_template": "{{x}}", "stop": ["</s>"],
                                               "stop_ids": [2]},
                                "model": {"file": "model.gguf", "architecture": "LlamaForCausalLM", "n_layers": 2,
                                          "n_heads": 4, "n_kv_heads": 2, "hidden_size": 64, "head_dim": 16,
                                          "vocab_size": 99, "tied_embeddings": False, "rope_scaling": None,
                                          "tensor_types": {"Q8_0": 14}, "fallbacks": [], "fallback_count": 0},
                                "source": {"path": "/x", "revision": None, "weights": {"model.safetensors": "ef"}}})
    assert isinstance(llama.model, GgufModel)
    assert (llama.model.num_layers, llama.model.num_heads, llama.model.num_kv_heads) == (2, 4, 2)
    assert llama.model.architecture == "llama" and llama.source.architectures == ("LlamaForCausalLM",)
    assert llama.tokenizer.bos_id == 1 and llama.generation.stop_ids == (2,) and llama.model.context_length == 256
    assert llama.source.sha256 == {"model.safetensors": "ef"}


# -- cross-checks against the files --------------------------------------------------------------
@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["model"].__setitem__("num_layers", 3), "model.num_layers is 3, but the graph's h0 shape says 2"),
    (lambda d: d["model"].__setitem__("hidden_size", 31), "model.hidden_size is 31, but the graph"),
    (lambda d: d["model"].__setitem__("outputs", ["logits", "hn", "zz"]), "model.outputs .* do not match the graph"),
    (lambda d: d["tokenizer"].__setitem__("vocab_size", 7), "tokenizer.vocab_size is 7, but the tokenizer file has"),
    (lambda d: d["tokenizer"].__setitem__("eos_id", 100000), "tokenizer.eos_id 100000 is outside the vocabulary"),
    (lambda d: d["generation"].__setitem__("stop_ids", [0, 99999]),
     r"generation.stop_ids\[1\] 99999 is outside the vocabulary"),
])
def test_the_manifest_must_agree_with_the_files(art, change, message):
    edit(art, change)
    with pytest.raises(ArtifactError, match=message):
        edgelm.load(art)


def test_a_model_file_the_manifest_does_not_list_is_never_opened(art):
    shutil.copy(art / "model.onnx", art / "other.onnx")
    edit(art, lambda d: d["model"].__setitem__("file", "other.onnx"))
    with pytest.raises(ArtifactError, match="model.file 'other.onnx' is not among the files it lists"):
        edgelm.load(art)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/../../x", "C:\\Windows\\win.ini"])
def test_files_outside_the_folder_are_refused(art, name):
    def point(d):
        d["files"][name] = d["files"].pop("tokenizer.json")
        d["tokenizer"]["file"] = name

    edit(art, point)
    with pytest.raises(ArtifactError, match="outside the artifact"):
        edgelm.load(art)


def test_a_listed_file_that_links_out_of_the_folder_is_refused(art, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.copy(art / "tokenizer.json", outside)
    (art / "tokenizer.json").unlink()
    (art / "tokenizer.json").symlink_to(outside)  # same size and hash: only the link is wrong
    with pytest.raises(ArtifactError, match="tokenizer.json: file listed in the manifest links outside the folder"):
        edgelm.load(art)


def test_verify_hashes_every_listed_file(art):
    text = (art / "tokenizer.json").read_bytes()
    (art / "tokenizer.json").write_bytes(text.replace(b"<unk>", b"<unK>"))  # same size
    edgelm.load(art).close()  # the fast check passes: sizes match
    with pytest.raises(ArtifactError, match="tokenizer.json: sha256 does not match"):
        edgelm.load(art, verify=True)


def _with_external_data(art, location: str):
    """Rewrite model.onnx so its first initializer lives in an external file at `location`."""
    import onnx

    model = onnx.load(str(art / "model.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data, tensor.raw_data = tensor.raw_data, b""
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = tensor.external_data.add()  # by hand: onnx's helper refuses '..' itself
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL
    (art / "model.onnx").write_bytes(model.SerializeToString())  # onnx.save would refuse '..' too
    return data


def _relist(art):
    def listing(d):
        for name in list(d["files"]):
            if (art / name).is_file():
                d["files"][name] = {"size": (art / name).stat().st_size, "sha256": sha256_of(art / name)}
    return listing


@pytest.mark.parametrize("location", ["weights.bin", "../secret.bin"])  # beside the graph; outside the artifact
def test_external_data_must_be_a_listed_file(art, location):
    data = _with_external_data(art, location)
    (art / location).write_bytes(data)
    edit(art, _relist(art))
    with pytest.raises(ArtifactError, match=f"external data from {re.escape(repr(location))}, which is not a file "
                                            "the manifest lists"):
        edgelm.load(art)
    if location == "weights.bin":  # once listed it loads, and --verify covers it
        edit(art, lambda d: d["files"].__setitem__(location, {"size": len(data), "sha256": sha256_of(art / location)}))
        with edgelm.load(art, verify=True) as model:
            assert model.generate("The ", max_tokens=3, temperature=0)


def test_keys_from_the_file_are_escaped_in_field_names(art):
    edit(art, lambda d: d["model"].__setitem__("rope", 1) or d["files"].__setitem__("\x1b[2J", []))
    with pytest.raises(ArtifactError, match=r"files\.'\\x1b\[2J' must be an object, got \[\]"):
        read_manifest(art)


def test_a_schema_1_layer_count_cannot_make_the_migration_run_away():
    data = {"schema_version": 1, "family": "gpt2", "task": "text-generation", "format": "onnx", "quant": "none",
            "tokenizer": {"file": "tokenizer.json"}, "generation": {"context_length": 8},
            "model": {"file": "model.onnx", "inputs": ["input_ids"], "outputs": ["logits"], "num_layers": 2**80,
                      "num_heads": 1, "head_dim": 1}}
    with pytest.raises(ArtifactError, match="model.past_names is missing"):
        Manifest.from_dict(data, where="edgelm.json")


def test_onnx_refs_reads_initializer_shapes_like_onnx(lstm_artifact):
    import onnx

    from edgelm.runtime.ort.onnx_refs import read_refs

    expected = {t.name: tuple(t.dims) for t in onnx.load(str(lstm_artifact / "model.onnx")).graph.initializer}
    refs = read_refs(lstm_artifact / "model.onnx")
    assert refs.initializers == expected and refs.locations == set()


@pytest.mark.parametrize("damage", [lambda b: b[:-7], lambda b: b"\x0a\xff\xff\xff\xff\x0f" + b, lambda b: b"\x0b" + b])
def test_onnx_bytes_that_do_not_parse_are_one_line(art, damage):
    from edgelm.runtime.ort.onnx_refs import read_refs

    (art / "model.onnx").write_bytes(damage((art / "model.onnx").read_bytes()))
    with pytest.raises(ArtifactError, match="model.onnx: not a valid ONNX file"):
        read_refs(art / "model.onnx")
