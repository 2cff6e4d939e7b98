"""Grammar-constrained decoding: JSON mode, JSON schemas and tool calls, through llguidance.

A request that must follow a grammar carries it as text in `SamplingParams.grammar` (an
llguidance grammar: Lark with `%json {schema}` rules, or a compiled JSON schema). Each such
request gets a `Constraint` when it is admitted: before every sample it gives the set of
tokens that keep the output inside the grammar, and it advances with the sampled token.

    grammars = Grammars(tokenizer, vocab_size=49152, eos_ids=[2])
    g = json_schema_grammar({"type": "object", ...}, strict=True)
    grammars.check(g)              # QtError naming the problem: a 400 before any work
    c = grammars.constraint(g)     # per request
    allowed = c.allowed()          # (vocab,) bool; EOS only once the value is complete
    c.advance(token)

Why llguidance (LOG.md 2026-12-01, `benchmarks/grammar_probe.py`): no dependencies beyond its
wheel (xgrammar's pull triton), grammars compile in about a millisecond (outlines-core took 1-2 s
for a nested schema, and ignored minimum / maximum), and a mask costs 10-20 µs per token at the
median on SmolLM2's 49k vocabulary. xgrammar's masks are ~5x cheaper still, a difference that is
small beside a forward pass.

JSON is written without free whitespace (`", "` and `": "` separators, no newlines): a small
model given free whitespace can pad for ever, and this is the layout models see most.
"""

from __future__ import annotations

import functools
import json
import threading

import llguidance
import numpy as np
import torch

from qt_serve.errors import QtError

# One JSON layout for every schema; a schema's own "x-guidance" key may change it.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def closed(schema):
    """OpenAI's strict mode: every object schema that does not say otherwise allows no properties beyond
    its own (OpenAI requires `additionalProperties: false` there; qt supplies it). Without it a small
    model invents keys and values until max_tokens (LOG.md 2026-12-01)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in ("enum", "const", "default", "examples") else closed(v) for k, v in schema.items()}
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


def guided(schema: dict, lenient: bool) -> dict:
    """`schema` with qt's JSON layout; lenient: keywords llguidance does not implement are ignored."""
    return {**schema, "x-guidance": {**JSON_LAYOUT, "lenient": lenient, **schema.get("x-guidance", {})}}


def json_schema_grammar(schema: dict, strict: bool = True) -> str:
    """The grammar of JSON values that validate against `schema`. Strict (OpenAI's `strict: true`):
    objects are `closed`, and a keyword llguidance does not implement is an error; not strict: the
    schema as given, such keywords ignored."""
    if not isinstance(schema, dict):
        raise QtError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(guided(closed(schema) if strict else schema, not strict))
    except ValueError as e:
        raise QtError(f"the JSON schema is not usable: {e}") from None


def lark_grammar(lark: str) -> str:
    return llguidance.LLMatcher.grammar_from_lark(lark)


def lark_json(schema: dict, lenient: bool) -> str:
    """A Lark rule body for a JSON value validating against `schema`, in qt's JSON layout."""
    return "%json " + json.dumps(guided(schema, lenient))


def lark_literal(text: str) -> str:
    return json.dumps(text)  # a Lark string literal is a JSON string


class Grammars:
    """One model's grammar machinery: its tokenizer as llguidance sees it (built on first use,
    ~0.5 s for a 49k vocabulary) and the constraints made with it."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, list(eos_ids)
        self._ll: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def ll(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                if self.tokenizer is None:
                    raise QtError("structured output needs the model's tokenizer, and this model has none")
                if not self.eos_ids:
                    raise QtError("structured output needs an end-of-sequence token, and this model has none")
                self._ll = llguidance.LLTokenizer(self.tokenizer.tok.to_str(), n_vocab=self.vocab_size,
                                                  eos_token=self.eos_ids)
            return self._ll

    def check(self, grammar: str) -> None:
        """Raise a QtError naming what is wrong with `grammar` (an unsupported keyword, a bad regex)."""
        self.compiled(grammar)

    @functools.lru_cache(maxsize=64)  # noqa: B019 -- one Grammars per served model, kept for its life
    def compiled(self, grammar: str) -> llguidance.LLMatcher:
        """A matcher at the start of `grammar`, never advanced: requests take copies (~2 µs; a new
        matcher would compile the grammar again), so a schema sent again is compiled once."""
        m = llguidance.LLMatcher(self.ll, grammar, log_level=0)
        if m.is_error():
            raise QtError(f"the grammar cannot be used: {m.get_error()}")
        return m

    def constraint(self, grammar: str) -> Constraint:
        return Constraint(self.compiled(grammar).deep_copy(), self.vocab_size)


class Constraint:
    """One request's position in its grammar: which tokens may come next, advanced token by token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size
        self.words = np.empty((vocab_size + 31) // 32, dtype=np.int32)  # 1 bit per token, token 0 the lowest

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool: the tokens that keep the output inside the grammar (only EOS once it is complete)."""
        self.matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        bits = np.unpackbits(self.words.view(np.uint8), bitorder="little")[:self.vocab_size]  # 5 µs for 49k
        return torch.from_numpy(bits.view(np.bool_))

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise QtError(f"token {token} breaks the grammar: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """Nothing more can follow (the grammar ended, or its EOS was taken)."""
        return self.matcher.is_stopped()
