"""What a file may ask of the maths, and the one check that numbalm does all of it.

A GGUF file can turn on features that change the numbers a model computes: RoPE scaling,
soft-capping, sliding windows, mixtures of experts, extra tensors such as biases. A feature a
module does not implement must never be ignored (a Llama 3 file run without its `rope_freqs`
agrees with transformers on the top token at only two positions in three), so loading refuses
the file and names every such feature:

- metadata: `MATH_KEYS` lists the `<arch>.` keys that change the maths, with the values that
  mean "off". A module names the keys it implements in `SUPPORTED_KEYS` and the RoPE scaling
  types it runs in `ROPE_SCALING` (llama.cpp's `rope.scaling.type`: none, linear, yarn,
  longrope); any other key set to something else is refused;
- `rope.dimension_count` below the head size (partial rotary embeddings) is refused;
- tensors: the model reads its tensors through `TensorUse`, and any tensor of the file it did
  not read (`blk.0.attn_q.bias` in a llama file, an unknown projection) is refused.
"""

from __future__ import annotations

import re

from ..errors import GGUFError
from ..gguf_file import GGUFFile, TensorInfo

# <arch>.key -> the values that mean "this feature is off"
MATH_KEYS = {
    "rope.scaling.type": ("none",),
    "rope.scaling.factor": (0.0, 1.0),
    "rope.scaling.attn_factor": (1.0,),
    "rope.scaling.yarn_log_multiplier": (0.0,),
    "rope.scaling.yarn_ext_factor": (0.0,),
    "rope.freq_scale": (1.0,),
    "rope.dimension_sections": (),
    "attention.sliding_window": (0,),
    "attention.scale": (0.0,),
    "attention.clamp_kqv": (0.0,),
    "attention.max_alibi_bias": (0.0,),
    "attn_logit_softcapping": (0.0,),
    "final_logit_softcapping": (0.0,),
    "expert_count": (0,),
    "embedding_scale": (1.0,),
    "residual_scale": (1.0,),
    "logit_scale": (1.0,),
    "attention.q_lora_rank": (0,),
    "attention.kv_lora_rank": (0,),
}


def check_metadata(gf: GGUFFile, module, head_dim: int) -> None:
    """Refuse a file whose metadata asks for maths `module` does not implement."""
    supported = getattr(module, "SUPPORTED_KEYS", frozenset())
    scaling = getattr(module, "ROPE_SCALING", frozenset({"none"}))
    problems = []
    for key, off in MATH_KEYS.items():
        value = gf.arch(key)
        if value is None or key in supported or is_off(value, off):
            continue
        problems.append(f"{gf.architecture}.{key} = {_show(value)}")
    kind = gf.arch("rope.scaling.type")
    if kind is not None and "rope.scaling.type" in supported and kind not in scaling:
        problems.append(f"{gf.architecture}.rope.scaling.type = {kind!r} (numbalm runs "
                        f"{', '.join(sorted(scaling))} for {gf.architecture})")
    rot = gf.arch("rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        problems.append(f"{gf.architecture}.rope.dimension_count = {rot} (partial rotary "
                        f"embeddings; numbalm rotates the whole head of {head_dim})")
    if problems:
        raise GGUFError(f"{gf.path}: this {gf.architecture} file uses features numbalm does "
                        f"not implement, refused rather than run wrong: {'; '.join(problems)}")


def is_off(value, off: tuple) -> bool:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return not any(value)
    if isinstance(value, str):
        return value.lower() in off
    return any(value == o for o in off)


def _show(value) -> str:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list) and len(value) > 8:
        return f"[{len(value)} values]"
    return repr(value)


class TensorUse(dict):
    """The file's tensors, noting which ones the model reads (`[]`, `get`); a tensor the
    model needs and the file lacks is a GGUFError naming it."""

    def __init__(self, tensors: dict[str, TensorInfo], path: str):
        super().__init__(tensors)
        self.path = path
        self.read: set[str] = set()

    def __getitem__(self, name: str) -> TensorInfo:
        self.read.add(name)
        if name not in self:
            raise GGUFError(f"{self.path}: missing tensor {name}")
        return super().__getitem__(name)

    def get(self, name: str, default=None):
        self.read.add(name)
        return super().get(name, default)

    def unread(self) -> list[str]:
        return [name for name in self if name not in self.read]


def check_tensors_read(gf: GGUFFile, unread: list[str]) -> None:
    """Refuse a file with tensors the model did not read, named by pattern ("blk.*.x" for
    every layer's)."""
    if not unread:
        return
    patterns: dict[str, int] = {}
    for name in unread:
        key = re.sub(r"^blk\.\d+\.", "blk.*.", name)
        patterns[key] = patterns.get(key, 0) + 1
    listed = ", ".join(p if n == 1 else f"{p} ({n} layers)" for p, n in patterns.items())
    raise GGUFError(f"{gf.path}: this {gf.architecture} file has tensors numbalm does not "
                    f"implement, refused rather than run wrong: {listed}")
