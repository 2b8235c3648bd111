"""The llama.cpp backend (llama-cpp-python): text generation, batched decoding, embeddings, memory preflight."""
