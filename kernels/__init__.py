"""Compute kernels: NumPy references beside their Numba twins. Imports no engine or server."""
