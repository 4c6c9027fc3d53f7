"""numbalm's engine: GGUF bytes in, tokens, text and embeddings out.

    import engine
    model = engine.load_model("smollm2-135m-instruct")   # registry id, alias or .gguf path
    ids = model.tokenizer.encode("The capital of France is")
    for tok in model.generate(ids, max_tokens=8, temperature=0.0):
        print(tok.text, end="")
"""

__version__ = "0.1.0"  # the one definition (setup.cfg reads it)
_LAZY = ("load_model", "LLM")  # from engine.llm, imported on first use
__all__ = [*_LAZY, "set_compute_threads"]


def set_compute_threads(n: int) -> None:
    """Run every forward pass of this process on `n` threads from now on (1 to the cores Numba
    saw at import, or NUMBA_NUM_THREADS). All forward passes run on one compute thread
    (engine/compute.py); a server with several replicas per machine gives each a share."""
    from .compute import COMPUTE

    COMPUTE.set_threads(n)


def __getattr__(name):
    # Imported on first use so that `import engine.gguf_file` stays light.
    if name in _LAZY:
        from . import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
