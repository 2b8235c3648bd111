"""The artifact contract: atomic writes, and loads that refuse anything that does not match."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from edgelm.artifact import MANIFEST_NAME, Manifest, read_manifest, write_artifact
from edgelm.contract import RecurrentModel, TokenizerSection
from edgelm.errors import ArtifactError, ExportError


def _manifest() -> Manifest:
    return Manifest(family="lstm", task="text-generation", format="onnx", quant="none",
                    tokenizer=TokenizerSection(file="tokenizer.json"),
                    model=RecurrentModel(file="model.onnx", inputs=("input_ids", "h0"), outputs=("logits", "hn"),
                                         num_layers=1, hidden_size=4))


def _write(out, payload=b"weights"):
    with write_artifact(out, _manifest()) as tmp:
        (tmp / "model.onnx").write_bytes(payload)
        (tmp / "tokenizer.json").write_text("{}")
    return out


def test_written_artifact_lists_files_with_size_and_sha(tmp_path):
    out = _write(tmp_path / "a")
    manifest = read_manifest(out, verify=True)
    assert manifest.files["model.onnx"]["size"] == 7
    assert len(manifest.files["model.onnx"]["sha256"]) == 64
    assert manifest.versions["edgelm"] and manifest.created


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt(), OSError(28, "No space left")])
def test_failure_mid_write_leaves_nothing_and_rerun_succeeds(tmp_path, failure):
    out = tmp_path / "a"
    with pytest.raises(type(failure)):
        with write_artifact(out, _manifest()) as tmp:
            (tmp / "model.onnx").write_bytes(b"half")
            raise failure
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no hidden partial folder either
    _write(out)
    assert read_manifest(out).files


def test_failure_while_replacing_keeps_the_previous_artifact(tmp_path):
    out = _write(tmp_path / "a", b"old")
    with pytest.raises(RuntimeError):
        with write_artifact(out, _manifest()) as tmp:
            (tmp / "model.onnx").write_bytes(b"new!")
            raise RuntimeError("interrupted")
    assert (out / "model.onnx").read_bytes() == b"old"
    assert read_manifest(out, verify=True)


def test_stale_partial_folder_from_a_killed_run_is_cleared(tmp_path):
    stale = tmp_path / ".a.partial-deadbeef"
    stale.mkdir()
    (stale / MANIFEST_NAME).write_text("{}")
    _write(tmp_path / "a")
    assert not stale.exists()


def test_refuses_to_replace_a_folder_that_is_not_an_artifact(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(ExportError, match="not an edgelm artifact"):
        _write(out)
    assert (out / "notes.txt").read_text() == "precious"


def _edit_manifest(out, **changes):
    data = json.loads((out / MANIFEST_NAME).read_text())
    data.update(changes)
    (out / MANIFEST_NAME).write_text(json.dumps(data))


def test_unknown_schema_version_is_refused(tmp_path):
    out = _write(tmp_path / "a")
    _edit_manifest(out, schema_version=99)
    with pytest.raises(ArtifactError, match="unknown schema_version 99"):
        read_manifest(out)


def test_missing_file_is_named(tmp_path):
    out = _write(tmp_path / "a")
    (out / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="model.onnx: file listed in the manifest is missing"):
        read_manifest(out)


def test_size_mismatch_is_named(tmp_path):
    out = _write(tmp_path / "a")
    (out / "model.onnx").write_bytes(b"weights and more")
    with pytest.raises(ArtifactError, match="model.onnx: size 16 does not match"):
        read_manifest(out)


def test_same_size_corruption_needs_verify(tmp_path):
    out = _write(tmp_path / "a")
    (out / "model.onnx").write_bytes(b"WEIGHTS")
    read_manifest(out)  # sizes match: the fast check passes
    with pytest.raises(ArtifactError, match="model.onnx: sha256 does not match"):
        read_manifest(out, verify=True)


def test_manifest_cannot_point_outside_the_folder(tmp_path):
    out = _write(tmp_path / "a")
    _edit_manifest(out, files={"../secret": {"size": 1, "sha256": "0"}})
    with pytest.raises(ArtifactError, match="outside the artifact"):
        read_manifest(out)


def test_invalid_json_and_missing_manifest(tmp_path):
    out = _write(tmp_path / "a")
    (out / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(out)
    shutil.rmtree(out)
    out.mkdir()
    with pytest.raises(ArtifactError, match="not an edgelm artifact"):
        read_manifest(out)


# -- writes that own what they replace ------------------------------------------------------------
def test_reexport_replaces_an_artifact_holding_only_its_own_files(tmp_path):
    out = _write(tmp_path / "a", b"old")
    _write(out, b"new!")
    assert (out / "model.onnx").read_bytes() == b"new!" and read_manifest(out, verify=True)


@pytest.mark.parametrize("foreign", ["notes.txt", "model.onnx_data", ".hidden"])
def test_reexport_refuses_an_artifact_folder_holding_a_foreign_file(tmp_path, foreign):
    out = _write(tmp_path / "a")
    (out / foreign).write_text("mine")
    with pytest.raises(ExportError, match=rf"a/{re.escape(foreign)}: not a file of the artifact it sits in"):
        _write(out, b"new!")
    assert (out / foreign).read_text() == "mine" and (out / "model.onnx").read_bytes() == b"weights"


def test_reexport_refuses_a_foreign_subfolder_and_an_unreadable_manifest(tmp_path):
    out = _write(tmp_path / "a")
    (out / "photos").mkdir()
    with pytest.raises(ExportError, match="photos: not a file of the artifact"):
        _write(out)
    (out / "photos").rmdir()
    (out / MANIFEST_NAME).write_text("[1, 2")
    with pytest.raises(ExportError, match="unreadable manifest"):
        _write(out)


def test_a_second_export_to_the_same_output_fails_at_once(tmp_path):
    from edgelm.artifact import export_lock

    out = tmp_path / "a"
    with export_lock(out) as lock:
        assert lock.name == ".a.lock" and lock.exists()
        with pytest.raises(ExportError, match=r"^.*a: another export to it is running \(lock .*\.a\.lock\)$"):
            _write(out)
    assert not (tmp_path / ".a.lock").exists()  # released and removed
    _write(out)
    assert read_manifest(out)


def test_the_lock_is_released_when_an_export_fails(tmp_path):
    out = tmp_path / "a"
    with pytest.raises(KeyboardInterrupt):
        with write_artifact(out, _manifest()):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []  # no lock file, no partial folder
    _write(out)


def test_a_lock_held_by_another_process_is_refused_and_dies_with_it(tmp_path):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from edgelm.artifact import export_lock\n"
        f"with export_lock(Path({str(tmp_path / 'a')!r})):\n print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ExportError, match="another export to it is running"):
            _write(tmp_path / "a")
    finally:
        holder.kill()  # a hard kill: the kernel drops the lock with the process
        holder.wait()
    _write(tmp_path / "a")
    assert read_manifest(tmp_path / "a")


def test_a_tokenizer_wider_than_the_model_is_refused_at_load(lstm_artifact, tmp_path):
    import edgelm

    art = shutil.copytree(lstm_artifact, tmp_path / "art")
    data = json.loads((art / MANIFEST_NAME).read_text())
    data["model"]["vocab_size"] = 5  # fewer embedding rows than the tokenizer has ids
    (art / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="tokenizer.json: the tokenizer has token id .*, but the model has only 5"):
        edgelm.load(art)
