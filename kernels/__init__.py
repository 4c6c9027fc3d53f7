"""Compute kernels: NumPy references beside their Numba twins. Imports no engine or server.

`kernels.twins` pairs every Numba kernel with its twin and the tolerance they agree to.
"""
