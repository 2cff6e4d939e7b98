"""The OpenAI-style HTTP API over one or more `Engine`s (FastAPI).

Routes: POST /v1/chat/completions, POST /v1/completions (streaming SSE or not), GET /v1/models,
POST /tokenize, POST /detokenize, GET /health, GET /metrics (Prometheus).
Every error is OpenAI-shaped JSON, `{"error": {"message", "type", "param", "code"}}`, with a
4xx status for anything the client can fix; a bad request never reaches the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from qt_serve.engine import Engine, EngineStopped, QueueFull
from qt_serve.errors import QtError
from qt_serve.generate import Delta
from qt_serve.protocol import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    Usage,
)
from qt_serve.sampling import SamplingParams

log = logging.getLogger("qt_serve.api")


FAILED = ("error", "timeout")  # engine finish reasons that are failures, not OpenAI finish_reasons


def failure(d: Delta) -> APIError:
    if d.finish_reason == "timeout":
        return APIError(504, "the request ran past the server's time limit (--request-timeout)", "timeout_error",
                        code="request_timeout")
    return APIError(500, d.text or "internal error", "server_error")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = (
            status, message, type_, param, code, headers)


def error_json(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
               headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def engine_error(e: Exception) -> APIError:
    if isinstance(e, QueueFull):
        return APIError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, EngineStopped):
        return APIError(503, str(e), "service_unavailable", code="shutting_down")
    return APIError(400, str(e))


@dataclass
class Served:
    name: str
    engine: Engine
    created: int


class Metrics:
    def __init__(self, served: dict[str, Served]):
        self.registry = CollectorRegistry()
        r = self.registry
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
        self.served = served

    def render(self) -> bytes:
        for name, s in self.served.items():
            st = s.engine.stats()
            self.queue.labels(name).set(st["waiting"])
            self.running.labels(name).set(st["running"])
            self.slots.labels(name).set(st["slots"])
            self.reused.labels(name).set(st["prefix_reused_tokens"])
        return generate_latest(self.registry)


class Tracker:
    """Per-request timings for the log line and the latency histograms."""

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


def context_check(s: Served, n_prompt: int, max_tokens: int | None) -> int:
    """The max_tokens to use: the request's, or the rest of the context; 400 when it cannot fit."""
    ctx = s.engine.max_seq_len
    if n_prompt >= ctx:
        raise APIError(400, f"the prompt is {n_prompt} tokens but this model's context is {ctx} tokens; "
                            "shorten the prompt", param="messages", code="context_length_exceeded")
    if max_tokens is None:
        return ctx - n_prompt
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if n_prompt + max_tokens > ctx:
        raise APIError(400, f"this model's context is {ctx} tokens, but {n_prompt + max_tokens} were "
                            f"requested ({n_prompt} in the prompt, {max_tokens} to generate); lower max_tokens",
                       param="max_tokens", code="context_length_exceeded")
    return max_tokens


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def load_served(specs: list[str], dtype=None, device="cpu", max_seq_len=None, max_batch=8,
                max_queue=64, request_timeout: float | None = None) -> dict[str, Served]:
    """`[NAME=]SPEC` strings -> loaded models, each behind its own engine."""
    from pathlib import Path

    from qt_serve import checkpoint

    served = {}
    for spec in specs:
        name, path = spec.split("=", 1) if "=" in spec else (Path(spec.rstrip("/")).stem or spec, spec)
        if name in served:
            raise QtError(f"two models are named {name!r}; name them with --model NAME=SPEC")
        ckpt = checkpoint.load(path, dtype=dtype, device=device, max_seq_len=max_seq_len)
        engine = Engine(ckpt, max_batch=max_batch, max_queue=max_queue, max_seq_len=max_seq_len,
                        request_timeout=request_timeout)
        served[name] = Served(name, engine, int(time.time()))
        log.info("serving %s from %s (context %d, %d slots)", name, path, served[name].engine.max_seq_len, max_batch)
    return served


def create_app(served: dict[str, Served], api_key: str | None = None, max_body_bytes: int = 1 << 20,
               page=None) -> FastAPI:
    """The API app. `page` (an `app.web.PageOptions`) mounts the chat page at / and the arena at /arena;
    without it, / redirects to the API docs."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for s in served.values():  # in-flight streams were already given their grace period by uvicorn
            await asyncio.to_thread(s.engine.shutdown, True, 5.0)

    app = FastAPI(title="qt-serve", description="OpenAI-compatible API for small language models",
                  version="0.1.0", lifespan=lifespan)
    app.state.served = served
    app.state.metrics = metrics = Metrics(served)
    default_model = next(iter(served))

    # ---- errors: always OpenAI-shaped JSON -------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_json(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(QtError)
    async def _qt_error(request, e: QtError):
        e = engine_error(e)
        return error_json(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_json(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                              code="invalid_json")
        where = ".".join(loc) or "body"
        return error_json(400, f"{where}: {first.get('msg', 'invalid value')}", param=where or None,
                          code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_json(e.status_code, str(e.detail), kind)

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        log.exception("unhandled error")
        return error_json(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    # ---- auth, body size, request accounting (one pure-ASGI middleware) ------------------

    def route_label(path: str) -> str:
        """The metric label of a path: an API route's own path, else one label for the rest
        (per-path labels for page assets or mistyped URLs would grow the series without bound)."""
        known = any(r.path == path for r in app.routes if hasattr(r, "methods"))
        return path if known else "other"

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        path = request.url.path
        # The key guards the model routes; the chat page has its own login (app.web), and
        # /health, /metrics and the docs stay open.
        guarded = path.startswith("/v1/") or path in ("/tokenize", "/detokenize")
        if api_key and guarded and request.headers.get("authorization") != f"Bearer {api_key}":
            response = error_json(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                  "authentication_error", code="invalid_api_key")
        elif int(request.headers.get("content-length") or 0) > max_body_bytes:
            response = error_json(413, f"the request body is larger than {max_body_bytes} bytes",
                                  code="body_too_large")
        else:
            response = await call_next(request)
        metrics.requests.labels(route_label(path), str(response.status_code)).inc()
        return response

    def pick(model: str | None) -> Served:
        name = model or default_model
        if name not in served:
            raise APIError(404, f"model {name!r} is not served here; available: {', '.join(served)}",
                           "not_found_error", "model", "model_not_found")
        return served[name]

    def token_text(s: Served, t: int) -> str:
        return s.engine.tokenizer.decode([t]) if s.engine.tokenizer else str(t)

    async def fan_in(s: Served, prompts: list[list[int]], params: list[SamplingParams], rid: str
                     ) -> AsyncIterator[tuple[int, Delta]]:
        """(choice index, delta) from several requests as they arrive; all are cancelled on exit."""
        queue: asyncio.Queue = asyncio.Queue()
        streams = [s.engine.stream(p, sp, f"{rid}-{i}") for i, (p, sp) in enumerate(zip(prompts, params))]

        async def pump(i, stream):
            try:
                async for d in stream:
                    await queue.put((i, d))
            except Exception as e:
                await queue.put((i, e))

        tasks = [asyncio.create_task(pump(i, st)) for i, st in enumerate(streams)]
        try:
            left = len(tasks)
            while left:
                i, d = await queue.get()
                if isinstance(d, Exception):
                    raise d
                if d.finish_reason is not None:
                    left -= 1
                yield i, d
        finally:
            # Cancelling a pump raises inside its engine stream, whose own cleanup cancels the
            # request and frees its KV row; wait for that rather than closing generators in use.
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def per_choice(params: SamplingParams, n: int) -> list[SamplingParams]:
        # n choices with a seed: seed, seed+1, ... so they differ yet each repeats exactly.
        return [params if params.seed is None else replace(params, seed=params.seed + i)
                for i in range(n)]

    def submit_check(s: Served, prompts, params):
        for p, sp in zip(prompts, params):
            s.engine.validate(p, sp)

    # ---- routes -------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(served)}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[ModelCard(id=n, created=s.created, max_model_len=s.engine.max_seq_len)
                               for n, s in served.items()])

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        s = pick(req.model)
        tok = need_tokenizer(s)
        if req.messages is not None:
            ids = tok.encode_chat([{"role": m.role, "content": m.text()} for m in req.messages],
                                  req.add_generation_prompt)
        elif req.prompt is not None:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            raise APIError(400, "give 'prompt' (text) or 'messages' to tokenize", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": s.engine.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        s = pick(req.model)
        vocab = s.engine.config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": need_tokenizer(s).decode(req.tokens)}

    def need_tokenizer(s: Served):
        if s.engine.tokenizer is None:
            raise APIError(400, f"model {s.name!r} has no tokenizer; send token ids")
        return s.engine.tokenizer

    @app.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat(req: ChatCompletionRequest):
        s = pick(req.model)
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError(400, f"response_format {req.response_format.get('type')!r} is not supported yet; "
                                "only 'text'", param="response_format")
        tok = need_tokenizer(s)
        ids = tok.encode_chat([{"role": m.role, "content": m.text()} for m in req.messages])
        max_tokens = context_check(s, len(ids), req.max_completion_tokens or req.max_tokens)
        lp = (req.top_logprobs or 0) if req.logprobs else None
        params = per_choice(req.sampling(max_tokens, lp, max_tokens), req.n)
        submit_check(s, [ids] * req.n, params)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        tracker = Tracker(metrics, s.name, rid, len(ids) * req.n)
        deltas = fan_in(s, [ids] * req.n, params, rid)

        def logprob_entry(d: Delta):
            c = d.token
            return {"token": token_text(s, c.token), "logprob": c.logprob,
                    "bytes": list(token_text(s, c.token).encode()),
                    "top_logprobs": [{"token": token_text(s, t), "logprob": v, "bytes": list(token_text(s, t).encode())}
                                     for t, v in (c.top or [])]}

        if req.stream:
            def chunk(i: int, d: Delta) -> dict:
                c = {"index": i, "delta": {"content": d.text} if d.text else {}, "finish_reason": d.finish_reason}
                if lp is not None and d.token is not None:
                    c["logprobs"] = {"content": [logprob_entry(d)]}
                return c

            base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": s.name}
            roles = [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                     for i in range(req.n)]
            return StreamingResponse(sse_events(base, roles, deltas, chunk, tracker, req.stream_options),
                                     media_type="text/event-stream")

        texts, finish, logprobs = [[] for _ in range(req.n)], [None] * req.n, [[] for _ in range(req.n)]
        async for i, d in deltas:
            if d.token is not None:
                tracker.token()
                if lp is not None:
                    logprobs[i].append(logprob_entry(d))
            texts[i].append(d.text)
            finish[i] = d.finish_reason or finish[i]
        tracker.done(finish[0])
        check_errors(finish, texts)
        return ChatCompletion(id=rid, created=created, model=s.name, usage=usage(tracker), choices=[
            ChatChoice(index=i, message={"role": "assistant", "content": "".join(texts[i])}, finish_reason=finish[i],
                       logprobs={"content": logprobs[i]} if lp is not None else None) for i in range(req.n)])

    async def sse_events(base: dict, first: list[dict], deltas, chunk, tracker: Tracker, options
                         ) -> AsyncIterator[str]:
        """One streamed response: the `first` choices, a chunk per delta that adds text or ends a choice,
        the usage chunk when asked, then [DONE]; an engine error mid-stream becomes an error event."""
        finish = None
        try:
            for choice in first:
                yield sse({**base, "choices": [choice]})
            async for i, d in deltas:
                if d.token is not None:
                    tracker.token()
                if d.finish_reason in FAILED:
                    raise failure(d)
                if not d.text and d.finish_reason is None:
                    continue  # a held-back partial character or stop-string prefix
                finish = d.finish_reason or finish
                yield sse({**base, "choices": [chunk(i, d)]})
            if options and options.include_usage:
                yield sse({**base, "choices": [], "usage": usage(tracker).model_dump()})
            yield "data: [DONE]\n\n"
        except (QtError, APIError) as e:
            e = e if isinstance(e, APIError) else APIError(500, str(e), "server_error")
            yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
            yield "data: [DONE]\n\n"
        finally:
            tracker.done(finish)

    def usage(t: Tracker) -> Usage:
        return Usage(prompt_tokens=t.prompt_tokens, completion_tokens=t.tokens,
                     total_tokens=t.prompt_tokens + t.tokens)

    def check_errors(finish, texts):
        for f, t in zip(finish, texts):
            if f in FAILED:
                raise failure(Delta("".join(t), finish_reason=f))

    @app.post("/v1/completions", response_model=Completion)
    async def completions(req: CompletionRequest):
        s = pick(req.model)
        prompts = prompt_ids(s, req.prompt)
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 is allowed only with echo, to score a prompt)",
                           param="max_tokens")
        score_only = req.max_tokens == 0
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        jobs, params = [], []
        for p in prompts:
            mt = context_check(s, len(p), None if score_only else req.max_tokens)
            for sp in per_choice(req.sampling(mt, req.logprobs, mt), req.n):
                jobs.append(p)
                params.append(sp)
        if not score_only:
            submit_check(s, jobs, params)
        tracker = Tracker(metrics, s.name, rid, sum(len(p) for p in jobs))
        echo = [await score(s, p, req.logprobs) if req.echo else None for p in jobs]

        if req.stream:
            if score_only:
                raise APIError(400, "stream with max_tokens 0 has nothing to stream", param="stream")

            def chunk(i: int, d: Delta) -> dict:
                return {"index": i, "text": d.text, "finish_reason": d.finish_reason,
                        "logprobs": legacy_logprobs(s, [d]) if req.logprobs is not None else None}

            base = {"id": rid, "object": "text_completion", "created": created, "model": s.name}
            echoes = [{"index": i, "text": e["text"], "finish_reason": None, "logprobs": e["logprobs"]}
                      for i, e in enumerate(echo) if e is not None]
            return StreamingResponse(sse_events(base, echoes, fan_in(s, jobs, params, rid), chunk, tracker,
                                                req.stream_options), media_type="text/event-stream")

        texts, finish, got = [[] for _ in jobs], ["length"] * len(jobs), [[] for _ in jobs]
        if not score_only:
            async for i, d in fan_in(s, jobs, params, rid):
                if d.token is not None:
                    tracker.token()
                    got[i].append(d)
                texts[i].append(d.text)
                finish[i] = d.finish_reason or finish[i]
        tracker.done(finish[0])
        check_errors(finish, texts)
        choices = []
        for i in range(len(jobs)):
            lp = None
            if req.logprobs is not None:
                lp = legacy_logprobs(s, got[i])
                if echo[i] is not None:
                    shift = len(echo[i]["text"])
                    lp["text_offset"] = [o + shift for o in lp["text_offset"]]
                    lp = {k: echo[i]["logprobs"][k] + lp[k] for k in lp}
            text = (echo[i]["text"] if echo[i] else "") + "".join(texts[i])
            choices.append(CompletionChoice(index=i, text=text, finish_reason=finish[i], logprobs=lp))
        return Completion(id=rid, created=created, model=s.name, choices=choices, usage=usage(tracker))

    def prompt_ids(s: Served, prompt) -> list[list[int]]:
        """The four OpenAI prompt forms -> token-id lists; no BOS is added to token-id prompts."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            prompt = [prompt]
        out = []
        for p in prompt:
            ids = need_tokenizer(s).encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "a prompt is empty (no tokens)", param="prompt")
            out.append(ids)  # the engine checks the ids against the vocabulary before any work starts
        return out

    def legacy_logprobs(s: Served, deltas: list[Delta]) -> dict:
        toks = [d.token for d in deltas if d.token is not None]
        texts = [token_text(s, c.token) for c in toks]
        return {"tokens": texts, "token_logprobs": [c.logprob for c in toks],
                "top_logprobs": [{token_text(s, t): v for t, v in (c.top or [])} for c in toks],
                "text_offset": offsets(texts)}

    def offsets(texts: list[str], start: int = 0) -> list[int]:
        out = []
        for t in texts:
            out.append(start)
            start += len(t)
        return out

    async def score(s: Served, ids: list[int], k: int | None) -> dict:
        """The prompt's own text and per-token log-probs (first token: None), as echo returns them."""
        logits = await asyncio.to_thread(s.engine.score, ids)  # (S, vocab) log-probs
        tokens, lps, tops = [], [], []
        for j, t in enumerate(ids):
            tokens.append(token_text(s, t))
            if j == 0:
                lps.append(None)
                tops.append(None)
                continue
            row = logits[j - 1]
            lps.append(float(row[t]))
            if k:
                top = torch.topk(row, k)
                tops.append({token_text(s, i): v for i, v in zip(top.indices.tolist(), top.values.tolist())})
            else:
                tops.append({})
        text = s.engine.tokenizer.decode(ids) if s.engine.tokenizer else ""
        return {"text": text, "logprobs": {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                                           "text_offset": offsets(tokens)}}

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "DELETE"], include_in_schema=False)
    async def unknown(request: Request, rest: str):  # before the page's mount at /: API clients get JSON errors
        allowed = sorted(m for r in app.routes if getattr(r, "name", "") != "unknown" and hasattr(r, "methods")
                         and r.path_regex.match(request.url.path) for m in r.methods)
        if allowed:
            raise APIError(405, f"{request.method} is not allowed on {request.url.path}; use {', '.join(allowed)}",
                           headers={"Allow": ", ".join(allowed)})
        raise APIError(404, f"no route {request.url.path}; see /docs", "not_found_error")

    if page is None:
        app.add_api_route("/", lambda: RedirectResponse("/docs"), include_in_schema=False)
    else:
        from app.web import mount

        mount(app, served, page, api_key)
    return app
