"""One way into generation: the HTTP API, the chat page and `qt-chat` all come through here.

    gen = Generator("smol", engine, ckpt.generation_config, Metrics())
    ids = gen.encode_chat(messages)                      # the chat template; 400 if none
    params = gen.sampling(len(ids), temperature=0.7)     # request defaults, context check
    async for i, delta in gen.open([ids], [params], "req-1", len(ids)):   # 429 here if the queue is full
        ...

A `Generator` is one served model. It owns what every caller would otherwise redo: encoding
with the chat template, the context check, request values → `SamplingParams` over the
checkpoint's own defaults (`generation_config.json`, as vLLM does), the `max_tokens`
default, metrics and timing, and the mapping of every failure to a `RequestError` carrying
an HTTP status, which the API renders as JSON, the page shows, and the CLI prints.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from qt_serve.engine import Engine, EngineStopped, QueueFull
from qt_serve.errors import QtError
from qt_serve.sequence import Delta
from qt_serve.sampling import SamplingParams, defaults_from_generation_config

log = logging.getLogger("qt_serve.service")


class RequestError(QtError):
    """A request that cannot be served as asked, with the HTTP status and OpenAI error fields to say so."""

    def __init__(self, message: str, status: int = 400, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code, self.headers = (
            message, status, type_, param, code, headers)


def request_error(e: Exception) -> RequestError:
    """Any error of a request's path as a RequestError: queue full 429, engine down 503, bad input 400."""
    if isinstance(e, RequestError):
        return e
    if isinstance(e, QueueFull):
        return RequestError(str(e), 429, "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, EngineStopped):
        return RequestError(str(e), 503, "service_unavailable", code="unavailable")
    if isinstance(e, QtError):
        return RequestError(str(e))
    return RequestError(f"internal error: {type(e).__name__}: {e}", 500, "server_error")


def failure(d: Delta) -> RequestError | None:
    """The error a request's last delta stands for, if it ended by failing."""
    if d.finish_reason == "timeout":
        return RequestError("the request ran past the server's time limit (--request-timeout)", 504,
                            "timeout_error", code="request_timeout")
    if d.finish_reason == "error":
        return RequestError(d.text or "internal error", 500, "server_error")
    return None


class Metrics:
    """Prometheus series of every served model, shared by all the ways in."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("qt_requests", "HTTP requests finished", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("qt_prompt_tokens", "prompt tokens processed", ["model"], registry=r)
        self.output_tokens = Counter("qt_generation_tokens", "tokens generated", ["model"], registry=r)
        self.ttft = Histogram("qt_time_to_first_token_seconds", "time to first token", ["model"], registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.tpot = Histogram("qt_time_per_output_token_seconds", "time per output token after the first",
                              ["model"], registry=r, buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1))
        self.queue = Gauge("qt_queue_depth", "requests waiting for a KV slot", ["model"], registry=r)
        self.running = Gauge("qt_kv_slots_in_use", "KV cache slots held by running requests", ["model"], registry=r)
        self.slots = Gauge("qt_kv_slots", "KV cache slots", ["model"], registry=r)
        self.reused = Gauge("qt_prefix_reused_tokens", "prompt tokens served from cached prefixes, total",
                            ["model"], registry=r)

    def render(self, generators: dict[str, Generator]) -> bytes:
        for name, g in generators.items():
            if g.parent is not None:  # a LoRA adapter: its base's engine, counted under the base's name
                continue
            st = g.engine.stats()
            self.queue.labels(name).set(st["waiting"])
            self.running.labels(name).set(st["running"])
            self.slots.labels(name).set(st["slots"])
            self.reused.labels(name).set(st["prefix_reused_tokens"])
        return generate_latest(self.registry)


class Tracker:
    """One request's timings and token counts: the log line, the latency histograms, `usage`."""

    def __init__(self, metrics: Metrics, model: str, request_id: str, prompt_tokens: int):
        self.metrics, self.model, self.id, self.prompt_tokens = metrics, model, request_id, prompt_tokens
        self.start = time.perf_counter()
        self.first: float | None = None
        self.tokens = 0
        metrics.prompt_tokens.labels(model).inc(prompt_tokens)

    def token(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.metrics.ttft.labels(self.model).observe(now - self.start)
        self.tokens += 1
        self.metrics.output_tokens.labels(self.model).inc()

    def done(self, finish: str | None) -> None:
        total = time.perf_counter() - self.start
        if self.first is not None and self.tokens > 1:
            self.metrics.tpot.labels(self.model).observe((total - (self.first - self.start)) / (self.tokens - 1))
        ttft = f"{self.first - self.start:.3f}s" if self.first is not None else "-"
        log.info("%s model=%s prompt_tokens=%d completion_tokens=%d ttft=%s total=%.3fs finish=%s",
                 self.id, self.model, self.prompt_tokens, self.tokens, ttft, total, finish)


class Generator:
    """One served model: its engine, tokenizer, request defaults and metrics. A LoRA adapter is one
    too: its base's engine, with its requests submitted through `adapter` (`lora.py`), `parent` the
    base's name and `root` the adapter's directory (as vLLM lists them)."""

    def __init__(self, name: str, engine: Engine, generation_config: dict | None = None,
                 metrics: Metrics | None = None, created: int | None = None, adapter: int = 0,
                 parent: str | None = None, root: str | None = None):
        self.name, self.engine = name, engine
        self.adapter, self.parent, self.root = adapter, parent, root
        self.metrics = metrics or Metrics()
        self.created = created or int(time.time())
        # Values a request leaves unset come from the checkpoint (e.g. SmolLM2's temperature 0.2).
        self.defaults = defaults_from_generation_config(generation_config or {})

    @property
    def context(self) -> int:
        return self.engine.max_seq_len

    @property
    def tokenizer(self):
        if self.engine.tokenizer is None:
            raise RequestError(f"model {self.name!r} has no tokenizer; send token ids")
        return self.engine.tokenizer

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **template_vars) -> list[int]:
        tok = self.tokenizer
        if not tok.chat_template:
            raise RequestError(f"model {self.name!r} has no chat template; use /v1/completions", param="messages")
        return tok.encode_chat(messages, add_generation_prompt, **template_vars)

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def sampling(self, n_prompt: int, max_tokens: int | None = None, clamp: bool = False,
                 **fields) -> SamplingParams:
        """SamplingParams for a prompt of `n_prompt` tokens: the request's values (None: unset) over the
        checkpoint's defaults. `max_tokens` unset means the checkpoint's default, else the rest of the
        context; `clamp` makes a given max_tokens an upper bound (the page's "max new tokens")
        instead of a 400 when the context has less room."""
        ctx = self.context
        if n_prompt >= ctx:
            raise RequestError(f"the prompt is {n_prompt} tokens but this model's context is {ctx} tokens; "
                               "shorten the prompt", param="messages", code="context_length_exceeded")
        room = ctx - n_prompt
        if max_tokens is None:
            max_tokens = min(self.defaults.get("max_tokens", room), room)
        elif max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        elif clamp:
            max_tokens = min(max_tokens, room)
        elif max_tokens > room:
            raise RequestError(f"this model's context is {ctx} tokens, but {n_prompt + max_tokens} were "
                               f"requested ({n_prompt} in the prompt, {max_tokens} to generate); lower max_tokens",
                               param="max_tokens", code="context_length_exceeded")
        values = {k: v for k, v in self.defaults.items() if k != "max_tokens"}
        values.update({k: v for k, v in fields.items() if v is not None})
        try:
            params = SamplingParams(max_tokens=max_tokens, **values)
            params.check_tokens(self.engine.config.vocab_size)
            if params.grammar is not None:
                self.engine.grammars.check(params.grammar)
        except QtError as e:
            raise request_error(e) from None
        return params

    def track(self, request_id: str, prompt_tokens: int) -> Tracker:
        return Tracker(self.metrics, self.name, request_id, prompt_tokens)

    def check(self, prompts: list[list[int]], params: list[SamplingParams | None]) -> None:
        """Every prompt and its parameters fit this model: raised before any response starts."""
        try:
            for p, sp in zip(prompts, params):
                self.engine.validate(p, sp)
        except QtError as e:
            raise request_error(e) from None

    def open(self, prompts: list[list[int]], params: list[SamplingParams | None], request_id: str,
             prompt_tokens: int, prompt_logprobs: list[int | None] | None = None) -> Run:
        """Submit one engine request per prompt now (so a full queue is a 429 before any response
        starts), and return their deltas as one `Run`, timed and counted as one request of
        `prompt_tokens` (a prompt shared by n choices counts once, as OpenAI does). A params entry
        None scores its prompt only (with `prompt_logprobs`). Call it on the event loop that will
        read the run."""
        self.check(prompts, params)
        return Run(self, prompts, params, self.track(request_id, prompt_tokens),
                   prompt_logprobs or [None] * len(prompts))

    def stream_sync(self, prompt: list[int], params: SamplingParams, cancel: threading.Event | None = None
                    ) -> Iterator[Delta]:
        """One request's deltas in the caller's thread (`qt-chat`, `LLM`): steps a thread-less engine
        itself, waits on a threaded one. Stopping early (Ctrl-C) cancels it and frees its row."""
        out: queue.SimpleQueue[Delta] = queue.SimpleQueue()
        try:
            req = self.engine.submit(prompt, params, out.put, adapter=self.adapter)
        except QtError as e:
            raise request_error(e) from None
        tracker = self.track(req.id, len(prompt))
        finish = None
        try:
            while finish is None:
                if cancel is not None and cancel.is_set():
                    self.engine.cancel(req)
                while self.engine.thread is None and out.empty():
                    self.engine.run_once()
                d = out.get()
                if d.token is not None:
                    tracker.token()
                finish = d.finish_reason
                err = failure(d)
                if err is not None:
                    raise err
                yield d
        finally:
            if not req.done:
                self.engine.cancel(req)
                if self.engine.thread is None:
                    self.engine.run_once()
            tracker.done(finish or "cancelled")


class Run:
    """The deltas of one API request's engine requests (n choices, or several prompts), as
    (choice index, delta) in arrival order. A failed request raises its RequestError from the
    iteration; `aclose` (or leaving the loop) cancels what is left and frees its KV rows."""

    def __init__(self, gen: Generator, prompts, params, tracker: Tracker, scores):
        self.gen, self.tracker, self.finish, self.closed = gen, tracker, None, False
        self.out: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.reqs = []

        def emitter(i: int):  # called on the engine's thread: hand (choice, delta) to this loop
            return lambda d: loop.call_soon_threadsafe(self.out.put_nowait, (i, d))

        try:
            for i, (p, sp, k) in enumerate(zip(prompts, params, scores)):
                self.reqs.append(gen.engine.submit(p, sp, emitter(i), f"{tracker.id}-{i}", k, gen.adapter))
        except QtError as e:
            self.close("rejected")
            raise request_error(e) from None
        self.left = len(self.reqs)

    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, Delta]:
        if not self.left:
            self.close(self.finish)
            raise StopAsyncIteration
        i, d = await self.out.get()
        if d.token is not None:
            self.tracker.token()
        if d.finish_reason is not None:
            self.left -= 1
            self.finish = d.finish_reason
            err = failure(d)
            if err is not None:
                self.close(d.finish_reason)
                raise err
        return i, d

    async def aclose(self) -> None:
        self.close(self.finish or "cancelled")

    def close(self, finish: str | None) -> None:
        """Cancel what is still running and log the request, once."""
        for r in self.reqs:
            if not r.done:
                self.gen.engine.cancel(r)
        if not self.closed:
            self.closed = True
            self.tracker.done(finish)
