"""`edgelm train gpt2|llama|bert`: ordinary Hugging Face folders, deterministic, and exportable."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from trained_fixtures import train_tiny_hf, training_text

from conftest import export_to
from edgelm.artifact import read_manifest
from edgelm.cli import main
from edgelm.errors import UsageError

FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "held_out.txt"}


@pytest.fixture(scope="module", params=["gpt2", "llama", "bert"])
def trained(request, tmp_path_factory):
    return request.param, train_tiny_hf(tmp_path_factory.mktemp(request.param) / "model", request.param)


def test_a_trained_folder_is_an_ordinary_checkpoint(trained):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    family, folder = trained
    assert FILES <= {p.name for p in folder.iterdir()}
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == family and config.edgelm_training["steps"] == 3
    loader = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
    model = loader.from_pretrained(folder)
    assert type(model).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                                    "bert": "BertForMaskedLM"}[family]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == config.vocab_size
    assert (folder / "held_out.txt").read_text() in training_text()  # the tail never trained on


def test_tokenizers_follow_their_family(trained):
    family, folder = trained
    data = json.loads((folder / "tokenizer.json").read_text())
    if family == "gpt2":  # GPT-2's split rules are ByteLevel's own regex
        assert data["pre_tokenizer"] == {**data["pre_tokenizer"], "type": "ByteLevel", "use_regex": True}
    elif family == "bert":
        assert data["model"]["type"] == "WordPiece" and data["normalizer"]["lowercase"] is True
    else:
        assert data["pre_tokenizer"]["type"] == "Sequence"


def test_llama_chat_template_renders_the_trained_format(trained):
    from transformers import AutoTokenizer

    from edgelm.models.hf_tokenizers import chat_turns

    family, folder = trained
    if family != "llama":
        pytest.skip("chat format is the LLaMA's")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "chat_template" in config and not (folder / "chat_template.jinja").exists()
    rendered = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], tokenize=False)
    assert rendered == chat_turns("Q?", "A.")


@pytest.mark.parametrize("family", ["gpt2", "bert"])  # byte-level BPE and WordPiece trainers
def test_same_seed_same_files_other_seed_other_weights(tmp_path, family):
    from safetensors.numpy import load_file

    folders = [train_tiny_hf(tmp_path / name, family, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    a, b, c = (load_file(folder / "model.safetensors") for folder in folders)
    assert (folders[0] / "tokenizer.json").read_bytes() == (folders[1] / "tokenizer.json").read_bytes()
    assert all((a[k] == b[k]).all() for k in a)
    assert any((a[k] != c[k]).any() for k in a)


def test_each_family_exports_and_validates(trained, tmp_path):
    family, folder = trained
    options = {"gpt2": dict(quant="int8"), "llama": dict(format="gguf", quant="q8_0"),
               "bert": dict(task="fill-mask")}[family]
    manifest = read_manifest(export_to(folder, tmp_path / "artifact", **options))
    assert manifest.family == family and manifest.validation and all(c.passed for c in manifest.validation)


def test_cli_trains_a_transformer_and_refuses_foreign_folders(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(training_text(), encoding="utf-8")
    out = tmp_path / "m"
    args = ["train", "gpt2", "--out", str(out), "--text", str(text), "--steps", "2", "--hidden", "32",
            "--layers", "1", "--heads", "2", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "held-out perplexity" in result.output
    assert CliRunner().invoke(main, args).exit_code == 0  # its own folder: retrained in place
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = CliRunner().invoke(main, [*args[:3], str(foreign), *args[4:]])
    assert refused.exit_code != 0 and "--force" in refused.output and (foreign / "notes.txt").exists()


@pytest.mark.parametrize("flags, message", [
    (["bert", "--tokenizer", "bpe"], "--tokenizer is for rnn and lstm"),
    (["lstm", "--heads", "2"], "--heads is for gpt2"),
    (["llama", "--hidden", "60", "--heads", "8"], "multiple of heads"),
])
def test_flags_that_do_not_fit_the_family_are_one_line(tmp_path, flags, message):
    result = CliRunner().invoke(main, ["train", flags[0], "--out", str(tmp_path / "m"), *flags[1:]])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_too_short_text_is_refused_before_training(tmp_path):
    from edgelm.models.hf_train import HfTrainOptions, train_hf

    with pytest.raises(UsageError, match="too short"):
        train_hf(tmp_path / "m", HfTrainOptions(family="bert", steps=1), "a short text\n" * 10)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_a_held_out_slice_too_short_to_score_is_refused_before_training(tmp_path, family):
    # long enough by characters, but a 4096-token BPE packs its 5% tail into fewer tokens than seq-len 128 needs
    from edgelm.models.hf_train import HfTrainOptions, train_hf

    steps = []
    opts = HfTrainOptions(family=family, hidden=32, layers=1, heads=2, seq_len=128, batch_size=2, steps=2)
    with pytest.raises(UsageError, match="held-out slice .* smaller --seq-len"):
        train_hf(tmp_path / "m", opts, training_text()[:10_900], on_step=lambda step, loss: steps.append(step))
    assert steps == [] and not (tmp_path / "m").exists()
