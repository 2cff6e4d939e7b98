"""The OpenAI-style routes: /v1/chat/completions, /v1/completions, /v1/models, /tokenize, /detokenize.

Each route turns its body into prompts and `SamplingParams` through the model's
`service.Generator`, opens a `service.Run` (submitting to the engine before any response
starts, so a full queue is a 429 even for a stream), and shapes the deltas as OpenAI does:
one JSON body, or server-sent events ending in `data: [DONE]`. A client that hangs up
cancels its requests, streaming or not.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

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
    plain,
)
from qt_serve.sampling import Choice, SamplingParams
from qt_serve.sequence import Delta
from qt_serve.service import Generator, RequestError, Run, Tracker
from qt_serve.tools import Plan, Reply, chat_ids

router = APIRouter()


def endpoints(app) -> list:
    """The app's routes that answer HTTP methods, those of included routers too (FastAPI keeps an
    included router as one entry)."""
    out = []
    for r in app.routes:
        inner = getattr(r, "original_router", None)
        out += endpoints(inner) if inner is not None else ([r] if hasattr(r, "methods") else [])
    return out


def pick(request: Request, model: str | None) -> Generator:
    generators: dict[str, Generator] = request.app.state.generators
    name = model or next(iter(generators))
    if name not in generators:
        raise RequestError(f"model {name!r} is not served here; available: {', '.join(generators)}", 404,
                           "not_found_error", "model", "model_not_found")
    return generators[name]


def per_choice(params: SamplingParams, n: int) -> list[SamplingParams]:
    # n choices with a seed: seed, seed+1, ... so they differ yet each repeats exactly.
    return [params if params.seed is None else replace(params, seed=params.seed + i) for i in range(n)]


def usage(t: Tracker) -> Usage:
    return Usage(prompt_tokens=t.prompt_tokens, completion_tokens=t.tokens, total_tokens=t.prompt_tokens + t.tokens)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def until_disconnect(request: Request, work):
    """Await `work` unless the client hangs up first; then cancel it (its run frees the KV rows)."""
    task = asyncio.ensure_future(work)

    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise RequestError("the client closed the connection", 499, code="client_closed")
    finally:
        watch.cancel()


async def events(base: dict, first: list[dict], run: Run, chunk: Callable[[int, Delta], list[dict]],
                 include_usage: bool) -> AsyncIterator[str]:
    """One streamed response: the `first` choices, the chunks `chunk` makes of each delta (none for a
    delta that adds nothing to send), the usage chunk when asked, then [DONE]; a request failing
    mid-stream becomes an error event."""
    try:
        for choice in first:
            yield sse({**base, "choices": [choice]})
        async for i, d in run:
            for c in chunk(i, d):
                yield sse({**base, "choices": [c]})
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(run.tracker).model_dump()})
        yield "data: [DONE]\n\n"
    except RequestError as e:
        yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
        yield "data: [DONE]\n\n"
    finally:
        await run.aclose()


def streaming(body: AsyncIterator[str], run: Run) -> StreamingResponse:
    # The run is closed by `events` when it ends, and here as well in case the client left before
    # the body ever started (an async generator never started never runs its `finally`).
    return StreamingResponse(body, media_type="text/event-stream", background=BackgroundTask(run.aclose))


class Texts:
    """Token text for logprobs, through the model's tokenizer (ids as text without one)."""

    def __init__(self, gen: Generator):
        self.tok = gen.engine.tokenizer

    def __call__(self, t: int) -> str:
        return self.tok.decode([t]) if self.tok else str(t)

    def chat_entry(self, c: Choice) -> dict:
        return {"token": self(c.token), "logprob": c.logprob, "bytes": list(self(c.token).encode()),
                "top_logprobs": [{"token": self(t), "logprob": v, "bytes": list(self(t).encode())}
                                 for t, v in (c.top or [])]}

    def legacy(self, tokens: list[int], scores: list[Choice | None]) -> dict:
        """The completions API's logprobs of these tokens; a None score (the first token of an echo)
        gives null entries, as OpenAI's do."""
        texts = [self(t) for t in tokens]
        offsets = [0, *itertools.accumulate(map(len, texts))][:len(texts)]
        return {"tokens": texts, "token_logprobs": [c.logprob if c else None for c in scores],
                "top_logprobs": [{self(t): v for t, v in (c.top or [])} if c else None for c in scores],
                "text_offset": offsets}


# ---- routes --------------------------------------------------------------------------------


@router.get("/v1/models", response_model=ModelList)
async def models(request: Request):
    return ModelList(data=[ModelCard(id=n, created=g.created, max_model_len=g.context, root=g.root, parent=g.parent)
                           for n, g in request.app.state.generators.items()])


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    g = pick(request, body.model)
    if body.messages is not None:
        ids = chat_ids(g, plain(body.messages), Plan(), body.add_generation_prompt)
    elif body.prompt is not None:
        ids = g.encode_text(body.prompt, body.add_special_tokens)
    else:
        raise RequestError("give 'prompt' (text) or 'messages' to tokenize", param="prompt")
    return {"tokens": ids, "count": len(ids), "max_model_len": g.context}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    g = pick(request, body.model)
    vocab = g.engine.config.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise RequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
    return {"prompt": g.tokenizer.decode(body.tokens)}


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat(body: ChatCompletionRequest, request: Request):
    g = pick(request, body.model)
    plan = Plan.of(body.tools, body.tool_choice, body.parallel_tool_calls, body.response_format)
    ids = chat_ids(g, plain(body.messages), plan)
    lp = (body.top_logprobs or 0) if body.logprobs else None
    params = per_choice(g.sampling(len(ids), body.max_completion_tokens or body.max_tokens, grammar=plan.grammar,
                                   **body.sampling_values(lp)), body.n)
    rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    run = g.open([ids] * body.n, params, rid, len(ids))
    texts = Texts(g)
    replies = [Reply(plan) for _ in range(body.n)]

    if body.stream:
        def chunk(i: int, d: Delta) -> list[dict]:
            text, calls, finish = replies[i].push(d)
            scored = lp is not None and d.token is not None
            if not (text or calls or finish or scored):
                return []  # a held-back partial character, stop-string prefix or tool call, and no logprobs asked
            delta = ({"content": text} if text else {}) | ({"tool_calls": calls} if calls else {})
            c = {"index": i, "delta": delta, "finish_reason": finish}
            if scored:
                c["logprobs"] = {"content": [texts.chat_entry(d.token)]}
            return [c]

        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": g.name}
        roles = [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                 for i in range(body.n)]
        include = bool(body.stream_options and body.stream_options.include_usage)
        return streaming(events(base, roles, run, chunk, include), run)

    async def collect():
        parts, calls = [[] for _ in range(body.n)], [[] for _ in range(body.n)]
        finish, logprobs = [None] * body.n, [[] for _ in range(body.n)]
        try:
            async for i, d in run:
                if lp is not None and d.token is not None:
                    logprobs[i].append(texts.chat_entry(d.token))
                text, new, end = replies[i].push(d)
                parts[i].append(text)
                calls[i] += [{k: v for k, v in c.items() if k != "index"} for c in new]
                finish[i] = end or finish[i]
        finally:
            await run.aclose()

        def message(i: int) -> dict:
            content = "".join(parts[i])
            if not calls[i]:
                return {"role": "assistant", "content": content}
            return {"role": "assistant", "content": content or None, "tool_calls": calls[i]}

        return ChatCompletion(id=rid, created=created, model=g.name, usage=usage(run.tracker), choices=[
            ChatChoice(index=i, message=message(i), finish_reason=finish[i],
                       logprobs={"content": logprobs[i]} if lp is not None else None) for i in range(body.n)])

    return await until_disconnect(request, collect())


@router.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request):
    g = pick(request, body.model)
    prompts = prompt_ids(g, body.prompt)
    if body.max_tokens == 0 and not body.echo:
        raise RequestError("max_tokens must be at least 1 (0 is allowed only with echo, to score a prompt)",
                           param="max_tokens")
    score_only, n, k = body.max_tokens == 0, body.n, body.logprobs
    if body.stream and score_only:
        raise RequestError("stream with max_tokens 0 has nothing to stream", param="stream")
    rid = f"cmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    # Choice c answers prompt c // n. Engine jobs: with generation, job c is choice c, and the first
    # choice of each prompt also scores it when echo + logprobs ask (once per prompt, not per choice);
    # scoring alone is one job per prompt, and echo without logprobs needs no job for it at all.
    if score_only:
        jobs = prompts if k is not None else []
        params, scores = [None] * len(jobs), [k] * len(jobs)
        prompt_of_job = list(range(len(jobs)))
    else:
        jobs, params, scores = [], [], []
        for p in prompts:
            jobs += [p] * n
            params += per_choice(g.sampling(len(p), body.max_tokens, **body.sampling_values(k)), n)
            scores += [k if body.echo and k is not None and j == 0 else None for j in range(n)]
        prompt_of_job = [c // n for c in range(len(jobs))]
    run = g.open(jobs, params, rid, sum(map(len, prompts)), scores)
    texts = Texts(g)
    echo = [g.tokenizer.decode(p) if body.echo else "" for p in prompts]
    scored: dict[int, list[Choice | None]] = {}  # prompt -> its tokens' scores (the first has none)

    def take_scores(job: int, d: Delta) -> int:
        pi = prompt_of_job[job]
        if d.prompt_logprobs is not None:
            scored[pi] = [None] + list(d.prompt_logprobs)
        return pi

    if body.stream:
        def chunks(job: int, d: Delta) -> list[dict]:
            pi = take_scores(job, d)
            if d.prompt_logprobs is not None:  # the echo of every choice of this prompt, with its scores
                return [{"index": c, "text": echo[pi], "finish_reason": None,
                         "logprobs": texts.legacy(prompts[pi], scored[pi])} for c in range(pi * n, pi * n + n)]
            lp = texts.legacy([d.token.token], [d.token]) if k is not None and d.token else None
            if not (d.text or d.finish_reason or lp):
                return []  # a held-back partial character or stop-string prefix, and no logprobs asked
            return [{"index": job, "text": d.text, "finish_reason": d.finish_reason, "logprobs": lp}]

        base = {"id": rid, "object": "text_completion", "created": created, "model": g.name}
        first = [{"index": c, "text": echo[c // n], "finish_reason": None, "logprobs": None}
                 for c in range(len(prompts) * n) if body.echo and k is None]
        include = bool(body.stream_options and body.stream_options.include_usage)
        return streaming(events(base, first, run, chunks, include), run)

    async def collect():
        out = len(prompts) * n
        got, parts, finish = [[] for _ in range(out)], [[] for _ in range(out)], ["length"] * out
        try:
            async for job, d in run:
                take_scores(job, d)
                if score_only:
                    continue
                if d.token is not None:
                    got[job].append(d.token)
                parts[job].append(d.text)
                finish[job] = d.finish_reason or finish[job]
        finally:
            await run.aclose()
        choices = []
        for c in range(out):
            pi, lp = c // n, None
            if k is not None:
                lead = prompts[pi] if body.echo else []
                lp = texts.legacy(lead + [t.token for t in got[c]], scored.get(pi, [None] * len(lead)) + got[c])
            choices.append(CompletionChoice(index=c, text=echo[pi] + "".join(parts[c]), finish_reason=finish[c],
                                            logprobs=lp))
        return Completion(id=rid, created=created, model=g.name, choices=choices, usage=usage(run.tracker))

    return await until_disconnect(request, collect())


def prompt_ids(g: Generator, prompt) -> list[list[int]]:
    """The four OpenAI prompt forms -> token-id lists; no BOS is added to token-id prompts."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise RequestError("prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        ids = g.encode_text(p) if isinstance(p, str) else list(p)
        if not ids:
            raise RequestError("a prompt is empty (no tokens)", param="prompt")
        out.append(ids)  # the engine checks the ids against the vocabulary before any work starts
    return out


@router.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "DELETE"], include_in_schema=False,
                  name="unknown")
async def unknown(request: Request, rest: str):  # before any page's mount at /: API clients get JSON errors
    allowed = sorted(m for r in endpoints(request.app) if r.name != "unknown" and r.path_regex.match(request.url.path)
                     for m in r.methods)
    if allowed:
        raise RequestError(f"{request.method} is not allowed on {request.url.path}; use {', '.join(allowed)}", 405,
                           headers={"Allow": ", ".join(allowed)})
    raise RequestError(f"no route {request.url.path}; see /docs", 404, "not_found_error")
