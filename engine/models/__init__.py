"""One module per `general.architecture`; each exports `ModelArgs` and `Model`.

A module may also export `CAPABILITIES`, what its models can do (`CAPABILITIES` below
names them); without it a model is a decoder that does everything. `SUPPORTED_KEYS` and
`ROPE_SCALING` say which maths-changing metadata it implements (`support.py`).
"""

from __future__ import annotations

from ..errors import GGUFError
from ..gguf_file import GGUFFile
from . import bert, gemma2, gemma3, llama, phi3, qwen2, qwen3
from .support import MATH_KEYS, TensorUse, check_metadata, check_tensors_read, is_off

# What a model can do; a module may narrow it with its own CAPABILITIES (bert: embeddings).
CAPABILITIES = frozenset({"completion", "chat", "embeddings"})
# tensors that turn on a feature by being there
FEATURE_TENSORS = {"rope_freqs.weight": "rope scaling llama3 (rope_freqs)",
                   "rope_factors_long.weight": "rope scaling longrope (rope_factors_*)"}

ARCHITECTURES = {"llama": llama, "qwen2": qwen2, "qwen3": qwen3, "phi3": phi3,
                 "gemma2": gemma2, "gemma3": gemma3, "bert": bert}


def architecture_module(name: str, path: str = "model"):
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise GGUFError(f"{path}: architecture {name!r} cannot run here "
                        f"(numbalm runs {known})") from None


def build_model(gf: GGUFFile, backend):
    """The file's network on `backend` -> (module, args, model). Refuses a file that asks for
    maths its module does not implement: metadata before any weight is prepared, tensors the
    model did not read after."""
    module = architecture_module(gf.architecture, gf.path)
    args = module.ModelArgs.from_gguf(gf)
    check_metadata(gf, module, getattr(args, "head_dim", 0))
    tensors = gf.tensors
    gf.tensors = use = TensorUse(tensors, gf.path)  # the model reads its tensors through this
    try:
        model = module.Model(args, gf, backend)
    finally:
        gf.tensors = tensors
    check_tensors_read(gf, use.unread())
    return module, args, model


def capabilities(name: str) -> frozenset[str]:
    """What a model of architecture `name` can do: "completion", "chat", "embeddings"."""
    return frozenset(getattr(ARCHITECTURES[name], "CAPABILITIES", CAPABILITIES))


class _NoWeights:
    """A backend that prepares nothing: building a model on it runs every load-time check
    (metadata, tensor names and shapes read) without repacking a weight."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def describe(gf: GGUFFile) -> dict:
    """Whether numbalm runs this file, what it can do and which maths features it uses,
    without loading its weights: {"supported", "refused" (the error or None),
    "capabilities", "features"}."""
    features = [f"{key} = {gf.arch(key)}" for key, off in MATH_KEYS.items()
                if gf.arch(key) is not None and not is_off(gf.arch(key), off)]
    features += [what for name, what in FEATURE_TENSORS.items() if name in gf.tensors]
    try:
        build_model(gf, _NoWeights())
    except GGUFError as e:
        return {"supported": False, "refused": str(e), "capabilities": [],
                "features": features}
    return {"supported": True, "refused": None,
            "capabilities": sorted(capabilities(gf.architecture)), "features": features}
