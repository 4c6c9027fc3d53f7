"""One module per `general.architecture`; each exports `ModelArgs` and `Model`.

A module may also export `CAPABILITIES`, what its models can do (`engine.llm.CAPABILITIES`
names them); without it a model is a decoder that does everything.
"""

from __future__ import annotations

from ..errors import GGUFError
from . import bert, gemma3, llama

ARCHITECTURES = {"llama": llama, "gemma3": gemma3, "bert": bert}


def architecture_module(name: str, path: str = "model"):
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise GGUFError(f"{path}: architecture {name!r} cannot run here "
                        f"(numbalm runs {known})") from None
