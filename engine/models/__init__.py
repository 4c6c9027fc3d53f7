"""One module per `general.architecture`; each exports `ModelArgs` and `Model`.

A module may also export `CAPABILITIES`, what its models can do; without it a model is a
decoder that does everything (`DECODER_CAPABILITIES`). A decoder chats only with a chat template:
a base model (no `tokenizer.chat_template`, none supplied) completes text and embeds.
"""

from __future__ import annotations

from ..errors import GGUFError
from . import bert, gemma3, llama

ARCHITECTURES = {"llama": llama, "gemma3": gemma3, "bert": bert}
DECODER_CAPABILITIES = frozenset({"completion", "chat", "embeddings"})


def architecture_module(name: str, path: str = "model"):
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise GGUFError(f"{path}: architecture {name!r} cannot run here "
                        f"(numbalm runs {known})") from None


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
