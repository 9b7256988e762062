"""The gateway's HTTP application (FastAPI): OpenAI's routes on the kernel's SDK.

    POST /v1/chat/completions    POST /v1/completions    GET /v1/models
    GET /health                  GET /metrics (Prometheus text)

Every generate runs as a stream on a reader thread of its own (Running), whether the
client streams or not: the event loop never blocks on the kernel, and a client that
goes away (mid-stream, or while it waits for a whole answer) cancels its request in the
kernel at once (Stream.cancel), which frees its KV.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from functools import partial

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from llmos.syscalls import KernelDead, SyscallError
from llmos.userland.gateway import openai_api as api
from llmos.userland.gateway import tools
from llmos.userland.gateway.clients import SELF, Clients
from llmos.userland.gateway.errors import ApiError
from llmos.userland.gateway.metrics import Metrics

DISCONNECT_POLL = 0.5      # s between looks at whether a non-streaming client is still there
MODELS_TTL = 10.0          # s a model's tool-call format is remembered


def make_app(clients: Clients) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        clients.close()

    app = FastAPI(title="llmos", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    gw = Gateway(clients)
    app.state.gateway = gw

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        gw.metrics.answered(request.url.path, e.status)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return await api_error(request, ApiError(e.status_code, str(e.detail)))

    @app.get("/health")
    async def health():
        await gw.call(SELF, "ping")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        clients.caller(request.headers.get("authorization"))      # a key, if keys are set
        found = await gw.call(SELF, "models")
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "llmos",
             "state": m.state, "max_model_len": m.max_len or None} for m in found]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await gw.complete(request, api.chat_request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await gw.complete(request, api.completion_request)

    @app.get("/metrics")
    async def metrics(request: Request):
        clients.caller(request.headers.get("authorization"))
        k = await gw.kernel(SELF)
        text = await anyio.to_thread.run_sync(gw.metrics.render, k)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app


class Gateway:
    def __init__(self, clients: Clients):
        self.clients = clients
        self.metrics = Metrics()
        self._formats: dict = {}                 # model -> (tool format, when read)

    async def kernel(self, name: str):
        try:
            return await anyio.to_thread.run_sync(self.clients.get, name)
        except SyscallError as e:                 # no kernel (KernelNotRunning), token refused
            raise ApiError(503, f"the kernel is not available: {e.msg}") from None

    async def call(self, name: str, method: str, *args):
        """k.method(*args) of process `name`, off the event loop; kernel errors as ApiError."""
        k = await self.kernel(name)
        try:
            return await anyio.to_thread.run_sync(partial(getattr(k, method), *args))
        except KernelDead as e:
            self.clients.dead(name, k, e)
            raise ApiError(503, f"the kernel went away: {e.msg}") from None
        except SyscallError as e:
            raise ApiError.of(e) from None

    async def complete(self, request: Request, make_ask):
        """A chat or text completion for the caller the request's key names."""
        name = self.clients.caller(request.headers.get("authorization"))
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        ask = make_ask(body)
        k = await self.kernel(name)
        run = Running(k.generate(**ask.source, model=ask.model, stream=True, **ask.sampling))
        try:
            first = await run.next()               # errors before the first token: a status
        except KernelDead as e:
            self.clients.dead(name, k, e)
            raise ApiError(503, f"the kernel went away: {e.msg}") from None
        except SyscallError as e:
            raise ApiError.of(e) from None
        fmt = await self._tool_format(name, ask) if ask.tools else ""   # loaded by now
        self.metrics.answered(request.url.path, 200)
        if ask.stream:
            return StreamingResponse(self._events(ask, run, first, fmt),
                                     media_type="text/event-stream")
        return await self._whole(request, ask, run, first, fmt)

    async def _whole(self, request, ask, run, delta, fmt) -> dict:
        """The whole answer, read as it streams; a client gone meanwhile cancels it."""
        try:
            while delta is not None:
                nxt = asyncio.ensure_future(run.next())
                while not nxt.done():
                    await asyncio.wait([nxt], timeout=DISCONNECT_POLL)
                    if not nxt.done() and await request.is_disconnected():
                        run.cancel()
                delta = await nxt
        except SyscallError as e:
            raise ApiError.of(e) from None
        finally:
            run.cancel()
        done = run.completion
        return api.response(ask, done, tools.parse(done.text, fmt) if ask.tools else None)

    async def _events(self, ask, run, delta, fmt):
        """The SSE stream: a chunk per delta (held back to the end when tools may be
        called), the finishing chunk, usage if asked, [DONE]."""
        try:
            if ask.kind == "chat":
                yield _sse(api.chunk(ask, delta={"role": "assistant", "content": ""}))
            while delta is not None:
                if not ask.tools and delta.text:
                    yield _sse(api.chunk(ask, delta={"content": delta.text}, text=delta.text))
                delta = await run.next()
            done = run.completion
            reply = tools.parse(done.text, fmt) if ask.tools else None
            if reply is not None:
                yield _sse(api.chunk(ask, delta=_reply_delta(reply)))
            yield _sse(api.chunk(ask, finish=api.finish_of(done, reply)))
            if ask.include_usage:
                yield _sse(api.chunk(ask, usage_=api.usage(done.usage)))
        except SyscallError as e:                   # after the first token: told in-stream
            yield _sse(ApiError.of(e).body())
        finally:
            run.cancel()                            # a client gone mid-stream lands here
        yield "data: [DONE]\n\n"

    async def _tool_format(self, name: str, ask) -> str:
        """The tool-call form of ask's model (ModelInfo.tool_format), known once it loaded."""
        known = self._formats.get(ask.model)
        if known is None or time.monotonic() - known[1] > MODELS_TTL:
            for m in await self.call(name, "models"):
                if m.state == "ready":
                    self._formats[m.name] = (m.tool_format, time.monotonic())
            known = self._formats.get(ask.model, ("", 0.0))
        return known[0]


def _reply_delta(reply: dict) -> dict:
    delta = {"content": reply.get("content")}
    if reply.get("tool_calls"):
        delta["tool_calls"] = [dict(c, index=i) for i, c in enumerate(reply["tool_calls"])]
    return delta


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class Running:
    """One generate, read on a thread of its own; its deltas handed to the event loop.
    next() gives the next Delta, None at the end (then .completion is set), or raises
    what ended the stream (SyscallError, KernelDead)."""

    _END = object()

    def __init__(self, stream):
        self.stream, self.completion = stream, None
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._ended = False
        threading.Thread(target=self._read, daemon=True, name="llmos-gateway-stream").start()

    def _read(self) -> None:
        try:
            for delta in self.stream:
                self._hand(delta)
            self._hand((self._END, self.stream.completion))
        except BaseException as e:              # noqa: BLE001 (raised on the event loop)
            self._hand((self._END, e))

    def _hand(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:                     # the loop closed: the server is stopping
            self.stream.cancel()

    async def next(self):
        if self._ended:
            return None
        item = await self._queue.get()
        if isinstance(item, tuple) and item[0] is self._END:
            self._ended = True
            if isinstance(item[1], BaseException):
                raise item[1]
            self.completion = item[1]
            return None
        return item

    def cancel(self) -> None:
        """Cancel it in the kernel unless it ended (from the event loop's thread)."""
        if not self._ended:
            self.stream.cancel()
