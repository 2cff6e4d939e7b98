"""The models a page can talk to: the ones this server holds, or any OpenAI-compatible URL.

Both stream a chat reply as pieces through one interface, so the chat page and the arena
never care where a model runs:

    async for piece in model.stream(messages, Settings(temperature=0.7)):
        ...  # piece.text, piece.tokens (generated so far), piece.calls (tool calls it completes)

`Settings` may also ask for a JSON reply or offer tools, with the chat API's own fields
(`response_format`, `tools`, `tool_choice`): a local model takes them through `qt_serve.tools`
as the API route does, a remote one gets them in its request.

A failure the person can act on (prompt past the context, queue full, server unreachable)
is raised as `ChatError` with the server's own message.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field

from qt_serve.errors import QtError
from qt_serve.service import Generator, RequestError
from qt_serve.tools import Plan, Reply, chat_ids

STRUCTURED = ("response_format", "tools", "tool_choice")


class ChatError(Exception):
    """A reply that could not be made, with text fit to show the person."""


@dataclass
class Settings:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    # The chat API's fields of the same names; None: unset (a free-text reply, no tools).
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None

    def structured(self) -> dict:
        """The reply format and tools that are set, as chat API request fields."""
        return {k: getattr(self, k) for k in STRUCTURED if getattr(self, k) is not None}

    def as_dict(self) -> dict:
        """As a vote records them: the sampling values, and the reply format and tools only when set."""
        return {k: v for k, v in asdict(self).items() if k not in STRUCTURED} | self.structured()


@dataclass
class Piece:
    text: str
    tokens: int  # tokens generated so far
    calls: list[dict] = field(default_factory=list)  # tool calls completed here (OpenAI's message.tool_calls)


@dataclass
class ReplyStats:
    """Timing of one reply as the person saw it: time to first token and decode speed."""

    start: float
    first: float | None = None
    end: float | None = None
    tokens: int = 0

    def seen(self, piece: Piece) -> None:
        now = time.perf_counter()
        if self.first is None and piece.tokens:
            self.first = now
        self.tokens, self.end = piece.tokens, now

    def summary(self) -> str:
        if self.first is None:
            return "0 tokens"
        ttft = (self.first - self.start) * 1000
        rate = (self.tokens - 1) / (self.end - self.first) if self.tokens > 1 and self.end > self.first else 0.0
        return f"{self.tokens} tokens · TTFT {ttft:.0f} ms · {rate:.1f} tok/s"


class Pacer:
    """At most one page update per `every` seconds: a browser that re-renders the Markdown of a
    long reply at every token (hundreds a second on a small model) falls seconds behind."""

    def __init__(self, every: float = 0.05):
        self.every, self.last = every, 0.0

    def due(self) -> bool:
        now = time.perf_counter()
        if now - self.last < self.every:
            return False
        self.last = now
        return True


class LocalModel:
    """A model this process serves: through its `Generator`, as the API's requests are (same defaults,
    context check, metrics and errors)."""

    def __init__(self, gen: Generator):
        self.name, self.gen = gen.name, gen

    @property
    def context(self) -> int:
        return self.gen.context

    def defaults(self) -> Settings:
        """The page's starting settings: the checkpoint's own sampling defaults (generation_config.json)."""
        d = self.gen.defaults
        return Settings(temperature=d.get("temperature", 1.0), top_p=d.get("top_p", 1.0))

    async def stream(self, messages: list[dict], settings: Settings) -> AsyncIterator[Piece]:
        try:
            plan = Plan.of(settings.tools, settings.tool_choice, None, settings.response_format)
            ids = chat_ids(self.gen, messages, plan)
            # "Max new tokens" is an upper bound here: a long chat gets what room the context has left.
            params = self.gen.sampling(len(ids), settings.max_tokens, clamp=True, temperature=settings.temperature,
                                       top_p=settings.top_p, seed=settings.seed, grammar=plan.grammar)
            run = self.gen.open([ids], [params], f"page-{uuid.uuid4().hex[:12]}", len(ids))
        except QtError as e:  # RequestError, or a schema llguidance cannot compile
            raise ChatError(str(e)) from None
        reply = Reply(plan)
        try:
            async for _, d in run:
                text, calls, _ = reply.push(d)
                yield Piece(text, run.tracker.tokens, [{k: v for k, v in c.items() if k != "index"} for c in calls])
        except RequestError as e:
            raise ChatError(e.message) from None
        finally:
            await run.aclose()  # cancels the request and frees its KV row if we stop early


class RemoteModel:
    """A model behind any OpenAI-compatible server, reached with the `openai` client."""

    def __init__(self, name: str, base_url: str, model: str | None = None, api_key: str | None = None):
        import openai

        self.name, self.model = name, model or name
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0, timeout=600)
        self.context = None

    def defaults(self) -> Settings:
        return Settings()

    async def stream(self, messages: list[dict], settings: Settings) -> AsyncIterator[Piece]:
        import openai

        tokens, calls = 0, {}  # calls: stream index -> the call as its fragments have built it so far
        try:
            stream = await self.client.chat.completions.create(
                model=self.model, messages=messages, stream=True, temperature=settings.temperature,
                top_p=settings.top_p, max_tokens=settings.max_tokens, seed=settings.seed, **settings.structured())
            async with stream:
                async for chunk in stream:
                    for c in chunk.choices:
                        # One chunk per token on vLLM and OpenAI (qt sends each tool call whole, in one).
                        tokens += bool(c.delta.content or c.delta.tool_calls)
                        for t in c.delta.tool_calls or []:
                            call = calls.setdefault(t.index, {"id": "", "type": "function",
                                                              "function": {"name": "", "arguments": ""}})
                            call["id"] = t.id or call["id"]
                            if t.function:  # OpenAI streams a call's arguments in pieces
                                call["function"]["name"] += t.function.name or ""
                                call["function"]["arguments"] += t.function.arguments or ""
                        if c.delta.content:
                            yield Piece(c.delta.content, tokens)
            if calls:  # whole only once the stream has ended
                yield Piece("", tokens, [calls[i] for i in sorted(calls)])
        except openai.APIStatusError as e:
            body = e.body if isinstance(e.body, dict) else {}
            raise ChatError(f"{self.name}: {body.get('message') or e.message}") from None
        except openai.APIConnectionError:
            raise ChatError(f"{self.name}: cannot reach {self.client.base_url}; is that server running?") from None


def parse_remote(spec: str) -> RemoteModel:
    """`NAME=URL[#MODEL]` (e.g. `gpt=http://host:8000/v1#gpt-4o-mini`) -> a RemoteModel; key from $NAME_API_KEY."""
    import os

    if "=" not in spec:
        raise QtError(f"--arena-model {spec!r}: expected NAME=URL[#MODEL], e.g. other=http://localhost:8001/v1")
    name, url = spec.split("=", 1)
    url, _, model = url.partition("#")
    if not url.startswith(("http://", "https://")):
        raise QtError(f"--arena-model {spec!r}: the URL must start with http:// or https://")
    key = os.environ.get(f"{name.upper().replace('-', '_')}_API_KEY")
    return RemoteModel(name, url, model or None, key)
