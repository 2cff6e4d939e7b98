"""One request's decoding state: sampling, streaming detokenization, stop strings and budget.

Shared by every way of generating (`engine.Engine` steps many `Sequence`s at once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qt_serve.errors import QtError
from qt_serve.sampling import Choice, Sampler, SamplingParams, StopStrings
from qt_serve.structured import Grammars
from qt_serve.tokenizer import StreamDecoder


@dataclass
class Delta:
    """One step of a stream: new text (possibly empty while a character is incomplete)."""

    text: str
    token: Choice | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "timeout" | "error" on the last delta
    prompt_logprobs: list[Choice] | None = None  # scores of prompt tokens 1.., when the request asked


class Sequence:
    """One request's decoding state: its sampler, streaming detokenizer, stop strings and budget.

    `step(logits)` samples the next token and returns the text it adds; the delta that ends
    the sequence carries finish_reason.
    """

    def __init__(self, prompt: list[int], params: SamplingParams, vocab_size: int, eos_ids: list[int],
                 tokenizer, max_seq_len: int, device="cpu", grammars: Grammars | None = None):
        self.prompt, self.params = prompt, params
        constraint = None
        if params.grammar is not None:
            if grammars is None:
                raise QtError("this engine cannot constrain output to a grammar")
            constraint = grammars.constraint(params.grammar)
        self.sampler = Sampler(params, vocab_size, eos_ids, prompt, device=device, constraint=constraint)
        self.decoder = StreamDecoder(tokenizer, params.skip_special_tokens) if tokenizer else None
        self.stops = StopStrings(params.stop)
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.budget = min(params.max_tokens, max_seq_len - len(prompt))
        self.tokens: list[int] = []
        self.done = False

    @property
    def pos(self) -> int:
        """Position of the next token to feed (the last one sampled)."""
        return len(self.prompt) + len(self.tokens) - 1

    def _text(self, token: int | None = None) -> str:
        if self.decoder is None:
            return ""
        return self.decoder.flush() if token is None else self.decoder.push(token)

    def step(self, logits: torch.Tensor) -> Delta:
        choice = self.sampler(logits)
        self.tokens.append(choice.token)
        if choice.token in self.stop_ids and len(self.tokens) > self.params.min_tokens:
            text, _ = self.stops.push(self._text())
            return self._end(Delta(text + self.stops.flush(), choice, "stop"))
        text, hit = self.stops.push(self._text(choice.token))
        if hit:
            return self._end(Delta(text, choice, "stop"))
        constraint = self.sampler.constraint
        if constraint is not None and constraint.finished:  # the grammar allows nothing more (ignore_eos too)
            return self._end(Delta(text + self.stops.flush() + self._text(), choice, "stop"))
        if len(self.tokens) >= self.budget:
            tail, hit = self.stops.push(self._text())
            return self._end(Delta(text + tail + ("" if hit else self.stops.flush()), choice,
                                   "stop" if hit else "length"))
        return Delta(text, choice)

    def cancel(self) -> Delta:
        return self._end(Delta(self.stops.flush(), finish_reason="cancelled"))

    def _end(self, delta: Delta) -> Delta:
        self.done = True
        return delta


def check_prompt(ids: list[int], vocab_size: int, max_seq_len: int) -> None:
    """A prompt must be non-empty, in the vocabulary, and leave room for one new token."""
    if not ids:
        raise QtError("the prompt is empty: give at least one token")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise QtError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    if len(ids) >= max_seq_len:
        raise QtError(f"the prompt is {len(ids)} tokens but the context is {max_seq_len} tokens "
                      "(room is needed for at least one new token); shorten the prompt")


def prefix_len(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of a and b, at most `limit`."""
    n = 0
    for x, y in zip(a, b):
        if n >= limit or x != y:
            break
        n += 1
    return n


def eos_ids_of(ckpt) -> list[int]:
    """End-of-sequence ids from config.json, generation_config.json and the tokenizer together."""
    gen_eos = ckpt.generation_config.get("eos_token_id")
    eos = set(ckpt.config.eos_token_ids) | set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    if ckpt.tokenizer is not None and ckpt.tokenizer.eos_id is not None:
        eos.add(ckpt.tokenizer.eos_id)
    return sorted(i for i in eos if i is not None)
