"""llama-server's own routes beside the OpenAI ones: `/tokenize` and `/detokenize`."""
