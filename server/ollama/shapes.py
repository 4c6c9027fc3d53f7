"""Ollama's response objects: chat and generate chunks, timings, and model descriptions.

Durations are integers in nanoseconds, as Ollama sends them: `total_duration` (arrival to the
end), `load_duration` (0: numbalm loads its models before it is ready), `prompt_eval_duration`
(admission to the first token), `eval_duration` (first token to the end).
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone

from engine.registry import Registry
from server.serving.toolcalls import ToolCall

NS = 1_000_000_000


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, timezone.utc).isoformat().replace("+00:00", "Z")


def timings(stats, prompt_tokens: int) -> dict:
    """The final chunk's counts and durations (ns) from the request's `Stats`."""
    end = time.perf_counter()
    first = stats.first_token or end
    return {"total_duration": int((end - stats.start) * NS), "load_duration": 0,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": int(max(first - stats.admitted, 0) * NS),
            "eval_count": stats.completion_tokens,
            "eval_duration": int(max(end - first, 0) * NS)}


def tool_calls(calls: list[ToolCall]) -> list[dict]:
    """Parsed calls in Ollama's form: arguments as an object (OpenAI's: a JSON string)."""
    out = []
    for call in calls:
        try:
            args = json.loads(call.arguments or "{}")
        except ValueError:  # cut short by max_tokens: pass on what there is
            args = {"_unparsed": call.arguments}
        out.append({"function": {"index": call.index, "name": call.name, "arguments": args}})
    return out


# --- models -----------------------------------------------------------------------------------

def capabilities(served) -> list[str]:
    """Ollama's names: "completion" (generates; "tools" too when it can chat, numbalm's tool
    calls work with any chat template), "embedding" for a model that only embeds."""
    caps = set(served.capabilities)
    out = []
    if "completion" in caps:
        out.append("completion")
    if "chat" in caps:
        out.append("tools")
    if caps == {"embeddings"}:
        out.append("embedding")
    return out


def _entry(served):
    """The registry's entry for a served model (None for a file outside it, or a test's)."""
    if not served.source:
        return None
    try:
        return Registry().find(served.source)
    except Exception:  # noqa: BLE001 - an unreadable manifest only costs the details
        return None


def _parameter_size(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _quantization(quant_mix: dict[str, int]) -> str:
    """The type most weight tensors have (F32 norms aside): "Q4_1" for SmolLM2."""
    weights = {k: v for k, v in quant_mix.items() if k != "F32"} or quant_mix
    return max(weights, key=weights.get) if weights else ""


def describe(served) -> dict:
    """One model as /api/tags and /api/ps list it."""
    llm, entry = served.llm, _entry(served)
    size = entry.size if entry else 0
    if not entry and served.source and os.path.isfile(served.source):
        size = os.path.getsize(served.source)
    details = {"parent_model": "", "format": "gguf", "family": llm.architecture,
               "families": [llm.architecture],
               "parameter_size": _parameter_size(entry.parameter_count) if entry else "",
               "quantization_level": _quantization(entry.quant_mix) if entry else ""}
    return {"name": served.id, "model": served.id, "modified_at": _iso(served.created),
            "size": size, "digest": entry.sha256 if entry else "", "details": details}


def model_info(llm) -> dict:
    """/api/show's `model_info`: the GGUF metadata, big arrays (the vocabulary) left out as
    Ollama leaves them out unless asked for `verbose`."""
    info = {}
    for key, value in llm.metadata.items():
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, list) and len(value) > 64:
            continue
        info[key] = value
    info["general.architecture"] = llm.architecture
    info[f"{llm.architecture}.context_length"] = llm.n_ctx
    info[f"{llm.architecture}.embedding_length"] = llm.dim
    return info


def show(served) -> dict:
    llm = served.llm
    base = describe(served)
    return {"modelfile": f"# served by numbalm\nFROM {served.source or served.id}\n",
            "parameters": "", "template": llm.chat_template or "",
            "details": base["details"], "model_info": model_info(llm),
            "capabilities": capabilities(served), "modified_at": base["modified_at"]}
