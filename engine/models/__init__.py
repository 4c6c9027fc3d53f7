"""One module per `general.architecture`; each exports `ModelArgs` and `Model`.

A module may also export `CAPABILITIES`, what its models can do; without it a model is a
decoder that does everything (`DECODER_CAPABILITIES`). A decoder chats only with a chat template:
a base model (no `tokenizer.chat_template`, none supplied) completes text and embeds.
`SUPPORTED_KEYS` and `ROPE_SCALING` say which maths-changing metadata it implements
(`support.py`).
"""

from __future__ import annotations

from ..errors import GGUFError
from ..gguf_file import GGUFFile
from . import bert, gemma2, gemma3, llama, phi3, qwen2, qwen3
from .support import MATH_KEYS, TensorUse, check_metadata, check_tensors_read, is_off

# What a decoder can do; a module may narrow it with its own CAPABILITIES (bert: embeddings).
DECODER_CAPABILITIES = frozenset({"completion", "chat", "embeddings"})
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
    except (GGUFError, ValueError) as e:  # ValueError: a tensor of the wrong size
        return {"supported": False, "refused": str(e), "capabilities": [],
                "features": features}
    return {"supported": True, "refused": None,
            "capabilities": sorted(capabilities(
                gf.architecture, "tokenizer.chat_template" in gf.metadata, gf.path)),
            "features": features}


def capabilities(architecture: str, has_chat_template: bool, path: str = "model") -> frozenset:
    """What a model of `architecture` can do: its module's CAPABILITIES (default: everything),
    less "chat" when it has no chat template. The one place that decides, for a loaded model
    (`LLM.capabilities`) and a registered one (`numbalm model list`)."""
    module = architecture_module(architecture, path)
    caps = frozenset(getattr(module, "CAPABILITIES", DECODER_CAPABILITIES))
    return caps if has_chat_template else caps - {"chat"}


def no_chat_message(model_id: str) -> str:
    """What a base model (no chat template) says when asked to chat."""
    return (f"model {model_id!r} has no chat template, so it cannot chat: it is a base model "
            f"that continues text. Use `numbalm generate` (or /v1/completions), or give it a "
            f"template with --chat-template FILE (or chatml, gemma)")
