"""numbalm's engine: GGUF bytes in, tokens, text and embeddings out."""
