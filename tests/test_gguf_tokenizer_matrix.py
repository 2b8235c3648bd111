"""Every GGUF architecture edgelm converts, with every tokenizer kind it may meet: converted, loaded
by llama.cpp, tokenising as the source does; a pairing the export does not take is refused before
converting, in one line naming tokenizer and architecture.

Folders are named after their architecture, as real checkpoints are: llama.cpp switches tokenizer
rules on a name containing "phi3", which aborted the load of a Phi-3 with a byte-level BPE.
"""

from __future__ import annotations

import pytest
from gguf_fixtures import check
from tiny_archs import build_tokenizer, build_with_tokenizer

from edgelm.errors import UnsupportedModelError
from edgelm.export import export
from edgelm.export.gguf_arch import ARCHS
from edgelm.export.options import ExportOptions

pytest.importorskip("gguf")
DECODERS = sorted(name for name, spec in ARCHS.items() if spec.tokenizers == ("spm", "bpe"))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {kind: build_tokenizer(kind, root / kind) for kind in ("spm", "bpe", "wordpiece")}


def test_every_architecture_spec_is_covered():
    assert set(DECODERS) | {"bert"} == set(ARCHS)
    assert {"llama", "gpt2", "qwen2", "phi3", "qwen3", "gemma3"} <= set(DECODERS)


@pytest.mark.parametrize("kind", ["spm", "bpe"])
@pytest.mark.parametrize("arch", DECODERS)
def test_decoder_converts_with_tokenizer_and_llama_cpp_loads_it(tokenizers, tmp_path, arch, kind):
    import gguf

    source = build_with_tokenizer(arch, tokenizers[kind], tmp_path / f"{arch}-{kind}")
    manifest = export(source, tmp_path / "out", ExportOptions(format="gguf", quant="f32"))  # validation opens it in llama.cpp
    assert manifest.validation_passed and manifest.tokenizer.kind == kind
    assert check(manifest, "tokenizer_parity").value == 1.0
    assert check(manifest, "top1_agreement_vs_torch").value >= 0.99
    fields = gguf.GGUFReader(tmp_path / "out" / "model.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == {"spm": "llama", "bpe": "gpt2"}[kind]
    assert "phi3" not in fields["general.name"].contents().lower()  # this tokenizer lacks Phi-3's rule


@pytest.mark.parametrize("arch", DECODERS)
def test_wordpiece_on_a_decoder_is_refused_before_converting(tokenizers, tmp_path, arch):
    source = build_with_tokenizer(arch, tokenizers["wordpiece"], tmp_path / f"{arch}-wordpiece")
    with pytest.raises(UnsupportedModelError, match=f"WordPiece tokenizer .* with the {arch} architecture") as info:
        export(source, tmp_path / "out", ExportOptions(format="gguf", quant="f32"))
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["spm", "bpe"])
def test_bert_takes_wordpiece_only(tokenizers, tmp_path, kind):
    from test_gguf_bert import write_wordpiece_bert

    source = write_wordpiece_bert(tmp_path / f"bert-{kind}")
    for name in ("tokenizer.json", "vocab.txt"):
        (source / name).unlink(missing_ok=True)
    for item in tokenizers[kind].iterdir():
        (source / item.name).write_bytes(item.read_bytes())
    with pytest.raises(UnsupportedModelError, match="tokenizer .* with the bert architecture") as info:
        export(source, tmp_path / "out", ExportOptions(format="gguf", validate=False))
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
