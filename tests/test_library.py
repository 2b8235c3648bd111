"""The model library: `edgelm add|list|rm`, names wherever a path goes, and the index's safety."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, invoke

import edgelm
from conftest import corpus_slice
from edgelm.library import index_path, library_home, read_index, resolve_model


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("EDGELM_HOME", str(home))
    return home


@pytest.fixture
def gguf_copy(tiny_gguf_256, tmp_path) -> Path:
    """A .gguf this test may move or delete (the session fixture's file stays put)."""
    path = tmp_path / "files" / "tiny-chat.gguf"
    path.parent.mkdir()
    shutil.copyfile(tiny_gguf_256, path)
    return path


def listed(**kwargs) -> dict[str, dict]:
    result = invoke("list", "--json", **kwargs)
    assert result.exit_code == 0, result.output
    return {m["name"]: m for m in json.loads(result.stdout)["models"]}


def test_edgelm_home_holds_the_library_and_the_platform_folder_is_the_default(home, monkeypatch):
    import platformdirs

    assert library_home() == home and index_path() == home / "library.json"
    monkeypatch.delenv("EDGELM_HOME")
    assert library_home() == Path(platformdirs.user_data_path("edgelm", appauthor=False))


def test_add_by_reference_lists_every_column_and_the_name_runs(home, lstm_artifact):
    added = invoke("add", lstm_artifact, "--name", "poet")
    assert added.exit_code == 0, added.output
    assert "added poet: lstm onnx" in added.output and "by reference" in added.output
    row = listed()["poet"]
    assert row["path"] == str(lstm_artifact) and row["copied"] is False and row["status"] == "ok"
    assert (row["family"], row["format"], row["quant"]) == ("lstm", "onnx", "none")
    assert row["validated"] == "passed" and row["verified"] is None
    assert row["size_bytes"] == sum(p.stat().st_size for p in lstm_artifact.iterdir() if p.is_file())
    table = invoke("list").output.splitlines()
    assert table[0].split() == ["NAME", "FAMILY", "FORMAT", "QUANT", "SIZE", "VALIDATED", "VERIFIED", "STATUS"]
    assert table[1].split()[:4] == ["poet", "lstm", "onnx", "none"] and table[1].split()[-1] == "ok"

    run = invoke("run", "poet", "The ", "--max-tokens", 5, "--temperature", 0, "--threads", 1)
    by_path = invoke("run", lstm_artifact, "The ", "--max-tokens", 5, "--temperature", 0, "--threads", 1)
    assert run.exit_code == 0 and run.stdout == by_path.stdout
    assert invoke("info", "poet").output.startswith(f"{lstm_artifact}: lstm text-generation")
    with edgelm.load("poet", threads=1) as model:
        assert model.generate("The ", max_tokens=5, temperature=0) == run.stdout.strip("\n")
    scored = invoke("eval", "poet", "--chunks", 1, "--ctx", 64, "--json", "--threads", 1)
    assert scored.exit_code == 0 and json.loads(scored.stdout)["perplexity"] > 1


def test_verify_by_name_records_its_result_in_the_library(home, lstm_artifact):
    assert invoke("add", lstm_artifact, "--name", "poet").exit_code == 0
    result = invoke("verify", "poet", "--threads", 1)
    assert result.exit_code == 0, result.output
    assert "recorded in the library for poet" in result.stderr
    verified = listed()["poet"]["verified"]
    assert verified["passed"] is True and verified["at"][:2] == "20"
    assert "passed 20" in invoke("list").output


def test_verify_of_a_path_no_entry_holds_leaves_the_library_alone(home, lstm_artifact):
    assert invoke("verify", lstm_artifact, "--threads", 1).exit_code == 0
    assert not home.exists()  # no entry for it: not even an empty library is created


def test_add_copy_owns_its_files_and_rm_deletes_only_those(home, gguf_copy, lstm_artifact):
    assert invoke("add", gguf_copy, "--copy").exit_code == 0  # named after the file: tiny-chat
    assert invoke("add", lstm_artifact, "--name", "ref").exit_code == 0
    copied = Path(listed()["tiny-chat"]["path"])
    assert copied == home / "models" / "tiny-chat" / "tiny-chat.gguf" and copied.read_bytes() == gguf_copy.read_bytes()
    assert not any(p.name.startswith(".") for p in (home / "models").iterdir())  # no staging folder left

    removed = invoke("rm", "tiny-chat")
    assert removed.exit_code == 0 and "deleted its copy" in removed.output
    assert not copied.parent.exists() and gguf_copy.is_file()
    kept = invoke("rm", "ref")
    assert kept.exit_code == 0 and "kept" in kept.output and (lstm_artifact / "edgelm.json").is_file()
    assert read_index() == {}
    assert_one_line_error(invoke("rm", "ref"), 2, "no model named 'ref'")


def test_a_copied_folder_is_checked_against_its_hashes(home, lstm_artifact):
    assert invoke("add", lstm_artifact, "--name", "copy", "--copy").exit_code == 0
    folder = home / "models" / "copy"
    listed_files = json.loads((lstm_artifact / "edgelm.json").read_text())["files"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*listed_files, "edgelm.json"])
    assert invoke("run", "copy", "The ", "--max-tokens", 3, "--threads", 1).exit_code == 0


def test_a_taken_name_is_refused_whatever_its_case(home, gguf_copy):
    assert invoke("add", gguf_copy, "--name", "Chat").exit_code == 0
    assert_one_line_error(invoke("add", gguf_copy, "--name", "chat"), 2, "already has a model named 'Chat'")
    assert_one_line_error(invoke("add", gguf_copy, "--name", "chat", "--copy"), 2, "already has")
    assert list(read_index()) == ["Chat"] and not (home / "models" / "chat").exists()


def test_add_refuses_what_is_not_a_model(home, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert_one_line_error(invoke("add", text), 2, "add takes an artifact folder")
    assert_one_line_error(invoke("add", tmp_path / "absent"), 1, "no such file or folder")
    assert_one_line_error(invoke("add", tmp_path), 1, "not an edgelm artifact")
    assert not index_path().exists()


@pytest.mark.parametrize("name", ["../up", "a/b", "a\\b", "", "x" * 65, "line\nbreak", "tab\there", "-rf",
                                  ".hidden", "with space", "nul", "COM1.txt", "é", "a\x00b", "a:b"])
def test_hostile_names_are_refused_in_one_line(home, gguf_copy, name):
    result = invoke("add", gguf_copy, "--name", name)
    assert_one_line_error(result, 2, "model name")
    assert not index_path().exists() and not (home / "models").exists()


def test_a_path_that_exists_wins_over_a_name(home, gguf_copy, lstm_artifact, tmp_path, monkeypatch):
    assert invoke("add", gguf_copy, "--name", "model").exit_code == 0
    monkeypatch.chdir(tmp_path)
    shutil.copytree(lstm_artifact, tmp_path / "model")
    assert resolve_model("model") == Path("model")
    assert invoke("info", "model").output.startswith("model: lstm")
    assert resolve_model("nothing/here") == Path("nothing/here")  # a path: the loader names it


def test_a_name_that_is_neither_says_how_to_see_names(home):
    assert_one_line_error(invoke("run", "nosuch", "hi"), 2, "`edgelm list` shows the names")
    for command in (["info"], ["verify"], ["chat"], ["eval"], ["bench"], ["embed"]):
        assert_one_line_error(invoke(*command, "nosuch"), 2, "'nosuch' is neither a file or folder")
    with pytest.raises(edgelm.errors.UsageError, match="edgelm list"):
        edgelm.load("nosuch")


def test_an_entry_whose_files_are_gone_shows_as_missing(home, gguf_copy):
    assert invoke("add", gguf_copy, "--name", "gone").exit_code == 0
    assert invoke("add", gguf_copy, "--name", "here", "--copy").exit_code == 0
    gguf_copy.unlink()
    rows = listed()
    assert rows["gone"]["status"] == "missing" and rows["gone"]["missing"] is True
    assert rows["gone"]["size_bytes"] is None and rows["here"]["status"] == "ok"
    table = invoke("list")
    assert table.exit_code == 0 and "missing" in table.stdout and "gone:" in table.stderr
    assert_one_line_error(invoke("run", "gone", "hi"), 1, "library model 'gone' is missing")
    assert invoke("rm", "gone").exit_code == 0 and list(read_index()) == ["here"]


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="needs a file system that takes any bytes")
def test_a_file_name_that_is_not_utf8_is_added_and_found_again(home, gguf_copy):
    odd = gguf_copy.with_name(os.fsdecode(b"caf\xe9.gguf"))  # Latin-1 bytes: a lone surrogate in Python
    gguf_copy.rename(odd)
    added = invoke("add", odd, "--name", "odd")
    assert added.exit_code == 0, added.output
    assert read_index()["odd"].path == str(odd) and listed()["odd"]["status"] == "ok"
    assert resolve_model("odd") == odd


def test_an_over_long_manifest_field_is_cut_and_the_library_stays_readable(home, lstm_artifact, tmp_path):
    folder = tmp_path / "art"
    shutil.copytree(lstm_artifact, folder)
    manifest = json.loads((folder / "edgelm.json").read_text())
    manifest["quant"] = "q" * 5000  # what a stranger's manifest may hold
    (folder / "edgelm.json").write_text(json.dumps(manifest))
    assert invoke("add", folder, "--name", "long").exit_code == 0
    assert invoke("add", lstm_artifact, "--name", "other").exit_code == 0  # the index still reads
    rows = listed()
    assert rows["long"]["quant"] == "q" * 200 and rows["long"]["status"] == "ok" and "other" in rows


def test_a_broken_artifact_lists_as_broken(home, lstm_artifact, tmp_path):
    folder = tmp_path / "art"
    shutil.copytree(lstm_artifact, folder)
    assert invoke("add", folder, "--name", "art").exit_code == 0
    (folder / "edgelm.json").write_text("{")
    row = listed()["art"]
    assert row["status"] == "broken" and "edgelm.json" in row["problem"]
    assert row["family"] == "lstm"  # what add recorded stays shown


def test_a_corrupt_index_is_one_line_naming_the_file(home, gguf_copy):
    home.mkdir()
    (home / "library.json").write_text('{"version": 1, "models": {"a/b": {"path": "/x"}}}')
    for args in (["list"], ["run", "somename", "hi"], ["add", gguf_copy, "--name", "x"], ["serve"]):
        assert_one_line_error(invoke(*args), 1, str(home / "library.json"))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_an_index_that_is_not_a_regular_file_is_refused_without_hanging(home):
    home.mkdir()
    os.mkfifo(home / "library.json")
    assert_one_line_error(invoke("list"), 1, "not a regular file")


def test_a_hand_edited_copied_entry_cannot_make_rm_delete_elsewhere(home, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    home.mkdir()
    entry = {"path": str(precious), "copied": True}
    (home / "library.json").write_text(json.dumps({"version": 1, "models": {"evil": entry}}))
    assert invoke("rm", "evil").exit_code == 0
    assert (precious / "keep.txt").read_text() == "mine"


def test_concurrent_adds_all_land(home, gguf_copy):
    env = {**os.environ, "EDGELM_HOME": str(home)}
    add = [sys.executable, "-m", "edgelm.cli", "add", str(gguf_copy), "--name"]
    procs = [subprocess.Popen([*add, f"m{i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(4)]
    procs += [subprocess.Popen([*add, "same", "--copy"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
              for _ in range(2)]
    codes = [p.wait(timeout=120) for p in procs]
    assert codes[:4] == [0, 0, 0, 0], [p.stderr.read() for p in procs]
    assert sorted(codes[4:]) == [0, 2]  # one of the two `same` adds wins, the other is refused
    assert sorted(read_index()) == ["m0", "m1", "m2", "m3", "same"]
    assert [p.name for p in (home / "models").iterdir()] == ["same"]  # the loser's copy is gone


def test_serve_with_no_models_serves_the_library_by_name(home, gguf_copy, lstm_artifact):
    from edgelm.commands.serve import model_paths

    assert invoke("add", gguf_copy, "--name", "chatty").exit_code == 0
    assert invoke("add", lstm_artifact, "--name", "poet").exit_code == 0
    assert invoke("add", gguf_copy, "--name", "gone", "--copy").exit_code == 0
    shutil.rmtree(home / "models" / "gone")
    assert model_paths([], []) == {"chatty": gguf_copy, "poet": lstm_artifact}
    assert model_paths(["poet", str(gguf_copy)], []) == {"poet": lstm_artifact, "tiny-chat": gguf_copy}
    assert model_paths([], ["other=poet"]) == {"other": lstm_artifact}


def test_serve_with_an_empty_library_says_how_to_fill_it(home):
    assert_one_line_error(invoke("serve"), 2, "`edgelm add PATH` registers one")


def test_export_add_registers_the_artifact(home, lstm_model, tmp_path):
    out = tmp_path / "lstm-int8"
    result = invoke("export", lstm_model, "--out", out, "--quant", "int8", "--add")
    assert result.exit_code == 0, result.output
    assert listed()["lstm-int8"]["path"] == str(out) and listed()["lstm-int8"]["quant"] == "int8"
    assert_one_line_error(invoke("export", lstm_model, "--out", tmp_path / "b", "--add-as", "lstm-int8"), 2,
                          "already has a model named")
    assert not (tmp_path / "b").exists()  # refused before exporting


def test_train_add_exports_into_the_library(home, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(corpus_slice(20_000))
    result = invoke("train", "rnn", "--out", tmp_path / "rnn", "--text", text, "--steps", 5, "--hidden", 16,
                    "--seq-len", 16, "--batch-size", 4, "--add-as", "tiny-rnn")
    assert result.exit_code == 0, result.output
    row = listed()["tiny-rnn"]
    assert row["copied"] is True and row["family"] == "rnn" and row["validated"] == "passed"
    assert Path(row["path"]) == home / "models" / "tiny-rnn"
    assert invoke("run", "tiny-rnn", "The ", "--max-tokens", 3, "--threads", 1).exit_code == 0
