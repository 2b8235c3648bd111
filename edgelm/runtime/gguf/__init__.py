"""GGUF headers read and checked byte by byte before llama.cpp sees the file. Imports no loader."""
