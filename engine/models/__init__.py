"""One module per `general.architecture`; each exports `ModelArgs` and `Model`.

A module may also export `CAPABILITIES`, what its models can do (`engine.llm.CAPABILITIES`
names them); without it a model is a decoder that does everything. `SUPPORTED_KEYS` and
`ROPE_SCALING` say which maths-changing metadata it implements (`support.py`).
"""

from __future__ import annotations

from ..errors import GGUFError
from ..gguf_file import GGUFFile
from . import bert, gemma2, gemma3, llama, phi3, qwen2, qwen3
from .support import TensorUse, check_metadata, check_tensors_read

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
    gf.tensors = use = TensorUse(tensors)  # the model reads its tensors through this
    try:
        model = module.Model(args, gf, backend)
    finally:
        gf.tensors = tensors
    check_tensors_read(gf, use.unread())
    return module, args, model
