"""A continuously batched generation engine: many requests share one model and one KV cache.

    engine = Engine.load(checkpoint.load("SmolLM2-135M-Instruct"), max_batch=8)
    async for delta in engine.stream(prompt_ids, SamplingParams(temperature=0)):
        ...

The engine talks to the model only through a `runner.Runner` (allocate a cache, forward
segments into cache rows, copy a row's prefix), so any backend serves through it.

A worker thread steps the engine (torch releases the GIL, so the asyncio server stays
responsive); one `Worker` can step several engines in turn, so a server holding several models
still has one thread running torch. `thread=False` leaves the stepping to the caller
(`generate.LLM`, one sequence at a time in the caller's thread, through the very same steps).
Each iteration:
  1. drop cancelled or timed-out requests and free their KV rows at once;
  2. admit waiting requests into free rows (continuous batching: a request joins the
     running batch between two steps, and leaves it the step it finishes);
  3. run ONE forward for everybody: the next token of each decoding request plus up to
     `prefill_chunk` prompt tokens of requests still prefilling, then sample each request
     that produced logits. A failure while sampling ends that request only.
Running requests always occupy cache rows 0..B-1: when one finishes, the last row's keys
and values move into the hole. A finished request's row keeps its keys/values: a new prompt
that shares a prefix with what a free row holds (the same system prompt, a chat's growing
history) prefills only the rest.

A request may also ask for the log-probabilities of its own prompt tokens (`prompt_logprobs`,
for `echo` scoring): they are taken chunk by chunk during its prefill, so memory stays
bounded by one chunk's logits whatever the prompt's length, and with `params=None` the
request ends after its prefill (scoring only).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from qt_serve.checkpoint import Checkpoint
from qt_serve.errors import QtError
from qt_serve.lora import Adapter
from qt_serve.sequence import Delta, Sequence, check_prompt, eos_ids_of, prefix_len
from qt_serve.runner import Runner, Segment, TorchRunner
from qt_serve.sampling import Choice, SamplingParams
from qt_serve.structured import Grammars

log = logging.getLogger("qt_serve.engine")


class QueueFull(QtError):
    """The engine's waiting queue is full: the client should retry later (HTTP 429)."""


class EngineStopped(QtError):
    """The engine is shutting down, or has failed, and admits no new requests (HTTP 503)."""


@dataclass
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams | None  # None: score the prompt only, generate nothing
    emit: Callable[[Delta], None]  # called from the worker thread, once per delta
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's logprob and the top k
    adapter: int = 0  # the runner's LoRA adapter it runs through (0: none)
    seq: Sequence | None = None  # decoding state, made at admission
    cached: list[int] = field(default_factory=list)  # tokens whose keys/values its cache row holds
    scored: list[Choice] = field(default_factory=list)  # prompt tokens 1.. scored so far
    started: bool = False
    scores_sent: bool = False
    cancelled: bool = False
    done: bool = False
    arrival: float = field(default_factory=time.perf_counter)
    deadline: float | None = None  # perf_counter time past which it is dropped ("timeout")


class Engine:
    def __init__(self, runner: Runner, tokenizer=None, eos_ids: list[int] = (), max_batch: int = 8,
                 max_queue: int = 64, max_seq_len: int | None = None, request_timeout: float | None = None,
                 prefill_chunk: int = 256, thread: bool | Worker = True):
        for ok, what in ((max_batch >= 1, f"max_batch must be at least 1, got {max_batch}"),
                         (max_queue >= 0, f"max_queue must be ≥ 0, got {max_queue}"),
                         (prefill_chunk >= 1, f"prefill_chunk must be at least 1, got {prefill_chunk}"),
                         (request_timeout is None or request_timeout > 0,
                          f"request_timeout must be > 0 seconds, got {request_timeout}")):
            if not ok:
                raise QtError(what)
        self.runner, self.tokenizer, self.eos_ids = runner, tokenizer, list(eos_ids)
        self.config = runner.config
        self.grammars = Grammars(tokenizer, self.config.vocab_size, self.eos_ids)  # structured output
        self.max_seq_len = min(max_seq_len or runner.max_seq_len, runner.max_seq_len)
        runner.allocate(max_batch, self.max_seq_len)
        self.max_batch, self.max_queue, self.request_timeout = max_batch, max_queue, request_timeout
        self.prefill_chunk = prefill_chunk
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # running[i] owns cache row i
        # Tokens whose keys/values each free row still holds, so a new prompt sharing a prefix
        # (a system prompt, a chat's history) skips prefilling it.
        self.row_tokens: list[list[int]] = [[] for _ in range(max_batch)]
        self.row_adapter = [0] * max_batch  # the LoRA adapter those keys/values were computed through
        self.reused_tokens = 0
        # A shared worker steps several engines in one thread: their queues share its condition.
        self.worker = (thread if isinstance(thread, Worker) else Worker()) if thread else None
        self.cond = self.worker.cond if self.worker else threading.Condition()
        self.accepting = True
        self.stopped = False
        self.error: BaseException | None = None  # what killed the worker, if anything did
        self.ids = itertools.count()
        if self.worker:
            self.worker.add(self)

    @classmethod
    def load(cls, ckpt: Checkpoint, optimize: bool = True, adapters: list[Adapter] = (), **kw) -> Engine:
        """An engine over a loaded checkpoint: its own runner (ONNX Runtime, ...) or its torch model
        (whose nn.Linear layers are swapped for fast decode unless told not to), with LoRA `adapters`
        (`lora.load`) served to requests submitted with adapter=1, 2, ..."""
        if adapters and ckpt.runner is not None:
            raise QtError(f"{ckpt.source} runs on its own backend; LoRA adapters are served on torch models only")
        runner = ckpt.runner() if ckpt.runner is not None else TorchRunner(ckpt.model, optimize, adapters)
        return cls(runner, ckpt.tokenizer, eos_ids_of(ckpt), **kw)

    # ---- public API (any thread) ----------------------------------------------------

    @property
    def thread(self) -> threading.Thread | None:
        return self.worker.thread if self.worker else None

    @property
    def healthy(self) -> bool:
        """False once this engine has failed outside a forward (its worker thread ended it)."""
        return self.error is None and (self.thread is None or self.thread.is_alive() or self.stopped)

    def validate(self, prompt: list[int], params: SamplingParams | None) -> None:
        check_prompt(prompt, self.config.vocab_size, self.max_seq_len)
        if params is not None:
            params.check_tokens(self.config.vocab_size)

    def submit(self, prompt: list[int], params: SamplingParams | None, emit: Callable[[Delta], None],
               request_id: str | None = None, prompt_logprobs: int | None = None, adapter: int = 0) -> Request:
        self.validate(prompt, params)
        if params is None and prompt_logprobs is None:
            raise QtError("a request must generate (params) or score its prompt (prompt_logprobs), or both")
        req = Request(request_id or f"req-{next(self.ids)}", list(prompt), params, emit, prompt_logprobs, adapter)
        if self.request_timeout is not None:  # time in the queue counts: the client is waiting through it
            req.deadline = req.arrival + self.request_timeout
        with self.cond:
            if not self.healthy:
                raise EngineStopped(f"the engine failed ({self.error!r}) and serves no more requests; "
                                    "restart the server")
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

    async def stream(self, prompt: list[int], params: SamplingParams | None, request_id: str | None = None,
                     prompt_logprobs: int | None = None) -> AsyncIterator[Delta]:
        """Deltas of one request; leaving the loop early (client gone) cancels it and frees its row."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta] = asyncio.Queue()

        def emit(d: Delta) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, d)

        req = self.submit(prompt, params, emit, request_id, prompt_logprobs)
        try:
            while True:
                delta = await queue.get()
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            if not req.done:
                self.cancel(req)

    def stats(self) -> dict:
        with self.cond:
            return {"running": len(self.running), "waiting": len(self.waiting), "slots": self.max_batch,
                    "prefix_reused_tokens": self.reused_tokens}

    def shutdown(self, cancel_running: bool = False, timeout: float = 30.0) -> None:
        """Stop admitting; finish (or cancel) what is in flight, cancelling all past `timeout` s; stop."""
        with self.cond:
            self.accepting = False
            for req in list(self.waiting) + (self.running if cancel_running else []):
                req.cancelled = True
            self.cond.notify()
        deadline = time.monotonic() + timeout
        with self.cond:
            while (self.running or self.waiting) and self.thread is not None and self.thread.is_alive():
                if time.monotonic() > deadline:
                    for req in self.running + list(self.waiting):
                        req.cancelled = True
                    deadline = float("inf")  # cancelled requests leave at the next iteration
                    self.cond.notify()
                self.cond.wait(0.05)
            self.stopped = True
            self.cond.notify()
        if self.worker is not None:
            self.worker.join_if_done()

    # ---- stepping (the worker thread, or the caller with thread=False) ---------------

    def run_once(self) -> None:
        """One iteration: drop cancelled requests, admit waiting ones, one forward and its samples."""
        with self.cond:
            self._drop_cancelled()
            while self.waiting and len(self.running) < self.max_batch:
                self.running.append(self.waiting.popleft())
        try:
            self._step()
        except Exception as e:  # the forward failed (a bug, out of memory): every request in it fails
            log.exception("engine step failed")
            for req in list(self.running):
                req.cached = []  # its row may be half-written
                if not req.done:
                    self._finish(req, Delta("", finish_reason="error"), error=e)
        with self.cond:
            self._drop_finished()
            self.cond.notify_all()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def fail(self, e: BaseException) -> None:
        """The scheduler itself broke (not one forward): say so to everyone, serve no more."""
        log.exception("engine failed", exc_info=e)
        with self.cond:
            self.error = e
            for req in self.running + list(self.waiting):
                if not req.done:
                    self._finish(req, Delta("", finish_reason="error"), error=e)
            self.running.clear()
            self.waiting.clear()
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
                self.runner.copy_prefix(last, i, len(tail.cached))
                self.running[i] = tail
            self.row_tokens[last] = list(tail.cached)  # the freed row keeps tail's keys/values
            self.row_adapter[last] = tail.adapter
            self.running.pop()

    def _finish(self, req: Request, delta: Delta, error: BaseException | None = None) -> None:
        req.done = True
        if error is not None:
            delta.text = f"internal error: {type(error).__name__}: {error}"
        self._emit(req, delta)
        # Its sampler's vocab-sized tensors go now, on this thread, not whenever the client's side
        # lets go of the request.
        req.seq, req.scored = None, []

    def _emit(self, req: Request, delta: Delta) -> None:
        try:
            req.emit(delta)
        except Exception:  # the client's event loop is gone (closed, crashed): nobody is listening
            req.cancelled = True

    def _start(self, req: Request) -> None:
        """Set up a newly admitted request: its decoding state, and any cached prefix of its prompt."""
        row = self.running.index(req)
        req.started = True
        if req.params is not None:
            req.seq = Sequence(req.prompt, req.params, self.config.vocab_size, self.eos_ids, self.tokenizer,
                               self.max_seq_len, self.runner.device, self.grammars)
        # Reuse the longest cached prefix among this row and the free rows (always run ≥ 1 token for
        # logits). A scoring request needs every position's logits, so it prefills from 0. Keys/values
        # computed through another LoRA adapter (or none) are another model's: not reused.
        best, start = row, 0
        if req.prompt_logprobs is None:
            for r in [row, *range(len(self.running), self.max_batch)]:
                if self.row_adapter[r] != req.adapter:
                    continue
                common = prefix_len(self.row_tokens[r], req.prompt, len(req.prompt) - 1)
                if common > start:
                    best, start = r, common
        if best != row:
            self.runner.copy_prefix(best, row, start)
        self.row_tokens[row] = []  # being overwritten from `start` on; valid again once the request leaves
        self.reused_tokens += start
        req.cached = req.prompt[:start]

    def _step(self) -> None:
        """One forward for every running request: a decode token each, plus prompt chunks of new ones.

        Requests still prefilling get up to `prefill_chunk` prompt tokens in total per step, so a
        long prompt never stalls the others' decoding for more than one chunk.
        """
        segments: list[Segment] = []
        logits_at: list[int] = []
        users = []  # (request, first position fed, how many logit rows it takes)
        n, budget = 0, self.prefill_chunk
        for row, req in enumerate(self.running):
            if not req.started:
                try:
                    self._start(req)
                except Exception as e:  # its decoding state could not be made (a grammar): it alone fails
                    log.exception("request %s failed to start", req.id)
                    self._finish(req, Delta("", finish_reason="error"), error=e)
                    continue
            fed = len(req.cached)
            if fed < len(req.prompt):  # still prefilling
                if budget == 0:
                    continue
                take = req.prompt[fed:fed + budget]
                budget -= len(take)
            else:
                take = [req.seq.tokens[-1]]
            segments.append(Segment(row, fed, take, req.adapter))
            req.cached.extend(take)
            if req.prompt_logprobs is not None and fed < len(req.prompt):  # every position: scores
                rows = list(range(n, n + len(take)))
            elif len(req.cached) >= len(req.prompt):  # its last prompt token or a decode token: a sample
                rows = [n + len(take) - 1]
            else:
                rows = []
            if rows:
                users.append((req, fed, len(rows)))
                logits_at.extend(rows)
            n += len(take)
        if not segments:
            return
        logits = self.runner.forward(segments, logits_at)
        i = 0
        for req, fed, k in users:
            try:
                self._take(req, fed, logits[i:i + k])
            except Exception as e:  # this request's sampling failed: it ends, the batch goes on
                log.exception("request %s failed", req.id)
                self._finish(req, Delta("", finish_reason="error"), error=e)
            i += k

    def _take(self, req: Request, fed: int, logits: torch.Tensor) -> None:
        """Use the logits a step gave `req`: its prompt's scores while prefilling, then a sample."""
        if req.cancelled:  # the client left during this step; _drop_cancelled reports it next
            return
        if req.prompt_logprobs is not None and not req.scores_sent:
            targets = req.prompt[fed + 1:fed + 1 + logits.shape[0]]  # position p's logits score token p+1
            if targets:
                lp = torch.log_softmax(logits[:len(targets)].float(), -1)
                chosen = lp.gather(1, torch.tensor(targets, device=lp.device)[:, None])[:, 0].tolist()
                tops = torch.topk(lp, req.prompt_logprobs) if req.prompt_logprobs else None
                for j, (t, v) in enumerate(zip(targets, chosen)):
                    top = list(zip(tops.indices[j].tolist(), tops.values[j].tolist())) if tops else None
                    req.scored.append(Choice(t, v, top))
            if len(req.cached) < len(req.prompt):
                return  # more prompt to come
            req.scores_sent = True
            scored = Delta("", prompt_logprobs=req.scored)
            if req.params is None:
                scored.finish_reason = "length"
                self._finish(req, scored)
                return
            self._emit(req, scored)
        delta = req.seq.step(logits[-1])
        if req.seq.done:
            self._finish(req, delta)
        else:
            self._emit(req, delta)


class Worker:
    """The thread that steps engines: one per process by default (`api.load_generators`), because each
    thread that runs torch keeps its own OpenMP team, and more OpenMP threads than cores slowed decode
    to ~0.7x (LOG.md 2026-12-01). Engines with work take turns, one step each."""

    def __init__(self):
        self.cond = threading.Condition()
        self.engines: list[Engine] = []
        self.thread = threading.Thread(target=self._loop, name="qt-engine", daemon=True)

    def add(self, engine: Engine) -> None:
        with self.cond:
            self.engines.append(engine)
        if not self.thread.is_alive():
            self.thread.start()

    def live(self) -> list[Engine]:
        return [e for e in self.engines if e.error is None and not (e.stopped and not e.busy)]

    def join_if_done(self) -> None:
        """Wait for the thread to end once no engine needs it (at most one forward step; none blocks for ever)."""
        with self.cond:
            if self.live():
                return
            self.cond.notify_all()
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            with self.cond:
                live = self.live()
                if not live:
                    return
                while not any(e.busy or e.stopped for e in live):
                    self.cond.wait()
            for e in live:
                if e.busy:
                    try:
                        e.run_once()
                    except BaseException as err:  # a scheduler bug: that engine fails, the others go on
                        e.fail(err)
