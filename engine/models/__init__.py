"""One module per `general.architecture`; each exports `ModelArgs` and `Model`."""

from __future__ import annotations

from ..errors import GGUFError
from . import gemma3, llama

ARCHITECTURES = {"llama": llama, "gemma3": gemma3}


def architecture_module(name: str, path: str = "model"):
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise GGUFError(f"{path}: architecture {name!r} cannot generate text here "
                        f"(numbalm runs {known})") from None
