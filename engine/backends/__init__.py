"""Backends: the few operations a model is written against, in NumPy or in Numba.

`get_backend("reference")` is plain NumPy on float32 weights: the readable oracle.
`get_backend("fast")` runs the Numba kernels in `kernels/` on the quantized blocks.
"""

from __future__ import annotations

from ..errors import EngineError

BACKENDS = ("fast", "reference")
DEFAULT_BACKEND = "fast"


def get_backend(name: str | None = None):
    name = name or DEFAULT_BACKEND
    if name == "reference":
        from .reference import ReferenceBackend

        return ReferenceBackend()
    if name == "fast":
        try:
            from .fast import FastBackend

            return FastBackend()
        except (ImportError, OSError) as e:  # a missing or broken Numba / llvmlite install
            raise EngineError(
                f"the fast backend cannot start: {type(e).__name__}: {e}. It needs a working "
                'Numba; backend="reference" runs the same models in pure NumPy (much slower)'
            ) from e
    raise EngineError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
