"""llguidance's view of a llama.cpp vocabulary: llama.cpp's own pieces, read from the loaded
model, and llama.cpp's C tokenize function, which llguidance calls natively (it knows to keep
SentencePiece's dummy-prefix space off the text it encodes)."""

from __future__ import annotations

from edgelm.runtime.core.constraint_vocab import SPECIAL_PREFIX, Vocabulary
from edgelm.runtime.llamacpp.native import native_tokenize_address


def llama_vocabulary(vocab, end: set[int]) -> Vocabulary:
    """The Vocabulary of a loaded llama.cpp vocabulary (`llama_vocab_p`), ending on `end` ids."""
    import llama_cpp
    import llguidance

    tokens, _ = llama_token_bytes(vocab)
    end_ids = sorted(i for i in end if i < len(tokens)) or [llama_cpp.llama_vocab_eos(vocab)]
    tokenizer = llguidance.LLTokenizer.from_llamacpp(tokens=tokens, vocab_ptr=vocab,
                                                     tokenize_fptr=native_tokenize_address(),
                                                     eos_token=end_ids, slices=None)
    return Vocabulary(tokenizer, len(tokens))


def llama_token_bytes(vocab) -> tuple[list[bytes], set[int]]:
    """(bytes of every id, the special ids) of a llama.cpp vocabulary: each token's piece as
    llama.cpp writes it (a byte token is its byte, "▁" already a space); control tokens, and
    user-defined ones written like "<...>", are special."""
    import ctypes

    import llama_cpp

    buffer = ctypes.create_string_buffer(1024)
    tokens, specials = [], set()
    for i in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        n = llama_cpp.llama_token_to_piece(vocab, i, buffer, len(buffer), 0, True)
        piece = buffer.raw[: max(n, 0)]  # a piece longer than the buffer (n < 0) is no text a grammar needs
        attr = llama_cpp.llama_vocab_get_attr(vocab, i)
        control = attr & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
        tagged = attr & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED and piece.startswith(b"<") and piece.endswith(b">")
        if control or tagged:
            specials.add(i)
            piece = SPECIAL_PREFIX + piece
        tokens.append(piece)
    return tokens, specials
