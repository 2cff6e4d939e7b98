"""Single-sequence generation: prefill, then token-by-token decode on a preallocated KV cache.

    llm = LLM.load("SmolLM2-135M-Instruct")
    for delta in llm.stream([{"role": "user", "content": "Hi!"}], SamplingParams(temperature=0)):
        print(delta.text, end="", flush=True)

The cache is kept between calls: a prompt that starts with the tokens of the last
call (a chat's growing history) only prefills what is new. The continuously batched
engine for many concurrent requests builds on the same model and cache.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from qt_serve import checkpoint, fast
from qt_serve.errors import QtError
from qt_serve.model import KVCache
from qt_serve.sampling import Choice, Sampler, SamplingParams, StopStrings
from qt_serve.tokenizer import StreamDecoder

Prompt = str | list[int] | list[dict]  # text, token ids, or chat messages


@dataclass
class Delta:
    """One step of a stream: new text (possibly empty while a character is incomplete)."""

    text: str
    token: Choice | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" on the last delta


class Sequence:
    """One request's decoding state: its sampler, streaming detokenizer, stop strings and budget.

    `step(logits)` samples the next token and returns the text it adds; the delta that ends
    the sequence carries finish_reason. Shared by `LLM` and the batched `engine.Engine`.
    """

    def __init__(self, prompt: list[int], params: SamplingParams, vocab_size: int, eos_ids: list[int],
                 tokenizer, max_seq_len: int, device="cpu"):
        self.prompt, self.params = prompt, params
        self.sampler = Sampler(params, vocab_size, eos_ids, prompt, device=device)
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


def eos_ids_of(ckpt: checkpoint.Checkpoint) -> list[int]:
    """End-of-sequence ids from config.json, generation_config.json and the tokenizer together."""
    gen_eos = ckpt.generation_config.get("eos_token_id")
    eos = set(ckpt.model.config.eos_token_ids) | set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    if ckpt.tokenizer is not None and ckpt.tokenizer.eos_id is not None:
        eos.add(ckpt.tokenizer.eos_id)
    return sorted(i for i in eos if i is not None)


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    choices: list[Choice] = field(default_factory=list, repr=False)


class LLM:
    """Generation on one checkpoint; `optimize` applies `fast.optimize_for_decode` to its model in place."""

    def __init__(self, ckpt: checkpoint.Checkpoint, max_seq_len: int | None = None, optimize: bool = True):
        self.ckpt = ckpt
        self.n_params = sum(p.numel() for p in ckpt.model.parameters())  # before swaps add W.T copies
        self.model = fast.optimize_for_decode(ckpt.model) if optimize else ckpt.model
        self.tokenizer = ckpt.tokenizer
        cfg = self.model.config
        self.max_seq_len = min(max_seq_len or self.model.max_seq_len, self.model.max_seq_len)
        p = next(self.model.parameters())
        self.cache = KVCache(cfg, 1, self.max_seq_len, dtype=p.dtype, device=p.device)
        self.cached: list[int] = []  # tokens whose keys/values are in the cache, in order
        self.eos_ids = eos_ids_of(ckpt)

    @classmethod
    def load(cls, spec, dtype=None, device="cpu", max_seq_len: int | None = None) -> LLM:
        return cls(checkpoint.load(spec, dtype=dtype, device=device, max_seq_len=max_seq_len), max_seq_len)

    @property
    def device(self):
        return self.cache.k.device

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        elif self.tokenizer is None:
            raise QtError("this checkpoint has no tokenizer.json: pass token ids instead of text")
        elif isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = self.tokenizer.encode_chat(prompt)
        check_prompt(ids, self.model.config.vocab_size, self.max_seq_len)
        return ids

    @torch.inference_mode()
    def _forward(self, ids: list[int], start: int) -> torch.Tensor:
        """Run ids at positions start.. through the model, extending the cache; last logits (vocab,)."""
        idx = torch.tensor([ids], device=self.device)
        pos = torch.arange(start, start + len(ids), device=self.device)[None]
        logits = self.model(idx, pos, self.cache, logit_index=torch.tensor([[len(ids) - 1]], device=self.device))
        del self.cached[start:]
        self.cached.extend(ids)
        return logits[0, -1]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               cancel: threading.Event | None = None) -> Iterator[Delta]:
        """Yield text deltas as tokens are generated; the last delta carries finish_reason."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        # Reuse the cached prefix, but always run at least the last prompt token to get logits.
        reuse = prefix_len(self.cached, ids, len(ids) - 1)
        logits = self._forward(ids[reuse:], reuse)
        seq = Sequence(ids, params, self.model.config.vocab_size, self.eos_ids, self.tokenizer, self.max_seq_len,
                       self.device)
        while True:
            if cancel is not None and cancel.is_set():
                yield seq.cancel()
                return
            delta = seq.step(logits)
            yield delta
            if seq.done:
                return
            logits = self._forward([seq.tokens[-1]], seq.pos)

    def generate(self, prompt: Prompt, params: SamplingParams | None = None) -> Completion:
        ids = self.encode(prompt)
        parts, choices, reason = [], [], "length"
        for d in self.stream(ids, params):
            parts.append(d.text)
            if d.token is not None:
                choices.append(d.token)
            reason = d.finish_reason or reason
        return Completion("".join(parts), [c.token for c in choices], reason, len(ids), choices)
