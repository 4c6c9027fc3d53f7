"""Each Numba kernel against its NumPy twin, from the one table `kernels.twins.TWINS`."""

import functools
import importlib
import pkgutil

import numpy as np
import pytest
from numba.core.registry import CPUDispatcher

import kernels
from kernels.twins import TWINS


def kernel_name(kernel) -> str:
    return f"{kernel.__module__.removeprefix('kernels.')}.{kernel.__name__}"


@functools.cache
def cases(kernel) -> dict[str, tuple]:
    return TWINS[kernel].cases()


CASES = [(kernel, case) for kernel in TWINS for case in cases(kernel)]


@pytest.mark.parametrize(
    "kernel, case", CASES, ids=[f"{kernel_name(k)}-{c}" for k, c in CASES]
)
def test_kernel_matches_its_twin(kernel, case):
    twin = TWINS[kernel]
    if not twin.available:
        pytest.skip(f"this CPU cannot run {kernel_name(kernel)}")
    args = cases(kernel)[case]
    want = twin.run_ref(twin.ref, args)
    got = twin.run(kernel, args, want)
    exact = twin.rtol == twin.atol == 0
    pairs = zip(got, want, strict=True) if isinstance(want, tuple) else [(got, want)]
    for g, w in pairs:
        assert g.shape == w.shape and g.dtype == w.dtype
        if exact:
            np.testing.assert_array_equal(g, w)
        else:
            scale = np.abs(w) if twin.scale is None else twin.scale(*args)
            np.testing.assert_array_less(np.abs(g - w), twin.atol + twin.rtol * scale)


def numba_kernels() -> set[str]:
    """Public Numba dispatchers defined (not just imported) in the modules of `kernels/`."""
    found = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"kernels.{info.name}")
        for name, obj in vars(module).items():
            if (isinstance(obj, CPUDispatcher) and not name.startswith("_")
                    and obj.py_func.__module__ == module.__name__):
                found.add(kernel_name(obj))
    return found


def test_every_numba_kernel_has_a_twin():
    found = numba_kernels()
    assert {"norms.rms_norm", "attention.paged_attention", "vnni.qmatmul_vnni"} <= found  # it looks
    missing = found - {kernel_name(k) for k in TWINS}
    assert not missing, f"add these kernels and their NumPy twins to kernels.twins: {missing}"
