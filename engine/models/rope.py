"""RoPE and its scalings: the frequency each pair of a head turns at.

Plain RoPE turns pair i (of head_dim/2) by `pos * base^(-2i/head_dim)`. Models trained for a
longer context than their base change those frequencies, each in its own way; in a GGUF file:

- `linear` (`rope.scaling.type = linear`, `rope.scaling.factor = f`): every frequency / f,
  i.e. positions are squeezed f-fold (Llama 2 long-context fine-tunes, Gemma 3 4B+ globals);
- `llama3` (Llama 3.1/3.2): the converter stores the per-pair divisors as the tensor
  `rope_freqs.weight` (hd/2,): 1 for high frequencies, the factor (8) for low ones, smoothed
  between (transformers' `_compute_llama3_parameters`);
- `longrope` / `su` (Phi-3, Phi-3.5): two divisor tensors, `rope_factors_short.weight` for a
  context within the original one and `rope_factors_long.weight` beyond it, and the rotation
  scaled by `rope.scaling.attn_factor` (sqrt(1 + ln(s) / ln(original context))).

`Rope.inv_freq` is None for plain RoPE (base^(-2i/hd), `kernels.norms.rope_inv_freq`) and the
(hd/2,) float64 frequencies otherwise. Either way a forward pass turns them into one table of
angles for all its rows (`Rope.table`), which every layer's q and k then rotate by
(`Rope.rotate`). Yarn is not implemented, so `support.py` refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.dequant import dequantize
from kernels.norms import rope_inv_freq

from ..gguf_file import GGUFFile


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, the key of a pass's tables
class Rope:
    base: float
    neox: bool  # rotate halves (i, i + hd/2) instead of adjacent pairs (2i, 2i + 1)
    inv_freq: np.ndarray | None = None  # (hd/2,) float64 when scaled; None: base^(-2i/hd)
    mscale: float = 1.0  # the rotation's scale (longrope's attention factor)

    def table(self, backend, positions: np.ndarray, head_dim: int) -> np.ndarray:
        """The rows' rotary angles, positions (n,) -> (n, 2, hd/2), once per forward pass."""
        inv_freq = rope_inv_freq(self.base, head_dim) if self.inv_freq is None else self.inv_freq
        return backend.rope_table(positions, inv_freq, self.mscale)

    def rotate(self, backend, x: np.ndarray, tables: dict) -> np.ndarray:
        """x (n, heads, hd) rotated by this RoPE's table of the pass (`tables[self]`)."""
        return backend.rope(x, tables[self], self.neox)


def _vector(gf: GGUFFile, name: str) -> np.ndarray | None:
    t = gf.tensors.get(name)
    return None if t is None else dequantize(t.data, t.qtype, t.shape).reshape(-1)


def rope_from_gguf(gf: GGUFFile, base: float, head_dim: int, neox: bool,
                   n_ctx: int) -> Rope:
    """The file's RoPE: plain, linear, llama3 (`rope_freqs`) or longrope (`rope_factors_*`).

    Longrope takes the long factors when the model runs beyond its original context
    (`n_ctx` > `rope.scaling.original_context_length`), as llama.cpp does.
    """
    divisor = np.ones(head_dim // 2)
    scaled = False
    if gf.arch("rope.scaling.type", "none") == "linear":
        divisor = divisor * float(gf.arch("rope.scaling.factor", 1.0))
        scaled = True
    freqs = _vector(gf, "rope_freqs.weight")  # llama3
    if freqs is not None:
        divisor, scaled = divisor * freqs, True
    short, long = _vector(gf, "rope_factors_short.weight"), _vector(gf, "rope_factors_long.weight")
    mscale = 1.0
    if short is not None or long is not None:
        original = int(gf.arch("rope.scaling.original_context_length", n_ctx))
        pick = long if (n_ctx > original and long is not None) or short is None else short
        divisor, scaled = divisor * pick, True
        mscale = float(gf.arch("rope.scaling.attn_factor", 1.0))
    if not scaled:
        return Rope(base, neox)
    return Rope(base, neox, rope_inv_freq(base, head_dim) / divisor, mscale)
