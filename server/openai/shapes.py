"""OpenAI response shapes: completion objects, stream chunks, usage and logprobs."""

from __future__ import annotations

import hashlib
import time

from engine import __version__
from server.serving.generation import ChoiceResult, Plan, prompt_logprobs
from server.serving.ids import new_id
from server.serving.toolcalls import Delta, finish_reason


def fingerprint(model_id: str, backend: str = "") -> str:
    digest = hashlib.sha256(f"numbalm {__version__} {model_id} {backend}".encode()).hexdigest()
    return "fp_" + digest[:10]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens the prefix cache had."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class Shaper:
    """Builds one request's response objects; id, created and fingerprint are shared."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.chat = plan.req.kind == "chat"
        self.id = new_id("chatcmpl-" if self.chat else "cmpl-")
        self.created = int(time.time())
        self.model = plan.served.id
        self.tokenizer = plan.served.llm.tokenizer
        self.fingerprint = fingerprint(self.model, plan.served.llm.backend_name)

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint, "choices": choices}

    # --- token text -------------------------------------------------------------------------

    def token_text(self, id: int) -> tuple[str, list[int]]:
        raw = bytes(self.tokenizer.token_bytes(id))
        try:
            return raw.decode("utf-8"), list(raw)
        except UnicodeDecodeError:  # part of a multi-byte character, shown as OpenAI does
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)

    def chat_logprob(self, id: int, logprob: float, top) -> dict:
        text, raw = self.token_text(id)
        alts = []
        for alt_id, alt_lp in top or []:
            alt_text, alt_raw = self.token_text(alt_id)
            alts.append({"token": alt_text, "logprob": alt_lp, "bytes": alt_raw})
        return {"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": alts}

    def chat_logprobs(self, tokens) -> dict | None:
        if self.plan.req.logprobs is None:
            return None
        return {"content": [self.chat_logprob(t.id, t.logprob, t.top_logprobs) for t in tokens],
                "refusal": None}

    def legacy_logprobs(self, entries, offset: int) -> dict | None:
        """entries: [(id, logprob, top)]; text_offset counts characters from `offset`."""
        if self.plan.req.logprobs is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for id, logprob, top in entries:
            text, _ = self.token_text(id)
            out["tokens"].append(text)
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(
                None if logprob is None else {self.token_text(a)[0]: lp for a, lp in top or []})
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    def echo_entries(self, prompt) -> list:
        if self.plan.req.logprobs is None:
            return []
        lps = prompt_logprobs(self.plan.served.llm, prompt.ids, self.plan.req.logprobs)
        return [(id, lp, top) for id, (lp, top) in zip(prompt.ids, lps, strict=True)]

    # --- whole responses --------------------------------------------------------------------

    def completion(self, results: list[ChoiceResult], completion_tokens: int,
                   cached_tokens: int = 0) -> dict:
        choices = [self._chat_choice(r) if self.chat else self._text_choice(r) for r in results]
        body = self._envelope("chat.completion" if self.chat else "text_completion", choices)
        body["usage"] = usage(self.plan.prompt_tokens, completion_tokens, cached_tokens)
        return body

    def _chat_choice(self, r: ChoiceResult) -> dict:
        message = {"role": "assistant", "content": r.text, "refusal": None}
        finish = r.finish_reason
        if r.parser is not None and r.parser.calls:
            message["content"] = None
            message["tool_calls"] = [c.openai() for c in r.parser.calls]
            finish = finish_reason(finish, r.parser.calls)
        return {"index": r.index, "message": message,
                "logprobs": self.chat_logprobs(r.tokens), "finish_reason": finish}

    # --- tool calls -------------------------------------------------------------------------

    def delta_chunk(self, index: int, delta: Delta | None, logprobs=None) -> dict | None:
        """A chunk for what the parser let through (None when nothing is worth sending)."""
        body = {}
        if delta is not None and delta.content:
            body["content"] = delta.content
        if delta is not None and delta.calls:
            body["tool_calls"] = delta.calls
        if not body and not (logprobs and logprobs["content"]):
            return None
        return self.chat_chunk(index, body, logprobs=logprobs)

    def _text_choice(self, r: ChoiceResult) -> dict:
        echo = r.prompt.text if self.plan.req.echo else ""
        entries = self.echo_entries(r.prompt) if echo else []
        entries += [(t.id, t.logprob, t.top_logprobs) for t in r.tokens]
        return {"index": r.index, "text": echo + r.text, "finish_reason": r.finish_reason,
                "logprobs": self.legacy_logprobs(entries, 0)}

    # --- stream chunks ----------------------------------------------------------------------

    def chat_chunk(self, index: int, delta: dict, finish=None, logprobs=None) -> dict:
        chunk = self._envelope("chat.completion.chunk", [
            {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
        if self.plan.req.include_usage:
            chunk["usage"] = None
        return chunk

    def text_chunk(self, index: int, text: str, finish=None, logprobs=None) -> dict:
        chunk = self._envelope("text_completion", [
            {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}])
        if self.plan.req.include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, completion_tokens: int, cached_tokens: int = 0) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        chunk = self._envelope(obj, [])
        chunk["usage"] = usage(self.plan.prompt_tokens, completion_tokens, cached_tokens)
        return chunk
