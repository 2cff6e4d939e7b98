"""A continuously batched generation engine: many requests share one model and one KV cache.

    engine = Engine(checkpoint.load("SmolLM2-135M-Instruct"), max_batch=8)
    async for delta in engine.stream(prompt_ids, SamplingParams(temperature=0)):
        ...

One worker thread owns the model and the cache (torch releases the GIL, so the asyncio
server stays responsive). Each loop iteration the scheduler
  1. drops cancelled or timed-out requests and frees their KV rows at once;
  2. admits waiting requests into free rows (continuous batching: a request joins the
     running batch between two steps, and leaves it the step it finishes);
  3. runs ONE forward for everybody: the next token of each decoding request plus up to
     `prefill_chunk` prompt tokens of requests still prefilling, packed without padding
     (model.RaggedBatch), then samples each request that produced logits.
Running requests always occupy cache rows 0..B-1: when one finishes, the last row's keys
and values move into the hole. A lone request decodes as a (1, 1) forward on row 0,
exactly as `generate.LLM` does (batch-1 pays nothing for batching). A finished request's
row keeps its keys/values: a new prompt that shares a prefix with what a free row holds
(the same system prompt, a chat's growing history) prefills only the rest.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from qt_serve import fast
from qt_serve.checkpoint import Checkpoint
from qt_serve.errors import QtError
from qt_serve.generate import Delta, Sequence, check_prompt, eos_ids_of, prefix_len
from qt_serve.model import KVCache, RaggedBatch
from qt_serve.sampling import SamplingParams


class QueueFull(QtError):
    """The engine's waiting queue is full: the client should retry later (HTTP 429)."""


class EngineStopped(QtError):
    """The engine is shutting down and admits no new requests (HTTP 503)."""


@dataclass
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Delta], None]  # called from the worker thread, once per delta
    seq: Sequence | None = None  # decoding state, made at admission
    cached: list[int] = field(default_factory=list)  # tokens whose keys/values its cache row holds
    cancelled: bool = False
    done: bool = False
    arrival: float = field(default_factory=time.perf_counter)
    deadline: float | None = None  # perf_counter time past which it is dropped ("timeout")


class Engine:
    def __init__(self, ckpt: Checkpoint, max_batch: int = 8, max_queue: int = 64, max_seq_len: int | None = None,
                 optimize: bool = True, request_timeout: float | None = None, prefill_chunk: int = 128):
        for ok, what in ((max_batch >= 1, f"max_batch must be at least 1, got {max_batch}"),
                         (max_queue >= 0, f"max_queue must be ≥ 0, got {max_queue}"),
                         (prefill_chunk >= 1, f"prefill_chunk must be at least 1, got {prefill_chunk}"),
                         (request_timeout is None or request_timeout > 0,
                          f"request_timeout must be > 0 seconds, got {request_timeout}")):
            if not ok:
                raise QtError(what)
        self.tokenizer = ckpt.tokenizer
        self.model = fast.optimize_for_decode(ckpt.model) if optimize else ckpt.model
        self.config = self.model.config
        self.max_seq_len = min(max_seq_len or self.model.max_seq_len, self.model.max_seq_len)
        p = next(self.model.parameters())
        self.device = p.device
        self.cache = KVCache(self.config, max_batch, self.max_seq_len, dtype=p.dtype, device=p.device)
        self.max_batch, self.max_queue, self.request_timeout = max_batch, max_queue, request_timeout
        self.prefill_chunk = prefill_chunk
        self.eos_ids = eos_ids_of(ckpt)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # running[i] owns cache row i
        # Tokens whose keys/values each free row still holds, so a new prompt sharing a prefix
        # (a system prompt, a chat's history) skips prefilling it.
        self.row_tokens: list[list[int]] = [[] for _ in range(max_batch)]
        self.reused_tokens = 0
        self.cond = threading.Condition()
        self.accepting = True
        self.stopped = False
        self.ids = itertools.count()
        self.thread = threading.Thread(target=self._loop, name="qt-engine", daemon=True)
        self.thread.start()

    # ---- public API (any thread) ----------------------------------------------------

    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        check_prompt(prompt, self.config.vocab_size, self.max_seq_len)
        params.check_tokens(self.config.vocab_size)

    def submit(self, prompt: list[int], params: SamplingParams, emit: Callable[[Delta], None],
               request_id: str | None = None) -> Request:
        self.validate(prompt, params)
        req = Request(request_id or f"req-{next(self.ids)}", list(prompt), params, emit)
        if self.request_timeout is not None:  # time in the queue counts: the client is waiting through it
            req.deadline = req.arrival + self.request_timeout
        with self.cond:
            if not self.accepting:
                raise EngineStopped("the server is shutting down and accepts no new requests")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry shortly")
            self.waiting.append(req)
            self.cond.notify()
        return req

    def cancel(self, req: Request) -> None:
        with self.cond:
            req.cancelled = True
            self.cond.notify()

    async def stream(self, prompt: list[int], params: SamplingParams,
                     request_id: str | None = None) -> AsyncIterator[Delta]:
        """Deltas of one request; leaving the loop early (client gone) cancels it and frees its row."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta] = asyncio.Queue()
        req = self.submit(prompt, params, lambda d: loop.call_soon_threadsafe(queue.put_nowait, d), request_id)
        try:
            while True:
                delta = await queue.get()
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            if not req.done:
                self.cancel(req)

    def score(self, prompt: list[int]) -> torch.Tensor:
        """Log-probabilities (S, vocab) of the next token at every prompt position, for echo/logprobs.

        A cache-free forward on the caller's thread: it shares the weights (read-only) with the
        worker, not the KV cache, so scoring never disturbs running requests."""
        self.validate(prompt, SamplingParams())
        with torch.inference_mode():
            logits = self.model(torch.tensor([prompt], device=self.device))[0]
        return torch.log_softmax(logits.float(), -1).cpu()

    def stats(self) -> dict:
        with self.cond:
            return {"running": len(self.running), "waiting": len(self.waiting), "slots": self.max_batch,
                    "prefix_reused_tokens": self.reused_tokens}

    def shutdown(self, cancel_running: bool = False, timeout: float | None = None) -> None:
        """Stop admitting; finish (or cancel) what is in flight; stop the worker."""
        with self.cond:
            self.accepting = False
            for req in list(self.waiting) + (self.running if cancel_running else []):
                req.cancelled = True
            self.cond.notify()
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while self.running or self.waiting:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    for req in self.running + list(self.waiting):
                        req.cancelled = True
                    deadline = None
                self.cond.wait(0.05)
            self.stopped = True
            self.cond.notify()
        self.thread.join(timeout=5)

    # ---- worker thread -------------------------------------------------------------

    @torch.inference_mode()
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not (self.waiting or self.running or self.stopped):
                    self.cond.wait()
                if self.stopped and not (self.waiting or self.running):
                    return
                self._drop_cancelled()
                while self.waiting and len(self.running) < self.max_batch:
                    self.running.append(self.waiting.popleft())
            try:
                self._step()
            except Exception as e:  # a bug or OOM: fail the requests in flight, keep serving
                for req in list(self.running):
                    req.cached = []  # its row may be half-written
                    self._finish(req, Delta("", finish_reason="error"), error=e)
            with self.cond:
                self._drop_finished()
                self.cond.notify_all()

    def _drop_cancelled(self) -> None:
        now = time.perf_counter()
        for req in list(self.waiting) + self.running:
            late = req.deadline is not None and now > req.deadline
            if req.done or not (req.cancelled or late):
                continue
            if req in self.waiting:
                self.waiting.remove(req)
            delta = req.seq.cancel() if req.seq else Delta("", finish_reason="cancelled")
            if late and not req.cancelled:
                delta.finish_reason = "timeout"
            self._finish(req, delta)
        self._drop_finished()

    def _drop_finished(self) -> None:
        # Keep rows dense: move the last running request's keys/values into each hole.
        i = 0
        while i < len(self.running):
            if not self.running[i].done:
                i += 1
                continue
            last = len(self.running) - 1
            tail = self.running[last]
            if i != last:
                self._copy_row(last, i, len(tail.cached))
                self.running[i] = tail
            self.row_tokens[last] = list(tail.cached)  # the freed row keeps tail's keys/values
            self.running.pop()

    def _copy_row(self, src: int, dst: int, n: int) -> None:
        self.cache.k[:, dst, :, :n] = self.cache.k[:, src, :, :n]
        self.cache.v[:, dst, :, :n] = self.cache.v[:, src, :, :n]

    def _finish(self, req: Request, delta: Delta, error: Exception | None = None) -> None:
        req.done = True
        if error is not None:
            delta.text = f"internal error: {error}"
        self._emit(req, delta)

    def _emit(self, req: Request, delta: Delta) -> None:
        try:
            req.emit(delta)
        except Exception:  # the client's event loop is gone (closed, crashed): nobody is listening
            req.cancelled = True

    def _start(self, req: Request) -> None:
        """Set up a newly admitted request: its decoding state, and any cached prefix of its prompt."""
        row = self.running.index(req)
        req.seq = Sequence(req.prompt, req.params, self.config.vocab_size, self.eos_ids, self.tokenizer,
                           self.max_seq_len, self.device)
        # Reuse the longest cached prefix among this row and the free rows (always run ≥ 1 token for logits).
        best, start = row, 0
        for r in [row, *range(len(self.running), self.max_batch)]:
            common = prefix_len(self.row_tokens[r], req.prompt, len(req.prompt) - 1)
            if common > start:
                best, start = r, common
        if best != row:
            self._copy_row(best, row, start)
        self.row_tokens[row] = []  # being overwritten from `start` on; valid again once the request leaves
        self.reused_tokens += start
        req.cached = req.prompt[:start]

    def _step(self) -> None:
        """One forward for every running request: a decode token each, plus prompt chunks of new ones.

        Requests still prefilling get up to `prefill_chunk` prompt tokens in total per step, so
        a long prompt never stalls the others' decoding for more than one chunk. When nobody
        is prefilling the step is a plain (B, 1) batch; otherwise a RaggedBatch packs the
        decode tokens and the chunks into one row, with no padding.
        """
        with self.cond:  # requests that finished at once (e.g. max_tokens=1) leave first
            self._drop_finished()
        rows, positions, tokens, heads = [], [], [], []  # heads: (request, index of its last token)
        budget = self.prefill_chunk
        for row, req in enumerate(self.running):
            if req.seq is None:
                self._start(req)
            fed = len(req.cached)
            if fed < len(req.prompt):  # still prefilling
                if budget == 0:
                    continue
                take = req.prompt[fed:fed + budget]
                budget -= len(take)
            else:
                take = [req.seq.tokens[-1]]
            rows.append(row)
            positions.append(list(range(fed, fed + len(take))))
            tokens.extend(take)
            req.cached.extend(take)
            if len(req.cached) >= len(req.prompt):  # its last prompt token or a decode token: sample after it
                heads.append((req, len(tokens) - 1))
        if not rows:
            return
        if all(len(p) == 1 for p in positions) and rows == list(range(len(rows))):
            idx = torch.tensor(tokens, device=self.device)[:, None]  # (B, 1): plain batched decode
            pos = torch.tensor(positions, device=self.device)
            logits = self.model(idx, pos, self.cache.rows(0, len(rows)))[:, 0]
        else:
            idx = torch.tensor([tokens], device=self.device)  # (1, N)
            pos = torch.tensor([[p for ps in positions for p in ps]], device=self.device)
            # (1, K) positions whose logits are needed; K is 0 while a long prompt is mid-prefill
            index = torch.tensor([[i for _, i in heads]], dtype=torch.long, device=self.device)
            logits = self.model(idx, pos, RaggedBatch(self.cache, rows, positions), logit_index=index)[0]
            heads = [(req, j) for j, (req, _) in enumerate(heads)]
        for req, i in heads:
            self._accept(req, logits[i])

    def _accept(self, req: Request, logits: torch.Tensor) -> None:
        """Sample the next token of `req` and hand the delta to its client."""
        if req.cancelled:  # the client left during this step; _drop_cancelled reports it next
            return
        delta = req.seq.step(logits)
        if req.seq.done:
            self._finish(req, delta)
        else:
            self._emit(req, delta)
