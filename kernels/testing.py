"""Random but valid GGUF tensors, for tests and benchmarks that need no model file."""

from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

# byte offsets of the float16 scale fields in each block (d, dmin, m)
F16_FIELDS = {
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.Q8_0: [0],
    Q.Q2_K: [80, 82],
    Q.Q3_K: [108],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
}


def random_tensor(qtype, shape: tuple, seed: int = 0) -> np.ndarray:
    """Random raw bytes of a GGUF tensor `shape` (NumPy order) with scales in [1e-3, 2e-2]."""
    rng = np.random.default_rng(seed)
    if qtype == Q.F32:
        return rng.standard_normal(shape).astype(np.float32).view(np.uint8).reshape(-1)
    if qtype == Q.F16:
        return rng.standard_normal(shape).astype(np.float16).view(np.uint8).reshape(-1)
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (int(np.prod(shape)) // block, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scale = rng.uniform(1e-3, 2e-2, blocks.shape[0]).astype(np.float16)
        blocks[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(-1)
