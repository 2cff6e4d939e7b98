"""The backend seam: what the engine needs from a model, and the torch implementation of it.

The engine schedules requests onto rows of a KV cache and asks a runner for three things:

    runner.allocate(rows, length)              a cache of `rows` sequences × `length` positions
    runner.forward(segments, logits_at)        run tokens into cache rows; logits where asked
    runner.copy_prefix(src, dst, n)            row dst's first n positions := row src's

A `Segment` is one sequence's new tokens this step: its cache row, the position of its
first token, the token ids, and the LoRA adapter they run through (0: none; `lora.py`).
`logits_at` are indices into the segments' tokens laid end to end; the result is
(len(logits_at), vocab) fp32-or-model-dtype logits. Nothing else of the model (its modules,
its cache layout, its dtype) reaches the engine, so a quantized or ONNX Runtime backend is
another class with these three methods (one that serves no adapters ignores `adapter`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from qt_serve import fast, lora
from qt_serve.config import ModelConfig
from qt_serve.kv import KVCache, RaggedBatch
from qt_serve.model import Transformer


@dataclass
class Segment:
    row: int  # cache row
    start: int  # position of tokens[0]
    tokens: list[int]
    adapter: int = 0  # 0: the base model alone; i: the runner's i-th LoRA adapter


class Runner(Protocol):
    config: ModelConfig
    max_seq_len: int  # the longest sequence a cache row can hold
    device: torch.device

    def allocate(self, rows: int, length: int) -> None: ...

    def forward(self, segments: list[Segment], logits_at: list[int]) -> torch.Tensor: ...

    def copy_prefix(self, src: int, dst: int, n: int) -> None: ...


class TorchRunner:
    """A `Transformer` in torch eager, with the decode-time linear swaps of `fast` (CPU) and, when
    given, LoRA adapters wrapped around them: `adapters[i-1]` serves segments with adapter i."""

    def __init__(self, model: Transformer, optimize: bool = True, adapters: list[lora.Adapter] = ()):
        self.model = fast.optimize_for_decode(model) if optimize else model
        self.lora = lora.attach(self.model, adapters) if adapters else None
        self.config = model.config
        self.max_seq_len = model.max_seq_len
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache: KVCache | None = None

    def allocate(self, rows: int, length: int) -> None:
        self.cache = None  # free the old one first: two caches may not fit together
        self.cache = KVCache(self.config, rows, min(length, self.max_seq_len), dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def forward(self, segments: list[Segment], logits_at: list[int]) -> torch.Tensor:
        rows = [s.row for s in segments]
        index = None if logits_at == rows else torch.tensor(logits_at, dtype=torch.long, device=self.device)
        if all(len(s.tokens) == 1 for s in segments) and rows == list(range(len(rows))):
            # Plain batched decode, rows 0..B-1 one token each: a (B, 1) batch on the first B rows.
            idx = torch.tensor([s.tokens for s in segments], device=self.device)
            pos = torch.tensor([[s.start] for s in segments], device=self.device)
            if self.lora is not None:  # row b's adapter, for every layer and the head alike
                self.lora.select([s.adapter for s in segments], device=self.device)
            logits = self.model(idx, pos, self.cache.rows(0, len(rows)))[:, 0]
            return logits if index is None else logits[index]  # every row's logits: no gather copy
        # Anything else (a prefill chunk, rows out of order): one (1, N) packed row.
        positions = [list(range(s.start, s.start + len(s.tokens))) for s in segments]
        idx = torch.tensor([[t for s in segments for t in s.tokens]], device=self.device)
        pos = torch.tensor([[p for ps in positions for p in ps]], device=self.device)
        if index is None:  # one token on each of these rows (out of order): its logits are each row's
            index = torch.tensor(logits_at, dtype=torch.long, device=self.device)
        if self.lora is not None:  # each packed token's adapter; the head sees only the tokens at logits_at
            adapters = [s.adapter for s in segments for _ in s.tokens]
            self.lora.select(adapters, [adapters[i] for i in logits_at], self.device)
        return self.model(idx, pos, RaggedBatch(self.cache, rows, positions), logit_index=index[None])[0]

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        self.cache.k[:, dst, :, :n] = self.cache.k[:, src, :, :n]
        self.cache.v[:, dst, :, :n] = self.cache.v[:, src, :, :n]
