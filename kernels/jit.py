"""JIT policy for every Numba kernel: one place for njit options, CPU features and threading.

Kernels import `njit`/`pnjit` from here rather than configuring Numba themselves, so the policy
(caching, fastmath flags, parallelism) is decided once. `ISA` names the instruction-set path the
quantized matmul dispatches to; force the portable one with `NUMBALM_ISA=generic` to test it.
"""

from __future__ import annotations

import functools
import logging
import os

import numba
import numba.core.caching

log = logging.getLogger(__name__)

# Conservative fastmath: allow contraction into FMA and reassociation (vectorized reductions),
# keep NaN/Inf semantics so a bad activation still shows up as NaN rather than garbage.
FASTMATH = {"contract", "reassoc", "nsz", "arcp"}

# --- caches that know what they call ------------------------------------------------------------
# Numba checks a cached function against its own source file only: a kernel that compiles in
# kernels of other files (kernels/decode_layer.py; kernels/vnni.py's `linear` and constants)
# would keep its compiled copy of them after they change, and run stale (seen here: a segfault
# after an edit of kernels/vnni.py). A module listed in CACHE_DEPENDS is stamped with every
# kernels/*.py file as well, so that any change there recompiles it, and is cached apart for
# each INT8_DOT (below).
CACHE_DEPENDS = {"kernels.decode_layer", "kernels.vnni"}


class _DependentSourceLocator(numba.core.caching._CacheLocator):
    """Numba's own choice of cache directory, with a source stamp that covers kernels/."""

    def __init__(self, inner):
        self._inner = inner

    def ensure_cache_path(self):
        self._inner.ensure_cache_path()

    def get_cache_path(self):
        return self._inner.get_cache_path()

    def get_disambiguator(self):
        # the int8 dot's instructions are compiled in as constants: one cache entry per choice
        return f"{self._inner.get_disambiguator()}-{INT8_DOT}"

    def get_source_stamp(self):
        here = os.path.dirname(os.path.abspath(__file__))
        files = sorted(f for f in os.listdir(here) if f.endswith(".py"))
        stamps = [(f, os.stat(os.path.join(here, f)).st_mtime_ns,
                   os.stat(os.path.join(here, f)).st_size) for f in files]
        return self._inner.get_source_stamp(), tuple(stamps)

    @classmethod
    def from_function(cls, py_func, py_file):
        if py_func.__module__ not in CACHE_DEPENDS:
            return None
        for locator in numba.core.caching.CacheImpl._locator_classes:
            if locator is not cls:
                inner = locator.from_function(py_func, py_file)
                if inner is not None:
                    return cls(inner)
        return None


if _DependentSourceLocator not in numba.core.caching.CacheImpl._locator_classes:
    numba.core.caching.CacheImpl._locator_classes.insert(0, _DependentSourceLocator)

njit = functools.partial(numba.njit, cache=True, fastmath=FASTMATH, nogil=True)
pnjit = functools.partial(numba.njit, cache=True, fastmath=FASTMATH, nogil=True, parallel=True)
# No fastmath, for kernels whose rounding decisions must match their NumPy twin bit for bit
# (`arcp` alone turns x * (1 / d) into x / d, which moves a rounding tie). Said explicitly:
# a callee that leaves fastmath unset inherits its caller's when compiled for it (Numba's
# flag inheritance), and a strict kernel called from a fastmath one would lose its rounding.
njit_strict = functools.partial(numba.njit, cache=True, nogil=True, fastmath=False)
pnjit_strict = functools.partial(numba.njit, cache=True, nogil=True, parallel=True,
                                 fastmath=False)


def cpu_flags() -> set[str]:
    """The host CPU's feature flags (from /proc/cpuinfo, else from LLVM's host features)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        import llvmlite.binding as llvm

        feats = llvm.get_host_cpu_features()
        return {name.replace("-", "_") for name, on in feats.items() if on}
    except Exception:  # pragma: no cover - exotic hosts
        return set()


_FLAGS = cpu_flags()
HAS_AVX512_VNNI = {"avx512f", "avx512bw", "avx512_vnni"} <= _FLAGS or {
    "avx512f",
    "avx512bw",
    "avx512vnni",
} <= _FLAGS

# AVX2 with FMA and F16C runs the same kernels: its vpmaddubsw + vpmaddwd give vpdpbusd's sums
HAS_AVX2_INT8 = {"avx2", "fma", "f16c"} <= _FLAGS
INT8_DOTS = ("vpdpbusd", "avx2")


def _pick_int8_dot() -> str | None:
    """The instructions behind kernels/vnni.py's int8 dot product (None: no such kernels).

    The best the CPU has, unless NUMBALM_INT8_DOT names a slower one it also has: an AVX-512
    machine runs the AVX2 path with NUMBALM_INT8_DOT=avx2, so tests check it there too."""
    best = "vpdpbusd" if HAS_AVX512_VNNI else "avx2" if HAS_AVX2_INT8 else None
    forced = os.environ.get("NUMBALM_INT8_DOT", "").strip().lower()
    if not forced:
        return best
    if forced not in INT8_DOTS:
        raise ValueError(f"NUMBALM_INT8_DOT must be {' or '.join(INT8_DOTS)}, not {forced!r}")
    if best is None or INT8_DOTS.index(forced) < INT8_DOTS.index(best):
        raise ValueError(f"NUMBALM_INT8_DOT={forced} but this CPU lacks its instructions")
    return forced


INT8_DOT = _pick_int8_dot()
HAS_INT8_DOT = INT8_DOT is not None

# "vnni": the packed int8 kernels of kernels/vnni.py (AVX-512 VNNI, or AVX2 as above); "generic":
# plain Numba loops that run anywhere
ISAS = ("vnni", "generic")


def _pick_isa() -> str:
    forced = os.environ.get("NUMBALM_ISA", "").strip().lower()
    if forced:
        if forced not in ISAS:
            raise ValueError(f"NUMBALM_ISA must be {' or '.join(ISAS)}, not {forced!r}")
        if forced == "vnni" and not HAS_INT8_DOT:
            raise ValueError("NUMBALM_ISA=vnni but this CPU has neither AVX-512 VNNI nor AVX2")
        return forced
    return "vnni" if HAS_INT8_DOT else "generic"


# The quantized-matmul path used when a caller does not ask for one (see kernels.qmatmul).
ISA = _pick_isa()

# --- threads --------------------------------------------------------------------------------
# Numba sizes its thread pool from NUMBA_NUM_THREADS when it is imported (all cores by default);
# setting the variable later changes nothing. `set_threads` narrows what parallel kernels use
# below that, for the calling thread only (Numba's setting is per thread): the engine calls it
# on its compute thread, the one thread that runs kernels (engine/compute.py).
_threads = 0  # 0: the whole pool


def max_threads() -> int:
    """The size of Numba's thread pool: the most a parallel kernel can use."""
    return numba.config.NUMBA_NUM_THREADS


def set_threads(n: int) -> None:
    """Parallel kernels called from this thread use `n` threads (1..max_threads())."""
    global _threads
    if not 1 <= n <= max_threads():
        raise ValueError(f"threads must be 1 to {max_threads()} (NUMBA_NUM_THREADS), got {n}")
    numba.set_num_threads(n)
    _threads = n


def compute_threads() -> int:
    """Threads a forward pass runs on, asked from any thread."""
    return _threads or max_threads()


GOOD_LAYERS = ("omp", "tbb")


def check_threading_layer() -> str:
    """Return Numba's threading layer name; log it, with a warning (and the cost) when it is
    not omp/tbb. `numbalm serve` shows this line at start-up."""
    # The layer is only chosen once a parallel kernel has run; run a tiny one.
    _touch_parallel(1)
    layer = numba.threading_layer()
    if layer not in GOOD_LAYERS:
        log.warning(
            "Numba threading layer is %r: parallel kernels run about 4x slower than with "
            "'omp' (install an OpenMP runtime, or tbb) and are not safe under concurrent calls",
            layer,
        )
    else:
        log.info("Numba threading layer: %s, %d threads", layer, compute_threads())
    return layer


@pnjit
def _touch_parallel(n):
    total = 0
    for i in numba.prange(n):
        total += i
    return total


def limit_blas_threads(n: int = 1) -> None:
    """Run OpenBLAS/MKL on `n` threads from now on (process-wide).

    The fast backend calls BLAS only for small products between Numba kernels (prefill
    attention, the few float projections). BLAS's own thread pool then fights the OpenMP
    threads that Numba's kernels leave spinning: measured here, Gemma-3 decode fell from
    ~80 to ~5 tok/s with both pools at 2 threads. One BLAS thread avoids the fight.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n, user_api="blas")
