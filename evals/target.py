"""What an evaluation runs against: a checkpoint in this process, or any OpenAI-compatible server.

    t = open_target("SmolLM2-135M-Instruct")      # or open_target("http://127.0.0.1:8000", model=..., api_key=...)
    t.context                                      # tokens a prompt and its reply may hold together (None: unknown)
    ids = t.tokenize(text)                         # the model's tokenizer, its special tokens added as it adds them
    for i, logprobs in t.score(windows): ...       # log p of each window's tokens 1.. (token 0 is context only)
    for i, reply in t.chat(conversations, max_tokens): ...   # greedy replies; a TooLong where a prompt won't fit

Both yield results as they finish (for a progress bar), tagged with the input's index, so a harness is
written once for both.

In-process (`Local`), every request goes through the batched engine, as the server's do, so every
backend `qt_serve.checkpoint.load` takes (fp32/fp16/bf16, int8/int4, ONNX) works, and up to `slots`
requests share each forward. The engine is thread-less and stepped here: no worker thread, no event loop.
Scoring is the engine's prompt scoring (`prompt_logprobs`: log-softmax chunk by chunk during the
prefill, the path of the server's echo + logprobs).

Over HTTP (`Remote`), the `openai` client with `concurrency` requests in flight: scoring is
`/v1/completions` on token ids with `echo: true, logprobs: 0, max_tokens: 0` (qt-serve and vLLM take
it), generation `/v1/chat/completions` (the server applies its chat template), tokenizing `/tokenize`
(qt-serve's and vLLM's route, at the server's root).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from qt_serve.errors import QtError


@dataclass
class TooLong:
    """A prompt that leaves no room for its reply in the model's context: reported, not generated."""

    message: str


def is_url(spec: str) -> bool:
    return str(spec).startswith(("http://", "https://"))


def open_target(spec: str, model: str | None = None, api_key: str | None = None, concurrency: int = 8,
                slots: int = 4, max_seq_len: int | None = None, dtype: str | None = None, device: str = "cpu"):
    """`Remote` for a URL (model: which of the server's; key: default $QT_API_KEY, then $OPENAI_API_KEY),
    else `Local` over anything `qt_serve.checkpoint.load` takes."""
    if is_url(spec):
        key = api_key or os.environ.get("QT_API_KEY") or os.environ.get("OPENAI_API_KEY")
        return Remote(spec, model, key, concurrency)
    return Local.load(spec, slots, max_seq_len, dtype, device)


class Local:
    """A model in this process, through its `service.Generator` (encoding, request defaults, context
    check) and a thread-less engine."""

    def __init__(self, gen):
        if gen.engine.thread is not None:
            raise QtError("Local steps its engine itself: give it one made with thread=False")
        self.gen, self.engine, self.name = gen, gen.engine, gen.name

    @classmethod
    def load(cls, spec: str, slots: int = 4, max_seq_len: int | None = None, dtype: str | None = None,
             device: str = "cpu") -> Local:
        """`slots` KV rows (requests decoded together) of `max_seq_len` tokens (default: the model's context)."""
        from qt_serve import checkpoint
        from qt_serve.engine import Engine
        from qt_serve.service import Generator

        ckpt = checkpoint.load(spec, dtype=dtype, device=device, max_seq_len=max_seq_len)
        engine = Engine.load(ckpt, max_batch=slots, max_queue=slots, max_seq_len=max_seq_len, thread=False)
        return cls(Generator(Path(str(spec).rstrip("/")).name, engine, ckpt.generation_config))

    @property
    def context(self) -> int:
        return self.engine.max_seq_len

    def tokenize(self, text: str) -> list[int]:
        return self.gen.encode_text(text)

    def score(self, windows: list[list[int]]) -> Iterator[tuple[int, list[float]]]:
        for i, deltas in self._run([(w, None) for w in windows]):
            yield i, [c.logprob for d in deltas if d.prompt_logprobs for c in d.prompt_logprobs]

    def chat(self, conversations: list[list[dict]], max_tokens: int) -> Iterator[tuple[int, str | TooLong]]:
        from qt_serve.service import RequestError

        jobs, index = [], []
        for i, messages in enumerate(conversations):
            ids = self.gen.encode_chat(messages)
            try:  # the server's check: prompt + max_tokens within the context, else a 400 it would send
                params = self.gen.sampling(len(ids), max_tokens, temperature=0)
            except RequestError as e:
                if e.code != "context_length_exceeded":
                    raise
                yield i, TooLong(e.message)
                continue
            jobs.append((ids, params))
            index.append(i)
        for j, deltas in self._run(jobs):
            yield index[j], "".join(d.text for d in deltas)

    def _run(self, jobs: list[tuple[list[int], object]]) -> Iterator[tuple[int, list]]:
        """Each job's deltas once it has ended, in the order they end. A job is (prompt ids, SamplingParams),
        or (ids, None) to score the prompt only. Jobs are queued as the engine has room, so any engine's
        queue limit holds; one that fails raises its error, and what is left is cancelled."""
        from qt_serve.service import failure

        deltas: dict[int, list] = {}
        live: dict[int, object] = {}
        todo = iter(enumerate(jobs))
        try:
            while True:
                while len(self.engine.waiting) < self.engine.max_queue and (job := next(todo, None)):
                    i, (ids, params) = job
                    deltas[i] = []
                    live[i] = self.engine.submit(ids, params, deltas[i].append, f"eval-{i}",
                                                 0 if params is None else None)
                if not live:
                    return
                self.engine.run_once()
                for i in [i for i, r in live.items() if r.done]:
                    del live[i]
                    got = deltas.pop(i)
                    err = failure(got[-1])
                    if err is not None:
                        raise err
                    yield i, got
        finally:  # an error or Ctrl-C: nothing of this call may run in the next one
            for r in live.values():
                self.engine.cancel(r)
            if self.engine.busy:
                self.engine.run_once()


class Remote:
    """A model behind an OpenAI-compatible server at URL (with or without the trailing /v1)."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, concurrency: int = 8):
        import openai

        self.root = url.rstrip("/").removesuffix("/v1")
        self.key, self.concurrency = api_key, concurrency
        # Retries: a busy server answers 429 (queue full) or 503 while it starts; the client waits and retries.
        self.client = openai.OpenAI(base_url=self.root + "/v1", api_key=api_key or "none", max_retries=5,
                                    timeout=3600)
        try:
            cards = self.client.models.list().data
        except openai.APIConnectionError:
            raise QtError(f"cannot reach an OpenAI-compatible server at {self.root}; is it running?") from None
        except openai.APIStatusError as e:  # e.g. 401: a wrong or missing key
            raise QtError(f"{self.root}/v1/models answered {e.status_code}: {e.message}") from None
        card = next((c for c in cards if c.id == model), None) if model else (cards[0] if cards else None)
        if card is None:
            raise QtError(f"{self.root} serves {', '.join(c.id for c in cards) or 'no model'}"
                          + (f", not {model!r}" if model else "") + "; name one with --model-name")
        self.name = card.id
        # qt-serve and vLLM list the context as max_model_len; other servers may not say.
        self.context: int | None = (card.model_extra or {}).get("max_model_len")

    def tokenize(self, text: str) -> list[int]:
        import httpx

        r = httpx.post(self.root + "/tokenize", json={"model": self.name, "prompt": text}, timeout=600,
                       headers={"Authorization": f"Bearer {self.key}"} if self.key else {})
        if r.status_code == 404:
            raise QtError(f"{self.root} has no /tokenize route (qt-serve and vLLM have one): perplexity over HTTP "
                          "needs the server's own token ids")
        if r.is_error:
            raise QtError(f"{self.root}/tokenize answered {r.status_code}: {r.text[:500]}")
        return r.json()["tokens"]

    def score(self, windows: list[list[int]]) -> Iterator[tuple[int, list[float]]]:
        import openai

        def one(ids: list[int]) -> list[float]:
            try:
                r = self.client.completions.create(model=self.name, prompt=ids, echo=True, logprobs=0, max_tokens=0)
            except openai.BadRequestError as e:  # e.g. a window past a context the server did not list
                raise QtError(f"{self.root} refused a {len(ids)}-token window: {e.message}") from None
            return r.choices[0].logprobs.token_logprobs[1:len(ids)]  # the first is null: nothing predicts it

        yield from self._pool(one, windows)

    def chat(self, conversations: list[list[dict]], max_tokens: int) -> Iterator[tuple[int, str | TooLong]]:
        import openai

        def one(messages: list[dict]) -> str | TooLong:
            try:
                r = self.client.chat.completions.create(model=self.name, messages=messages, temperature=0,
                                                        max_tokens=max_tokens)
            except openai.BadRequestError as e:
                body = e.body if isinstance(e.body, dict) else {}
                message = body.get("message") or e.message
                # qt-serve and OpenAI say so with a code; vLLM in words ("maximum context length").
                if body.get("code") == "context_length_exceeded" or "context length" in message:
                    return TooLong(message)
                raise
            return r.choices[0].message.content or ""

        yield from self._pool(one, conversations)

    def _pool(self, fn, items: list) -> Iterator[tuple[int, object]]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = {pool.submit(fn, x): i for i, x in enumerate(items)}
            try:
                for f in as_completed(futures):
                    yield futures[f], f.result()
            finally:  # an error or Ctrl-C: requests not yet sent are not sent
                for f in futures:
                    f.cancel()


def progress(total: int, desc: str, unit: str):
    """The harnesses' progress bar, on stderr so stdout keeps only the report."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
