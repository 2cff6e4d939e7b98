"""The HTTP server: a FastAPI app over one `service.Generator` per served model.

`create_app` puts together the OpenAI routes (`qt_serve.routes`), the operations routes here
(/health, /metrics), the error handlers, and one pure-ASGI guard in front of everything:
API key, body-size limit (chunked bodies too) and request counting. Every error is
OpenAI-shaped JSON, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status for
anything the client can fix. Pages (the chat page, the arena) are mounted by their own
package onto the returned app; this package knows nothing of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from qt_serve import checkpoint, lora, routes
from qt_serve.engine import Engine, Worker
from qt_serve.errors import QtError
from qt_serve.service import Generator, Metrics, RequestError, request_error

log = logging.getLogger("qt_serve.api")

DOCS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def error_json(e: RequestError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


def load_generators(specs: list[str], dtype=None, device="cpu", max_seq_len=None, max_batch=8, max_queue=64,
                    request_timeout: float | None = None, metrics: Metrics | None = None,
                    loras: list[str] = (), load_in: str | None = None) -> dict[str, Generator]:
    """`[NAME=]SPEC` strings -> loaded models, each behind its own engine, sharing one Metrics; and
    `NAME=DIR[@MODEL]` LoRA adapters, each served through its base model's engine (`lora.py`)."""
    metrics = metrics or Metrics()
    worker = Worker()  # one thread steps every model: one OpenMP team in the process (engine.Worker)
    models = [spec.split("=", 1) if "=" in spec else (Path(spec.rstrip("/")).stem or spec, spec) for spec in specs]
    adapters = [lora.parse_spec(spec, [name for name, _ in models]) for spec in loras]
    names = [name for name, _ in models] + [name for name, _, _ in adapters]
    for name in names:
        if names.count(name) > 1:
            raise QtError(f"two models are named {name!r}; name them with --model NAME=SPEC / --lora NAME=DIR")
    out = {}
    for name, path in models:
        ckpt = checkpoint.load(path, dtype=dtype, device=device, max_seq_len=max_seq_len, load_in=load_in)
        mine = [lora.load(d, ckpt, a) for a, d, base in adapters if base == name]
        engine = Engine.load(ckpt, max_batch=max_batch, max_queue=max_queue, max_seq_len=max_seq_len,
                             request_timeout=request_timeout, thread=worker, adapters=mine)
        out[name] = Generator(name, engine, ckpt.generation_config, metrics)
        log.info("serving %s from %s (context %d, %d slots)", name, path, engine.max_seq_len, max_batch)
        for i, a in enumerate(mine, 1):
            out[a.name] = Generator(a.name, engine, ckpt.generation_config, metrics, adapter=i, parent=name,
                                    root=a.source)
            log.info("serving LoRA adapter %s from %s on %s", a.name, a.source, name)
    return out


class Guard:
    """Pure ASGI (a `BaseHTTPMiddleware` would hide client disconnects from the routes): the API
    key, the body-size limit, and the request counter, in front of every HTTP request."""

    def __init__(self, app, owner: FastAPI, metrics: Metrics, api_key: str | None, max_body_bytes: int,
                 open_docs: bool):
        self.app, self.owner, self.metrics, self.api_key, self.max_body = app, owner, metrics, api_key, max_body_bytes
        self.open_docs = open_docs
        self.known: set[str] | None = None  # API route paths: metric labels (page assets all count as "other")

    def label(self, path: str) -> str:
        if self.known is None:  # routes are all in place once requests arrive
            self.known = {r.path for r in routes.endpoints(self.owner) if r.name != "unknown"}
        return path if path in self.known else "other"

    def guarded(self, path: str) -> bool:
        # The model routes always; /metrics and the docs unless opened; never /health (load balancers)
        # nor the pages, which have their own login.
        if path.startswith("/v1/") or path in ("/tokenize", "/detokenize"):
            return True
        return not self.open_docs and (path == "/metrics" or path in DOCS)

    def authorized(self, headers: dict) -> bool:
        given = headers.get(b"authorization", b"")
        return hmac.compare_digest(given, f"Bearer {self.api_key}".encode())  # constant time

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope["path"]
        headers = dict(scope["headers"])
        try:
            if self.api_key and self.guarded(path) and not self.authorized(headers):
                await error_json(RequestError("missing or wrong API key: send 'Authorization: Bearer <key>'", 401,
                                              "authentication_error", code="invalid_api_key"))(scope, receive, counted)
                return
            length = headers.get(b"content-length")
            if length is not None and not length.isdigit():
                await error_json(RequestError("the Content-Length header is not a number", 400,
                                              code="bad_content_length"))(scope, receive, counted)
                return
            if length is not None and int(length) > self.max_body:
                await self.too_large()(scope, receive, counted)
                return
            if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
                # A chunked body has no length up front: read it here, up to the limit.
                body, size, more = [], 0, True
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    body.append(message.get("body", b""))
                    size += len(body[-1])
                    more = message.get("more_body", False)
                    if size > self.max_body:
                        await self.too_large()(scope, receive, counted)
                        return
                receive = replay(b"".join(body), receive)
            await self.app(scope, receive, counted)
        finally:
            self.metrics.requests.labels(self.label(path), str(status)).inc()

    def too_large(self) -> JSONResponse:
        return error_json(RequestError(f"the request body is larger than {self.max_body} bytes", 413,
                                       code="body_too_large"))


def replay(body: bytes, receive):
    """A `receive` that gives `body` as the whole request, then waits on the real one (disconnect)."""
    sent = False

    async def again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


def create_app(generators: dict[str, Generator], api_key: str | None = None, max_body_bytes: int = 1 << 20,
               open_docs: bool = False, mount=None) -> FastAPI:
    """The API app. With `api_key`, the model routes want `Authorization: Bearer KEY`, and so do
    /metrics and the docs unless `open_docs`. `mount(app)` puts pages on it (after the API routes,
    so unknown /v1 paths still get JSON errors); without it, `/` redirects to the docs."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # In-flight streams were already given their grace period by uvicorn. Adapters share their base's engine.
        for engine in dict.fromkeys(g.engine for g in generators.values()):
            await asyncio.to_thread(engine.shutdown, True, 5.0)

    app = FastAPI(title="qt-serve", description="OpenAI-compatible API for small language models",
                  version="0.1.0", lifespan=lifespan)
    app.state.generators = generators
    app.state.metrics = metrics = next(iter(generators.values())).metrics
    app.state.started = time.time()

    @app.exception_handler(RequestError)
    async def _request_error(request, e: RequestError):
        return error_json(e)

    @app.exception_handler(QtError)
    async def _qt_error(request, e: QtError):
        return error_json(request_error(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return error_json(RequestError(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                                           code="invalid_json"))
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
        return error_json(RequestError(f"{where}: {first.get('msg', 'invalid value')}", param=where,
                                       code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return error_json(RequestError(str(e.detail), e.status_code,
                                       "not_found_error" if e.status_code == 404 else "invalid_request_error"))

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        log.exception("unhandled error")
        return error_json(request_error(e))

    @app.get("/health")
    async def health():
        down = [name for name, g in generators.items() if not g.engine.healthy]
        if down:
            return JSONResponse({"status": "error", "models": list(generators), "failed": down}, status_code=503)
        return {"status": "ok", "models": list(generators)}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(generators), media_type=CONTENT_TYPE_LATEST)

    app.include_router(routes.router)
    if mount is None:
        app.add_api_route("/", lambda: RedirectResponse("/docs"), include_in_schema=False)
    else:
        mount(app)
    app.add_middleware(Guard, owner=app, metrics=metrics, api_key=api_key, max_body_bytes=max_body_bytes,
                       open_docs=open_docs)
    return app
