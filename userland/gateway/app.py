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
import logging
import threading
import time
from functools import partial

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from llmos.syscalls import KernelDead, SyscallError
from llmos.syscalls.types import Delta
from llmos.userland.gateway import openai_api as api
from llmos.userland.gateway import tools
from llmos.userland.gateway.clients import SELF, Clients
from llmos.userland.gateway.errors import ApiError
from llmos.userland.gateway.metrics import Metrics

log = logging.getLogger("llmos.gateway")

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

    @app.exception_handler(Exception)
    async def bug(request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return await api_error(request, ApiError(500, f"internal error: {type(e).__name__}"))

    @app.get("/health")
    async def health():
        await gw.call(SELF, lambda k: k.ping())
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        clients.caller(request.headers.get("authorization"))      # a key, if keys are set
        found = await gw.call(SELF, lambda k: k.models())
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
        text = await gw.call(SELF, gw.metrics.render)
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

    async def call(self, name: str, fn, *args):
        """fn(k, *args) with process `name`'s Kernel k, off the event loop (fn only reads:
        it is tried again on a new connection when the kernel was found gone, e.g.
        restarted); kernel errors as ApiError (a kernel still gone: 503)."""
        for again in (False, True):
            k = await self.kernel(name)
            try:
                return await anyio.to_thread.run_sync(partial(fn, k, *args))
            except KernelDead as e:
                self.clients.dead(name, k)
                if again:
                    raise ApiError(503, f"the kernel went away: {e.msg}") from None
            except SyscallError as e:
                raise ApiError.of(e) from None

    def failed(self, name: str, k, e: SyscallError) -> ApiError:
        """The answer to a kernel error; a dead kernel's connection is dropped."""
        if isinstance(e, KernelDead):
            self.clients.dead(name, k)
            return ApiError(503, f"the kernel went away: {e.msg}")
        return ApiError.of(e)

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
        k, run, first = await self._start(request, name, ask)
        handed = False
        try:
            fmt = await self._tool_format(name, ask) if ask.tools else ""  # loaded by now
            if ask.stream:
                self.metrics.answered(request.url.path, 200)     # the status line goes now
                response = StreamingResponse(self._events(name, k, ask, run, first, fmt),
                                             media_type="text/event-stream")
                handed = True
                return response
            while first is not None:
                first = await self._next(request, run)
            done = run.completion
            reply = tools.parse(done.text, fmt) if ask.tools else None
            self.metrics.answered(request.url.path, 200)
            return api.response(ask, done, reply)
        except SyscallError as e:
            raise self.failed(name, k, e) from None
        finally:
            if not handed:
                run.cancel()                       # a client gone, an error: not left running

    async def _start(self, request: Request, name: str, ask):
        """(k, run, its first delta) of ask's generate. A kernel found gone before the first
        token (restarted: zmq took the connection to the new one) is connected to again
        and the generate sent once more: the old kernel never answered it. Errors before
        the first token are an ApiError (a status, not a broken stream)."""
        for again in (False, True):
            k = await self.kernel(name)
            run = Running(k.generate(**ask.source, model=ask.model, stream=True, **ask.sampling))
            try:
                return k, run, await self._next(request, run)
            except KernelDead as e:
                run.cancel()
                self.clients.dead(name, k)
                if again:
                    raise ApiError(503, f"the kernel went away: {e.msg}") from None
            except SyscallError as e:
                run.cancel()
                raise ApiError.of(e) from None

    async def _next(self, request: Request, run: "Running"):
        """run's next delta, cancelling it if the client goes away meanwhile (it may wait
        long: queued, throttled, stopped, a model loading)."""
        nxt = asyncio.ensure_future(run.next())
        while not nxt.done():
            await asyncio.wait([nxt], timeout=DISCONNECT_POLL)
            if not nxt.done() and await request.is_disconnected():
                run.cancel()
        return nxt.result()

    async def _events(self, name, k, ask, run, delta, fmt):
        """The SSE stream: a chunk per delta (held back to the end when the model may call
        a tool), the finishing chunk, usage if asked, [DONE]."""
        hold = bool(ask.tools and fmt)
        try:
            if ask.kind == "chat":
                yield _sse(api.chunk(ask, delta={"role": "assistant", "content": ""}))
            while delta is not None:
                if not hold and delta.text:
                    yield _sse(api.chunk(ask, delta={"content": delta.text}, text=delta.text))
                delta = await run.next()
            done = run.completion
            reply = tools.parse(done.text, fmt) if hold else None
            if reply is not None:
                yield _sse(api.chunk(ask, delta=_reply_delta(reply)))
            yield _sse(api.chunk(ask, finish=api.finish_of(done, reply)))
            if ask.include_usage:
                yield _sse(api.chunk(ask, usage_=api.usage(done.usage)))
        except SyscallError as e:                   # after the first token: told in-stream
            yield _sse(self.failed(name, k, e).body())
        finally:
            run.cancel()                            # a client gone mid-stream lands here
        yield "data: [DONE]\n\n"

    async def _tool_format(self, name: str, ask) -> str:
        """The tool-call form of ask's model (ModelInfo.tool_format), known once it loaded."""
        known = self._formats.get(ask.model)
        if known is None or time.monotonic() - known[1] > MODELS_TTL:
            for m in await self.call(name, lambda k: k.models()):
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
    next() gives the next Delta (those that arrived meanwhile merged into one: a client
    that falls behind gets fewer, longer chunks), None at the end (then .completion is
    set), or raises what ended the stream (SyscallError, KernelDead)."""

    _END = object()

    def __init__(self, stream):
        self.stream, self.completion = stream, None
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._ended = False
        self._pending = None                     # the end, found while merging deltas
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
        item = self._pending or await self._queue.get()
        self._pending = None
        if isinstance(item, tuple) and item[0] is self._END:
            self._ended = True
            if isinstance(item[1], BaseException):
                raise item[1]
            self.completion = item[1]
            return None
        merged = [item]
        while not self._queue.empty():
            more = self._queue.get_nowait()
            if isinstance(more, tuple):             # the end: told by the next call
                self._pending = more
                break
            merged.append(more)
        if len(merged) == 1:
            return item
        return Delta("".join(d.text for d in merged), [t for d in merged for t in d.token_ids])

    def cancel(self) -> None:
        """Cancel it in the kernel unless it ended (from the event loop's thread)."""
        if not self._ended:
            self.stream.cancel()
