"""`LLM`: generation in the caller's thread, a synchronous face of the batched engine.

    llm = LLM.load("SmolLM2-135M-Instruct")
    for delta in llm.stream([{"role": "user", "content": "Hi!"}], SamplingParams(temperature=0)):
        print(delta.text, end="", flush=True)

Not a second decoding loop: `LLM` is an `engine.Engine` with one KV row and no worker thread,
stepped by the caller through `service.Generator`, so in-process decoding is exactly the
server's path, with the same encoding, request defaults and errors.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from qt_serve import checkpoint
from qt_serve.engine import Engine
from qt_serve.errors import QtError
from qt_serve.model import Transformer
from qt_serve.sampling import Choice, SamplingParams
from qt_serve.sequence import Delta
from qt_serve.service import Generator

Prompt = str | list[int] | list[dict]  # text, token ids, or chat messages


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    choices: list[Choice] = field(default_factory=list, repr=False)


class LLM:
    """One checkpoint, one sequence at a time. The KV row keeps its keys/values between calls: a
    prompt that starts with the last one's tokens (a chat's growing history) prefills only what is new."""

    def __init__(self, ckpt: checkpoint.Checkpoint, max_seq_len: int | None = None, optimize: bool = True):
        self.ckpt = ckpt
        with torch.device("meta"):  # counted on the config, whatever the weights' storage (int4, ONNX)
            self.n_params = sum(p.numel() for p in Transformer(ckpt.config, 2).parameters())
        self.engine = Engine.load(ckpt, optimize=optimize, max_batch=1, max_queue=1, max_seq_len=max_seq_len,
                                  thread=False)
        self.gen = Generator(str(ckpt.source), self.engine, ckpt.generation_config)
        self.tokenizer = ckpt.tokenizer
        self.max_seq_len = self.engine.max_seq_len

    @classmethod
    def load(cls, spec, dtype=None, device="cpu", max_seq_len: int | None = None, load_in: str | None = None) -> LLM:
        return cls(checkpoint.load(spec, dtype=dtype, device=device, max_seq_len=max_seq_len, load_in=load_in),
                   max_seq_len)

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if self.tokenizer is None:
            raise QtError("this checkpoint has no tokenizer.json: pass token ids instead of text")
        return self.gen.encode_text(prompt) if isinstance(prompt, str) else self.gen.encode_chat(prompt)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               cancel: threading.Event | None = None) -> Iterator[Delta]:
        """Yield text deltas as tokens are generated; the last delta carries finish_reason.
        Without params: the checkpoint's defaults (generation_config.json), up to the end of the context."""
        ids = self.encode(prompt)
        yield from self.gen.stream_sync(ids, params or self.gen.sampling(len(ids)), cancel)

    def generate(self, prompt: Prompt, params: SamplingParams | None = None) -> Completion:
        ids = self.encode(prompt)
        parts, choices, reason = [], [], "length"
        for d in self.stream(ids, params):
            parts.append(d.text)
            if d.token is not None:
                choices.append(d.token)
            reason = d.finish_reason or reason
        return Completion("".join(parts), [c.token for c in choices], reason, len(ids), choices)
