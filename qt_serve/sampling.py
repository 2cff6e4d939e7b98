"""Choosing the next token from logits, per request.

Order of operations (as in HF and vLLM): logit bias -> repetition / presence /
frequency penalties -> min_tokens (EOS masked) -> temperature -> top-k -> top-p ->
min-p -> draw. Temperature 0 means greedy. A request's seed fixes its draws
whatever else the process is doing (each request owns its torch.Generator).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qt_serve.errors import QtError


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt and output tokens; 1: off
    presence_penalty: float = 0.0  # OpenAI style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the top k
    skip_special_tokens: bool = True

    def __post_init__(self):
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be ≥ 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be ≥ 0 (0 disables it), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.min_tokens >= 0, f"min_tokens must be ≥ 0, got {self.min_tokens}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}"),
            (self.seed is None or -2**63 <= self.seed < 2**64, f"seed must fit in 64 bits, got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise QtError(message)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]

    def check_tokens(self, vocab_size: int) -> None:
        """Token ids named by logit_bias and stop_token_ids must exist in the model's vocabulary."""
        for name, ids in (("logit_bias", self.logit_bias), ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise QtError(f"{name} names token {bad[0]}, outside the vocabulary [0, {vocab_size})")


@dataclass
class Choice:
    token: int
    logprob: float | None = None  # log p(token) under the model's raw distribution
    top: list[tuple[int, float]] | None = None


class Sampler:
    """Per-request state: its parameters, its RNG, and token counts for penalties."""

    def __init__(self, params: SamplingParams, vocab_size: int, eos_ids: list[int], prompt: list[int],
                 device="cpu"):
        self.p = params
        self.eos_ids = [] if params.ignore_eos else list(eos_ids)
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self.vocab_size = vocab_size
        params.check_tokens(vocab_size)
        # Tokens seen in prompt + output (repetition penalty) and output counts (presence/frequency).
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        if prompt:
            self.seen[torch.tensor(prompt, device=device)] = True
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self.n_out = 0

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """(vocab,) raw logits -> processed fp32 logits; -inf marks excluded tokens."""
        p = self.p
        x = logits.float()[: self.vocab_size]
        if p.logit_bias or self.n_out < p.min_tokens:
            x = x.clone()  # both write into x; everything else below makes new tensors
        for t, b in p.logit_bias.items():
            x[t] += b
        if p.repetition_penalty != 1.0:
            pen = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
            x = torch.where(self.seen, pen, x)
        if p.presence_penalty or p.frequency_penalty:
            x = x - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0)
        if self.n_out < p.min_tokens:
            x[self.eos_ids + list(p.stop_token_ids)] = float("-inf")
        if p.temperature == 0:
            return x
        x = x / p.temperature
        if p.top_k and p.top_k < x.numel():
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, order = torch.sort(x, descending=True)
            cum = sorted_x.softmax(-1).cumsum(-1)
            drop = cum - sorted_x.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
            x = x.scatter(0, order, sorted_x.masked_fill(drop, float("-inf")))
        if p.min_p > 0:
            probs = x.softmax(-1)
            x = x.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
        return x

    def __call__(self, logits: torch.Tensor) -> Choice:
        x = self.process(logits)
        if self.p.temperature == 0:
            token = int(torch.argmax(x))
        else:
            token = int(torch.multinomial(x.softmax(-1), 1, generator=self.generator))
        choice = Choice(token)
        if self.p.logprobs is not None:
            lp = torch.log_softmax(logits.float()[: self.vocab_size], -1)
            choice.logprob = float(lp[token])
            if self.p.logprobs:
                top = torch.topk(lp, self.p.logprobs)
                choice.top = list(zip(top.indices.tolist(), top.values.tolist()))
        self.seen[token] = True
        self.counts[token] += 1
        self.n_out += 1
        return choice


class StopStrings:
    """Finds stop strings in streamed text without ever emitting any part of one.

    Text that could be the start of a stop string is held back until it either
    completes the stop string (dropped, generation ends) or cannot any more (emitted).
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """New text -> (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = 0
        for s in self.stops:  # longest tail of buf that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text
