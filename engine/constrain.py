"""Constrained decoding: a grammar (JSON schema, any JSON object, Lark) → a token mask per step.

    grammar = Grammar.json_schema({"type": "object", ...})     # validated here: GrammarError
    model.compile_grammar(grammar)                              # optional: checks it for this model
    for tok in model.generate(ids, grammar=grammar): ...        # every token keeps the text valid

llguidance (github.com/guidance-ai/llguidance) does the parsing: for each step it computes the
set of tokens that keep the output a prefix of some string in the grammar, as a bitmask
(`kernels.mask`). It works on the bytes of tokens, so it is given our vocabulary as bytes
(`Tokenizer.token_bytes`), our end-of-turn ids as EOS, and our own encoder.

- `Grammar` is model-independent and immutable, hence safe to share between threads and
  requests. It keeps one compiled matcher per tokenizer and deep-copies it per generation.
- `Constraint` is the state of one generation: `fill_mask()` (drops the GIL, so it can run in a
  thread while the model computes logits), `mask`, `consume(token)`, `is_complete`, and the
  `ending` that would finish the grammar from here (engine/landing.py), which lets the decoder
  land a reply inside max_tokens (`ending_after`, `landing_mask`).
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from . import landing
from .errors import EngineError

# llguidance's JSON output style: whitespace between tokens is allowed but bounded, per gap
# one line break and up to 24 spaces or tabs of indentation, or 1-4 spaces or tabs. The bound
# matters both ways (SmolLM2, json_object, 50 samples at temperature 1.0):
# - unbounded, a small model wanders into runs of newlines and spaces that never end;
# - none at all (a fixed ", " and ": "), it cannot write `{` and a line break, the way it
#   learned to print JSON; off that path it wrote keys like ", " and digits without end
#   (3 of 50 never closed with the default truncation, 1 of 50 with none);
# - bounded: 50 of 50 with the default truncation, and on every schema in the tests.
# A schema may still choose its own style with "x-guidance"; it cannot turn on `lenient`
# (that is `strict=False`'s job).
JSON_STYLE = {"whitespace_flexible": True,
              "whitespace_pattern": r"(\r?\n[ \t]{0,24})|[ \t]{1,4}"}


class GrammarError(EngineError):
    """A schema or grammar the engine cannot enforce; the message is fit for a 400.

    `keyword` names the JSON-schema keyword at fault when there is one.
    """

    def __init__(self, message: str, keyword: str | None = None):
        super().__init__(message)
        self.keyword = keyword


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - declared dependency
        raise GrammarError("structured output needs the llguidance package "
                           "(pip install llguidance)") from e
    return llguidance


# -- the tokenizer, as llguidance sees it ---------------------------------------------------

_LL_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SPELLINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LL_LOCK = threading.Lock()


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: token bytes, special ids, EOS, an encoder."""

    def __init__(self, tokenizer):
        # A weak reference: llguidance keeps this object alive, and the caches above are keyed
        # weakly on the tokenizer, which a strong reference here would pin forever.
        self._tokenizer = weakref.ref(tokenizer)
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = special_token_ids(tokenizer)
        special = set(self.special_token_ids)
        # llguidance's convention: a leading 0xFF byte (never valid UTF-8) marks a special
        # token, which grammars can name (<|im_end|>) but text can never produce.
        self.tokens = [b"\xff" + tokenizer.token_bytes(i) if i in special
                       else tokenizer.token_bytes(i) for i in range(tokenizer.n_vocab)]

    def __call__(self, text: str) -> list[int]:
        """Plain text → ids with the engine's own encoder (no BOS, control text stays text)."""
        if not isinstance(text, str):
            raise TypeError("expects str")  # tells llguidance to hand us str, not bytes
        return self._tokenizer().encode(text, add_bos=False, special=False)


def special_token_ids(tokenizer) -> list[int]:
    """Ids that are not text: control/unknown/unused tokens, and user-defined ones spelled
    like `<...>` (llama.cpp's rule: those are markers such as `<start_of_image>`)."""
    from .tokenizer import USER_DEFINED

    out = []
    for i in range(tokenizer.n_vocab):
        if tokenizer.is_control(i):
            out.append(i)
        elif tokenizer.token_types[i] == USER_DEFINED:
            text = tokenizer.tokens[i]
            if text.startswith("<") and text.endswith(">"):
                out.append(i)
    return out


def ll_tokenizer(tokenizer):
    """The llguidance LLTokenizer for one engine Tokenizer, built once and cached (~0.2 s for
    49k tokens). Every end-of-turn id counts as EOS: the grammar allows it once complete."""
    with _LL_LOCK:
        cached = _LL_TOKENIZERS.get(tokenizer)
        if cached is None:
            llg = _llguidance()
            eos = sorted(tokenizer.eot_ids) or [tokenizer.eos_id]
            cached = llg.LLTokenizer(llg.TokenizerWrapper(_Vocabulary(tokenizer)),
                                     n_vocab=tokenizer.n_vocab, eos_token=eos)
            _LL_TOKENIZERS[tokenizer] = cached
        return cached


def spelling(tokenizer) -> landing.Spelling:
    """The tokens of one engine Tokenizer by their bytes, for landing (built once, ~0.1 s)."""
    with _LL_LOCK:
        cached = _SPELLINGS.get(tokenizer)
        if cached is None:
            cached = landing.Spelling(tokenizer, set(special_token_ids(tokenizer)))
            _SPELLINGS[tokenizer] = cached
        return cached


# -- grammars -------------------------------------------------------------------------------

_UNIMPLEMENTED = re.compile(r'Unimplemented keys: \["([^"]+)"')


class Grammar:
    """A compiled, reusable grammar; build it with `json_schema`, `json_object` or `lark`.

    Construction validates it (so a server can answer 400 before admitting the request);
    anything the engine cannot enforce raises `GrammarError`, never a silent downgrade.
    """

    def __init__(self, spec: str, kind: str, where: str, warnings: tuple[str, ...] = ()):
        self.spec = spec  # llguidance's serialized grammar
        self.kind = kind  # "json_schema", "json_object" or "lark"
        self.where = where  # names the request field in error messages
        self.warnings = warnings
        self._matchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Grammar.{self.kind}(...)"

    @classmethod
    def json_schema(cls, schema: dict, strict: bool = True,
                    where: str = "json_schema") -> Grammar:
        """Output must be JSON valid against `schema` (a dict, JSON Schema draft 2020-12).

        `strict=True`: a keyword llguidance cannot enforce (uniqueItems, contains, not,
        if/then/else, dependentRequired, propertyNames, unevaluatedProperties, …) is a
        GrammarError naming it. `strict=False` drops such keywords, enforces the rest, and
        lists what was dropped in `.warnings` (opt-in only; OpenAI's `strict` flag is not
        this: a server should keep the default). `where` prefixes error messages, e.g.
        "response_format.json_schema".
        """
        if schema is True:
            schema = {}
        if schema is False:
            raise GrammarError(f"{where}: the schema `false` matches no output")
        if not isinstance(schema, dict):
            raise GrammarError(f"{where}: the schema must be a JSON object, "
                               f"not {type(schema).__name__}")
        llg = _llguidance()
        try:
            spec = llg.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults=JSON_STYLE, overrides={"lenient": not strict})
        except (ValueError, TypeError) as e:
            raise GrammarError(f"{where}: {e}") from None
        return cls(spec, "json_schema", where, _validate(spec, where))

    @classmethod
    def json_object(cls, where: str = "response_format") -> Grammar:
        """Output must be one JSON object (any keys, any values): OpenAI's json_object mode."""
        return cls.json_schema({"type": "object"}, where=where)._renamed("json_object")

    @classmethod
    def lark(cls, text: str, where: str = "grammar") -> Grammar:
        """llguidance's Lark syntax (docs/syntax.md in its repository): rules, regexes,
        `%json{...}` for an embedded JSON schema, `<|im_end|>`-style special tokens."""
        if not isinstance(text, str) or not text.strip():
            raise GrammarError(f"{where}: a Lark grammar must be a non-empty string")
        spec = _llguidance().LLMatcher.grammar_from_lark(text)
        return cls(spec, "lark", where, _validate(spec, where))

    def _renamed(self, kind: str) -> Grammar:
        self.kind = kind
        return self

    # -- per model --------------------------------------------------------------------------

    def compile_for(self, tokenizer):
        """The matcher for this tokenizer, built once (checks tokenizer-specific parts such
        as special-token names); GrammarError if the grammar does not fit this vocabulary."""
        with self._lock:
            template = self._matchers.get(tokenizer)
            if template is None:
                llt = ll_tokenizer(tokenizer)
                template = _llguidance().LLMatcher(llt, self.spec, log_level=0)
                if template.is_error():
                    raise _error(template.get_error(), self.where)
                self._matchers[tokenizer] = template
            return template

    def start(self, tokenizer) -> Constraint:
        """Fresh state for one generation."""
        template = self.compile_for(tokenizer)
        with self._lock:
            matcher = template.deep_copy()
        return Constraint(matcher, tokenizer)


def _validate(spec: str, where: str, tokenizer=None) -> tuple[str, ...]:
    """llguidance's validator → GrammarError on an error, the warnings otherwise."""
    is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(spec, tokenizer)
    if is_error:
        raise _error(messages[0] if messages else "invalid grammar", where)
    return tuple(messages)


def _error(message: str, where: str) -> GrammarError:
    """llguidance's message → GrammarError; an unimplemented keyword is named as such."""
    unimplemented = _UNIMPLEMENTED.search(message)
    if unimplemented:
        keyword = unimplemented.group(1)
        return GrammarError(f"{where}: keyword {keyword!r} is not supported", keyword=keyword)
    return GrammarError(f"{where}: {message.strip()}")


# -- one generation ---------------------------------------------------------------------------

def _spare_core() -> bool:
    """True when the machine has a core that Numba's forward-pass threads do not use."""
    import os

    from kernels import jit

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (cores or 1) > jit.compute_threads()


# With a spare core, the next mask is computed in a worker thread while the model runs its
# forward pass (llguidance drops the GIL). Without one, that thread takes a core from the
# forward pass's parallel loops, which then wait for it: on 2 cores and 2 Numba threads it
# cost 7-15 % per token against 0-4 % computed in the generating thread after the forward
# pass (bench/constrain_bench.py measures both). None decides on first use (asking Numba for
# its thread count starts its threads); True or False forces either.
_MASK_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="numbalm-mask")
OVERLAP_MASK: bool | None = None


class Constraint:
    """The grammar state of one generation: which tokens may come next, and how it could end."""

    def __init__(self, matcher, tokenizer):
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        self.matcher = matcher
        self._bitmask = allocate_token_bitmask(1, tokenizer.n_vocab)  # (1, n_words) int32
        self._fill = fill_next_token_bitmask
        self._pending: Future | None = None
        global OVERLAP_MASK
        if OVERLAP_MASK is None:
            OVERLAP_MASK = _spare_core()
        self._overlap = OVERLAP_MASK
        self._tokenizer = tokenizer
        self._eot = sorted(tokenizer.eot_ids) or [tokenizer.eos_id]
        self._spelling = spelling(tokenizer)
        self._strings = landing.JsonStrings()
        self._peeked: tuple[int, landing.Ending | None] | None = None
        self._misses = 0  # searches that found no ending (landing.MAX_MISSES: stop looking)
        self.ending: landing.Ending | None = None
        self.ending = self._search(self._strings)

    def fill_mask(self) -> None:
        """Compute the mask for the next token (after the tokens consumed so far)."""
        self._fill(self.matcher, self._bitmask)

    def fill_mask_async(self) -> None:
        """Start `fill_mask` in a worker thread (`mask` waits for it), or run it now when
        there is no spare core to overlap it with the forward pass (OVERLAP_MASK)."""
        if self._overlap:
            self._pending = _MASK_POOL.submit(self.fill_mask)
        else:
            self.fill_mask()

    @property
    def mask(self) -> np.ndarray:
        """The allowed next tokens: (n_words,) int32, bit i of word i // 32 = token i."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
        self._check()
        return self._bitmask[0]

    def consume(self, token: int) -> None:
        """Advance past a sampled token (it must have been allowed)."""
        token = int(token)
        peeked, self._peeked = self._peeked, None
        if not self.matcher.consume_token(token):
            self._check()
        data = self._tokenizer.token_bytes(token)
        if peeked is not None and peeked[0] == token:
            ending = peeked[1]
        else:
            ending = self._next_ending(data, self._strings_after(data))
        self._strings.feed(data)
        self.ending = ending

    @property
    def is_complete(self) -> bool:
        """True when the grammar is satisfied and can take no more text."""
        return self.matcher.is_stopped()

    # -- landing (engine/landing.py) ----------------------------------------------------------

    def ending_after(self, token: int) -> landing.Ending | None:
        """The ending there would be after `token` (an allowed one), the state left as it is;
        end of turn, allowed once the grammar accepts, ends it at once (an empty ending)."""
        token = int(token)
        if token in self._eot:
            return self._spelling.spell(b"")
        if not self.matcher.consume_token(token):
            self._check()
        data = self._tokenizer.token_bytes(token)
        try:
            ending = self._next_ending(data, self._strings_after(data))
        finally:
            self.matcher.rollback(1)
        self._peeked = (token, ending)
        return ending

    def landing_mask(self, left: int) -> np.ndarray:
        """(n_words,) int32: the allowed tokens that begin the ending and leave its rest
        spellable in `left - 1` tokens, and end of turn where the grammar accepts."""
        ending = self.ending
        out = np.zeros_like(self.mask)
        tokens = self._spelling.first_tokens(ending, left) if ending is not None else []
        if ending is not None and ending.length == 0:
            tokens += self._eot
        for token in tokens:
            set_token(out, token)
        return out & self.mask

    def _strings_after(self, data: bytes) -> landing.JsonStrings:
        strings = self._strings.copy()
        strings.feed(data)
        return strings

    def _next_ending(self, data: bytes, strings: landing.JsonStrings) -> landing.Ending | None:
        """The ending once `data` (a token just consumed) is written: the rest of the old one
        when the token began it, the old one when it still fits, else a new one."""
        old = self.ending
        if old is not None and old.data.startswith(data):
            return old.after(len(data))
        if old is not None and landing.still_ends(self.matcher, old, self._spelling):
            return old
        return self._search(strings)

    def _search(self, strings: landing.JsonStrings) -> landing.Ending | None:
        """A new ending; a grammar that keeps yielding none (a pattern whose walk runs past
        MAX_ENDING, say) is not searched again, so it costs a few searches, not every token."""
        if self._misses >= landing.MAX_MISSES:
            return None
        ending = landing.find_ending(self.matcher, strings, self._spelling)
        self._misses = 0 if ending is not None else self._misses + 1
        return ending

    def _check(self) -> None:
        if self.matcher.is_error():
            raise EngineError(f"constrained decoding failed: {self.matcher.get_error()}")


def set_token(mask: np.ndarray, token: int) -> None:
    """Allow `token` in a (n_words,) int32 bitmask."""
    mask.view(np.uint32)[token >> 5] |= np.uint32(1 << (token & 31))


def clear_token(mask: np.ndarray, token: int) -> None:
    """Forbid `token` in a (n_words,) int32 bitmask."""
    mask.view(np.uint32)[token >> 5] &= np.uint32(~(1 << (token & 31)) & 0xFFFFFFFF)
