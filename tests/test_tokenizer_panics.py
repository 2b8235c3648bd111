"""Rust panics from a user's text: a tokenizer.json whose pre-tokenizer regex backtracks without end
passes the load probe and panics (pyo3's PanicException, a BaseException) on some prompt. The
tokenizer turns it into one ArtifactError naming the file, and the CLI's last resort catches any
BaseException that is no exit or interrupt in one line."""

from __future__ import annotations

import pytest
from cli_helpers import invoke
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from edgelm.errors import ArtifactError
from edgelm.runtime.ort.tokenizer import load_tokenizer

BACKTRACKING = "a" * 40 + "c"  # (a|aa)+b tries every split of the a's before failing


@pytest.fixture
def backtracking_tokenizer(tmp_path):
    tokenizer = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("(a|aa)+b"), behavior="isolated")
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def panic_exception() -> BaseException:
    """pyo3's PanicException, raised for real by the tokenizers library."""
    tokenizer = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("(a|aa)+b"), behavior="isolated")
    try:
        tokenizer.encode(BACKTRACKING)
    except BaseException as err:  # noqa: B036
        return err
    pytest.skip("this tokenizers version does not panic on a backtracking regex")


def test_a_panic_on_a_prompt_is_one_artifact_error_naming_the_file(backtracking_tokenizer):
    tokenizer = load_tokenizer(backtracking_tokenizer)  # the load probe does not backtrack
    assert tokenizer.encode("a").ids == [0]
    for call in (lambda: tokenizer.encode(BACKTRACKING), lambda: tokenizer.encode_batch(["a", BACKTRACKING])):
        with pytest.raises(ArtifactError) as caught:
            call()
        message = str(caught.value)
        assert str(backtracking_tokenizer) in message and "\n" not in message
    assert tokenizer.get_vocab_size() == 2  # everything else is the tokenizer's own


def test_the_cli_last_resort_catches_a_panic_in_one_line(lstm_artifact, monkeypatch):
    import edgelm.commands.info

    panic = panic_exception()
    assert not isinstance(panic, Exception)

    def broken(*args, **kwargs):
        raise panic

    monkeypatch.setattr(edgelm.commands.info, "describe", broken)
    result = invoke("info", lstm_artifact)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: internal error (PanicException)"), result.output
    assert "Traceback" not in result.output


def test_exits_and_interrupts_still_pass_the_last_resort(lstm_artifact, monkeypatch):
    import edgelm.commands.info

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(edgelm.commands.info, "describe", interrupted)
    assert invoke("info", lstm_artifact).exit_code == 130
