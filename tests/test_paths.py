"""Confinement of every file a source folder or an artifact names, and the guarded source JSON reader."""

from __future__ import annotations

import json
import shutil

import pytest

from edgelm.errors import ArtifactError, UnsupportedModelError
from edgelm.export.hf_source import check_source_links, weight_files
from edgelm.paths import MAX_SOURCE_JSON_BYTES, confined, read_source_json


@pytest.fixture
def folder(tmp_path):
    inside = tmp_path / "model"
    inside.mkdir()
    (inside / "config.json").write_text("{}")
    (tmp_path / "secret.txt").write_text("not yours")
    return inside


def test_plain_names_and_links_within_the_folder_are_allowed(folder):
    (folder / "sub").mkdir()
    (folder / "sub" / "a.json").write_text("{}")
    (folder / "alias.json").symlink_to(folder / "sub" / "a.json")
    assert confined(folder, "sub/a.json", "file") == folder / "sub" / "a.json"
    assert confined(folder, "alias.json", "file") == folder / "alias.json"


@pytest.mark.parametrize("name", ["../secret.txt", "/etc/passwd", "sub/../../secret.txt", "..", ".", "",
                                  "C:\\x", "\\\\server\\share\\x", "a\x00b", 7, None, ["config.json"]])
def test_names_that_leave_the_folder_or_are_not_names_are_refused(folder, name):
    with pytest.raises(ArtifactError, match="points outside the folder|is not a file name"):
        confined(folder, name, "model.file")


def test_a_link_out_of_the_folder_is_refused_by_its_name(folder):
    (folder / "tokenizer.json").symlink_to(folder.parent / "secret.txt")
    with pytest.raises(UnsupportedModelError, match=r"model/tokenizer.json: tokenizer file links outside the folder"):
        confined(folder, "tokenizer.json", "tokenizer file", error=UnsupportedModelError)


def test_a_symlink_loop_is_one_line(folder):
    (folder / "a").symlink_to(folder / "b")
    (folder / "b").symlink_to(folder / "a")
    with pytest.raises(ArtifactError, match="cannot be resolved|links outside"):
        confined(folder, "a", "file")


def _hf_cache(tmp_path):
    """models--org--name/{blobs/<hash>, snapshots/<rev>/<file> -> ../../blobs/<hash>}, as the hub writes it."""
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (repo / "blobs" / "f00d").write_text('{"model_type": "gpt2"}')
    (snapshot / "config.json").symlink_to("../../blobs/f00d")
    return repo, snapshot


def test_hugging_face_cache_links_into_its_blobs_are_allowed_for_sources(tmp_path):
    repo, snapshot = _hf_cache(tmp_path)
    assert read_source_json(snapshot, "config.json") == {"model_type": "gpt2"}
    check_source_links(snapshot)
    with pytest.raises(ArtifactError, match="links outside"):  # an artifact never gets the exception
        confined(snapshot, "config.json", "file")


def test_hugging_face_cache_links_must_stay_inside_that_cache(tmp_path):
    repo, snapshot = _hf_cache(tmp_path)
    (tmp_path / "elsewhere.json").write_text("{}")
    (snapshot / "tokenizer.json").symlink_to(tmp_path / "elsewhere.json")
    (snapshot / "other.json").symlink_to("../../../models--other/blobs/x")  # a neighbouring repo's blob
    with pytest.raises(UnsupportedModelError, match="links outside the folder"):
        check_source_links(snapshot)
    with pytest.raises(UnsupportedModelError, match="links outside the folder"):
        read_source_json(snapshot, "tokenizer.json")


@pytest.mark.parametrize(("content", "message"), [
    (b"\xff\xfe{}", "not UTF-8 text"),
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "not a JSON object, got list"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
])
def test_source_json_files_are_read_guardedly(folder, content, message):
    (folder / "config.json").write_bytes(content)
    with pytest.raises(UnsupportedModelError, match=rf"config.json: ({message})"):
        read_source_json(folder, "config.json")


def test_an_oversized_source_json_is_refused_before_reading(folder):
    with open(folder / "config.json", "wb") as handle:
        handle.truncate(MAX_SOURCE_JSON_BYTES + 1)  # sparse: no real disk used
    with pytest.raises(UnsupportedModelError, match="too large"):
        read_source_json(folder, "config.json")


def _index(folder, shards):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))


@pytest.mark.parametrize("shard", ["../secret.txt", "/etc/passwd", "sub/../../secret.txt"])
def test_a_weight_index_cannot_name_a_shard_outside_the_source(folder, shard):
    _index(folder, {"a.weight": shard})
    with pytest.raises(UnsupportedModelError, match="weight shard .* points outside the folder"):
        weight_files(folder)


def test_a_weight_shard_linking_out_of_the_source_is_refused(folder):
    (folder / "model-00001.safetensors").symlink_to(folder.parent / "secret.txt")
    _index(folder, {"a.weight": "model-00001.safetensors"})
    with pytest.raises(UnsupportedModelError, match="model-00001.safetensors: weight shard links outside"):
        weight_files(folder)


@pytest.mark.parametrize("index", [{"weight_map": ["x"]}, {"weight_map": {"a": 3}}, {}])
def test_a_malformed_weight_index_is_one_line(folder, index):
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedModelError, match="weight_map must map tensor names to files"):
        weight_files(folder)


def test_export_refuses_a_source_whose_tokenizer_links_outside(lstm_model, tmp_path):
    import edgelm

    source = shutil.copytree(lstm_model, tmp_path / "src")
    (tmp_path / "stolen.json").write_bytes((source / "tokenizer.json").read_bytes())
    (source / "tokenizer.json").unlink()
    (source / "tokenizer.json").symlink_to(tmp_path / "stolen.json")
    with pytest.raises(UnsupportedModelError, match="tokenizer.json: linked file links outside the folder"):
        edgelm.export(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_config_that_links_outside(lstm_model, tmp_path):
    import edgelm

    source = shutil.copytree(lstm_model, tmp_path / "src")
    (tmp_path / "config.json").write_bytes((source / "config.json").read_bytes())
    (source / "config.json").unlink()
    (source / "config.json").symlink_to(tmp_path / "config.json")
    with pytest.raises(UnsupportedModelError, match="config.json: config.json links outside the folder"):
        edgelm.export(source, tmp_path / "out")


def test_export_from_a_hugging_face_cache_snapshot_follows_its_blob_links(lstm_model, tmp_path):
    import edgelm

    repo = tmp_path / "hub" / "models--me--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for index, path in enumerate(sorted(lstm_model.iterdir())):
        shutil.copy(path, repo / "blobs" / f"blob{index}")
        (snapshot / path.name).symlink_to(f"../../blobs/blob{index}")
    manifest = edgelm.export(snapshot, tmp_path / "out", validate=False)
    assert set(manifest.source.sha256) == {"model.safetensors"}
    with edgelm.load(tmp_path / "out") as model:
        assert model.generate("The ", max_tokens=3, temperature=0)


def test_an_artifact_whose_manifest_links_outside_is_refused(lstm_artifact, tmp_path):
    from edgelm.artifact import read_manifest

    art = shutil.copytree(lstm_artifact, tmp_path / "art")
    (art / "edgelm.json").rename(tmp_path / "elsewhere.json")
    (art / "edgelm.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ArtifactError, match="edgelm.json: manifest links outside the folder"):
        read_manifest(art)


@pytest.mark.parametrize(("content", "message"), [
    ('{"type": "x"}', "not a JSON list, got dict"),
    ('[{"type": 3}]', r"expected a list of \{type, path\} objects"),
    ('[{"type": "sentence_transformers.models.Pooling", "path": "../../x"}]', "pooling config .* points outside"),
])
def test_a_hostile_modules_json_is_one_line(folder, content, message):
    from edgelm.export.bert import sentence_transformers_facts

    (folder / "modules.json").write_text(content)
    with pytest.raises(UnsupportedModelError, match=message):
        sentence_transformers_facts(folder)


def test_held_out_text_that_is_not_utf8_is_one_line(lstm_model, tmp_path):
    import edgelm

    source = shutil.copytree(lstm_model, tmp_path / "src")
    (source / "held_out.txt").write_bytes(b"fine text \xff\xfe then bytes")
    with pytest.raises(UnsupportedModelError, match=r"held_out.txt: not UTF-8 text \(byte 10\)"):
        edgelm.export(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
